"""A ZEO/zeotwist mix-up is diagnosed (issue 13, item 5).

* A zeotwist client pointed at a real ZEO server raises, within seconds,
  an error saying that it is a ZEO server (recognised from the protocol
  announcement a ZEO server sends first).
* A real ZEO client pointed at a zeotwist server sends nothing (it waits
  for a ZEO server's announcement); a second before the handshake timeout
  the server sends it a ZEO announcement of its own (zeotwist.wire.zeo.PROBE), which
  the ZEO client answers in ZEO's framing: the server logs that it is a
  ZEO client and drops it.  A zeotwist client skips that probe.
* The first-bytes rules on their own, in memory.
"""
import re
import time

import pytest
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from zeotwist import ClientStorage
from zeotwist.client.protocol import describe_greeting
from zeotwist.client.reactorthread import background_reactor
from zeotwist.errors import WrongServer
from zeotwist.testing import start_server


@pytest.fixture
def zeo_server(tmp_path):
    import ZEO
    address, stop = ZEO.server(path=str(tmp_path / "zeo.fs"))
    yield address
    stop()


def test_zeotwist_client_at_a_zeo_server_says_so(zeo_server):
    """Raised at once, not after ``wait_timeout`` (which would raise the
    same error): the constructor returns long before its 600 s are up."""
    import threading
    raised = []

    def connect():
        try:
            ClientStorage(zeo_server, reactor=background_reactor(), wait_timeout=600)
        except Exception as e:
            raised.append(e)
    attempt = threading.Thread(target=connect, daemon=True)
    attempt.start()
    attempt.join(60)
    assert not attempt.is_alive(), "still waiting for the ZEO server to speak zeotwist"
    (err,) = raised
    assert isinstance(err, WrongServer)
    text = str(err)
    assert re.search(r"is a ZEO server \(it announced ZEO protocol [MZ]5\)", text), text
    assert "%s:%d" % zeo_server in text


def test_zeo_client_at_a_zeotwist_server_is_named_in_the_log(tmp_path):
    import ZEO
    lines = []

    def observe(event):
        if "protocol violation" in (event.get("log_format") or ""):
            lines.append(event)

    server = start_server(str(tmp_path / "data.fs"), handshake_timeout=2)   # probed after 1 s
    globalLogPublisher.addObserver(observe)
    zeo_client = None
    try:
        zeo_client = ZEO.client(server.address, wait=False)
        deadline = time.monotonic() + 10
        while not lines:
            assert time.monotonic() < deadline, "no log line"
            time.sleep(0.01)                 # polling a real condition, bounded
    finally:
        globalLogPublisher.removeObserver(observe)
        if zeo_client is not None:
            zeo_client.close()
        server.stop()
    assert re.fullmatch(r"protocol violation from 127\.0\.0\.1:\d+: a ZEO client \(it answered "
                        r"in ZEO protocol Z5\): this is a zeotwist server; point the client at "
                        r"a ZEO server, or use zeotwist's ClientStorage; closing",
                        formatEvent(lines[0])), formatEvent(lines[0])


def test_first_bytes():
    assert describe_greeting(b"\0\0\0\x02Z5", "h:1").startswith(
        "h:1 is a ZEO server (it announced ZEO protocol Z5)")
    assert describe_greeting(b"\0\0\0\x05Z3101", "h:1").startswith(
        "h:1 is a ZEO server (it announced ZEO protocol Z3101)")
    assert describe_greeting(b"\0\0\0\x00\xff\xff", "h:1") == \
        "h:1 is not a zeotwist server (it sent b'\\x00\\x00\\x00\\x00\\xff\\xff' first)"


def test_protocol_refuses_a_zeo_greeting_in_pieces():
    """The announcement may arrive a byte at a time; AMP bytes pass through."""
    from twisted.internet.testing import StringTransport

    from zeotwist.client.protocol import ClientProtocol
    from zeotwist.testing import Recorder
    proto = ClientProtocol(Recorder())
    transport = StringTransport()
    proto.makeConnection(transport)
    for byte in b"\0\0\0\x02M5":
        proto.dataReceived(bytes([byte]))
    assert isinstance(proto.wrong_server, WrongServer)
    assert "ZEO protocol M5" in str(proto.wrong_server)
    assert transport.disconnecting

    amp_proto = ClientProtocol(Recorder())
    amp_proto.makeConnection(StringTransport())
    amp_proto.dataReceived(b"\0")
    amp_proto.dataReceived(b"\x07_answer\0\x011\0\0")      # an answer to no question
    assert amp_proto.wrong_server is None


def test_first_bytes_server_side():
    """The server: a ZEO answer (in pieces) names a ZEO client; other
    first bytes that are no AMP box name no one; AMP passes."""
    from twisted.internet.testing import StringTransport

    from zeotwist.server.session import ServerSession

    def session():
        s = ServerSession({}, Clock())
        s.makeConnection(StringTransport())
        said = []
        s.logViolation = lambda fmt, **kw: said.append(kw["why"])
        return s, said

    s, said = session()
    for byte in b"\0\0\0\x02Z5\0\0\0\x1e":
        s.dataReceived(bytes([byte]))
    assert said == ["a ZEO client (it answered in ZEO protocol Z5): this is a zeotwist "
                    "server; point the client at a ZEO server, or use zeotwist's ClientStorage"]
    assert s.transport.disconnecting
    s, said = session()
    s.dataReceived(b"\0\0\0\x03abc")
    assert said == ["not a zeotwist client (it sent b'\\x00\\x00\\x00\\x03abc' first)"]
    s, said = session()
    s.dataReceived(b"\0")
    s.dataReceived(b"\x08_command\0\x08Register\0\0")     # AMP: a command, unregistered
    assert not [why for why in said if "ZEO" in why or "not a zeotwist" in why]


def test_a_silent_connection_is_probed_and_a_zeotwist_client_skips_the_probe(tmp_path):
    from ZODB.MappingStorage import MappingStorage

    from zeotwist.testing import call_in_memory, connect_in_memory, memory_server
    from zeotwist.wire import commands as C
    from zeotwist.wire import zeo
    clock = Clock()
    servers = {"1": memory_server(MappingStorage(), clock)}
    a, sa, pa, rec = connect_in_memory(servers, clock)
    probes = []
    real = a.dataReceived
    a.dataReceived = lambda data: probes.append(data) or real(data)
    clock.advance(3.99)
    pa.flush()
    assert probes == []
    clock.advance(0.01)                                 # a second before the handshake timeout
    pa.flush()
    assert b"".join(probes) == zeo.PROBE and a.wrong_server is None and not rec.lost
    answer = call_in_memory(a, pa, C.Register, protocol=C.PROTOCOL_VERSION, storage="1",
                            read_only=True)
    assert answer["read_only"] is True


def test_a_zeotwist_client_skips_the_probe_in_pieces():
    from twisted.internet.testing import StringTransport

    from zeotwist.client.protocol import ClientProtocol
    from zeotwist.testing import Recorder
    from zeotwist.wire import zeo
    proto = ClientProtocol(Recorder())
    proto.makeConnection(StringTransport())
    for byte in zeo.PROBE + b"\0":
        proto.dataReceived(bytes([byte]))
    proto.dataReceived(b"\x07_answer\0\x011\0\0")      # AMP after it: an answer to no question
    assert proto.wrong_server is None
    assert proto.transport.disconnecting                # the answer's violation, not ZEO's
