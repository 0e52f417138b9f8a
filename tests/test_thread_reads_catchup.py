"""A client whose socket a loading thread parked (zeotwist.client.threadreads)
handles what the server sent meanwhile before ZODB starts a transaction on
it: ``lastTransaction`` (ZODB's snapshot at every transaction start) reads
what has arrived first.  A real server on 127.0.0.1, blocking clients; the
reactor's own look at a parked socket is pushed out of the way, so the
test, not timing, decides that the socket is still parked."""
import contextlib
import select
import threading

import pytest
from ZODB.utils import z64

from certs import make_pki
from tests.test_review_races import _commit, _wait_for
from tests.test_tls import tls_address, tls_server
from tests.test_review_threadreads import _parked, no_park_timer  # noqa: F401 (fixture)
from zeotwist import ClientStorage
from zeotwist.client.reactorthread import _start_private_reactor, background_reactor
from zeotwist.client.threadreads import PARKED, REACTOR
from zeotwist.testing import start_server


def _arrived(proto) -> bool:
    return bool(select.select([proto._rsock.fileno()], [], [], 0)[0])


def test_a_parked_client_starts_a_transaction_after_what_has_arrived(
        server, make_client, no_park_timer):  # noqa: F811
    writer, reader = make_client(), make_client()
    x, y = writer.new_oid(), writer.new_oid()
    first = _commit(writer, x, z64, b"one")
    _commit(writer, y, z64, b"y")
    reader.ping()
    proto = _parked(reader, y)
    assert reader.load(x)[0] == b"one"      # read by this thread: still parked
    assert proto.read_state == PARKED
    second = _commit(writer, x, first, b"two")
    _wait_for(lambda: _arrived(proto), "the invalidation reached the reader's socket")
    assert proto.read_state == PARKED       # nobody has read it
    assert reader.lastTransaction() == second
    assert reader.load(x)[0] == b"two"      # the invalidation ended the cached revision


def test_nothing_arrived_leaves_the_socket_parked(server, make_client, no_park_timer):  # noqa: F811
    writer, reader = make_client(), make_client()
    y = writer.new_oid()
    tid = _commit(writer, y, z64, b"y")
    reader.ping()
    proto = _parked(reader, y)
    assert reader.lastTransaction() == tid
    assert proto.read_state == PARKED       # no hand-off when nothing came


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(params=["plain", "tls"])
def reader_over(request, pki):
    """How the reader reaches the server: a plain socket, or TLS (the
    reactor reads the socket under the TLS transport)."""
    return request.param == "tls" and pki


@contextlib.contextmanager
def _reader_and_writer(tmp_path, tls=None):
    """A server and a writer on reactors of their own, a reader on the
    background reactor (which the test holds), over TLS with ``tls`` (a
    pki); yields (writer, reader, the reader's reactor, release: the
    Event that lets it go)."""
    server_reactor, writer_reactor = _start_private_reactor(), _start_private_reactor()
    if tls:
        srv = tls_server(tmp_path, tls, reactor=server_reactor)
        address, options = tls_address(srv), dict(tls=dict(ca=str(tls.ca)))
    else:
        srv = start_server(str(tmp_path / "data.fs"), reactor=server_reactor)
        address, options = srv.address, {}
    writer = ClientStorage(srv.address, reactor=writer_reactor, wait_timeout=10)
    reader = ClientStorage(address, reactor=background_reactor(), wait_timeout=10, **options)
    release = threading.Event()
    try:
        yield writer, reader, background_reactor(), release
    finally:
        release.set()
        for cs in (reader, writer):
            cs.close()
        srv.stop()
        for r in (server_reactor, writer_reactor):
            r.callFromThread(r.stop)


def _last_transaction_released_when_asked(reader, reactor, release) -> bytes:
    """``reader.lastTransaction()`` while the reactor is held: the hold is
    released only once the reader's thread has asked the reactor for a turn
    (or when the call has returned, too early: the test's assertion fails)."""
    queued = len(reactor.threadCallQueue)
    releaser = threading.Thread(target=lambda: (_wait_for(
        lambda: len(reactor.threadCallQueue) > queued or release.is_set(),
        "the reader asks for a turn"), release.set()), daemon=True)
    releaser.start()
    try:
        return reader.lastTransaction()
    finally:
        release.set()
        releaser.join(30)


def _reading_and_loaded(writer, reader):
    x = writer.new_oid()
    first = _commit(writer, x, z64, b"one")
    reader.ping()
    assert reader.load(x)[0] == b"one"
    proto = reader._client.connector.protocol
    _wait_for(lambda: proto.read_state == REACTOR, "the reactor reads the reader's socket")
    return x, first, proto


def test_a_transaction_starts_after_what_the_busy_reactor_has_not_read(tmp_path, reader_over):
    """The reactor reads the socket (not parked) but has not got to what
    arrived: a thread that starts a transaction (a committer elsewhere told
    it of its commit) waits for the reactor's next turn instead of starting
    behind.  The reader's reactor is held busy by the test."""
    with _reader_and_writer(tmp_path, reader_over) as (writer, reader, reactor, release):
        x, first, proto = _reading_and_loaded(writer, reader)
        busy = threading.Event()
        reactor.callFromThread(lambda: (busy.set(), release.wait(60)))
        assert busy.wait(30)
        second = _commit(writer, x, first, b"two")
        _wait_for(lambda: _arrived_on(proto), "the invalidation reached the reader's socket")
        assert _last_transaction_released_when_asked(reader, reactor, release) == second
        assert reader.load(x)[0] == b"two"


def _arrived_on(proto) -> bool:
    transport = proto.transport
    transport = getattr(transport, "transport", transport)     # the socket's, under TLS
    fd = transport.getHandle().fileno()
    return bool(select.select([fd], [], [], 0)[0])


def test_a_transaction_starts_after_what_the_reactor_has_read_but_not_handled(
        tmp_path, reader_over):
    """The reactor has taken the invalidation out of the socket (its
    ``recv`` gives up the GIL) but not handled it yet: the socket is empty,
    and a thread starting a transaction must still wait for it.  The test
    holds the reader's reactor inside the reader's ``dataReceived``, between
    the read and the handling."""
    with _reader_and_writer(tmp_path, reader_over) as (writer, reader, reactor, release):
        x, first, proto = _reading_and_loaded(writer, reader)
        inside, handle = threading.Event(), proto.dataReceived

        def held(data):                     # read, not handled: the socket is empty
            proto.dataReceived = handle
            inside.set()
            release.wait(60)
            handle(data)

        proto.dataReceived = held
        second = _commit(writer, x, first, b"two")
        assert inside.wait(30)
        assert not _arrived_on(proto)
        assert _last_transaction_released_when_asked(reader, reactor, release) == second
        assert reader.load(x)[0] == b"two"
