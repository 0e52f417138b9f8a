"""A ZEO/zeotwist mix-up is diagnosed (issue 13, item 5).

* A zeotwist client pointed at a real ZEO server raises, within seconds,
  an error saying that it is a ZEO server (recognised from the protocol
  announcement a ZEO server sends first).
* A real ZEO client pointed at a zeotwist server sends nothing (it waits
  for a ZEO server's announcement): the server's handshake-timeout line
  says so.
* The first-bytes rule on its own, in memory.
"""
import re
import time

import pytest
from twisted.logger import globalLogPublisher

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
    start = time.monotonic()
    with pytest.raises(WrongServer) as info:
        ClientStorage(zeo_server, reactor=background_reactor(), wait_timeout=20)
    took = time.monotonic() - start
    text = str(info.value)
    assert re.search(r"is a ZEO server \(it announced ZEO protocol [MZ]5\)", text), text
    assert "%s:%d" % zeo_server in text
    assert took < 3                 # at once, not after wait_timeout


def test_zeo_client_at_a_zeotwist_server_is_named_in_the_log(tmp_path):
    import ZEO
    lines = []

    def observe(event):
        if "protocol violation" in (event.get("log_format") or ""):
            lines.append(event)

    server = start_server(str(tmp_path / "data.fs"), handshake_timeout=0.3)
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
    why = lines[0]["why"]
    assert why.startswith("no handshake within 0.3 s; not one byte received: a ZEO client?")


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
