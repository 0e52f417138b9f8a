"""Adversarial checks of the loads whose answer the loading thread reads
itself (zeotwist.client.threadreads; issue 10's review).

A real server on 127.0.0.1 with a FileStorage in a temp dir, blocking
clients on zeotwist's background reactor.  The reactor's 2 ms look at a
parked socket is pushed out of the way (``PARK_CHECK``), so which thread
reads an answer is decided by the test, not by timing.
"""
import threading

import pytest
from ZODB.utils import maxtid, z64

from zeotwist.client import threadreads
from zeotwist.client.threadreads import PARKED
from zeotwist.errors import ClientDisconnected
from zeotwist.twistedcompat import calls_pending
from tests.test_review_races import _commit, _wait_for


@pytest.fixture
def no_park_timer(monkeypatch):
    monkeypatch.setattr(threadreads, "PARK_CHECK", 3600.0)


def _parked(cs, cold_oid):
    """A cold load answered on the reactor: its connection parks; the
    protocol, once nothing is queued for the reactor any more."""
    cs.client.cache.clear()
    cs.loadBefore(cold_oid, maxtid)
    proto, reactor = cs.client.protocol, cs.client.reactor
    _wait_for(lambda: proto.read_state == PARKED and not calls_pending(reactor),
              "the connection parked")
    return proto


def test_a_record_a_reader_stores_after_its_connection_was_replaced_is_verified(
        server, make_client, no_park_timer):
    """The reading thread has its answer (record R current) when the
    connection drops; another client commits a new revision meanwhile (its
    invalidation dies unread with the connection).  The reconnection's
    verification ends every cached revision the new one replaced; a record
    the reader stores after that verification would stay current, stale,
    for good.  The reader's store must come before the verification."""
    writer, reader = make_client(), make_client()
    x, y = writer.new_oid(), writer.new_oid()
    first = _commit(writer, x, z64, b"one")
    _commit(writer, y, z64, b"y")
    reader.ping()                                   # its invalidations are in
    proto = _parked(reader, y)
    lock, cache = proto.send_lock, reader.client.cache
    real_store, seen = cache.store, []

    def store(oid, start, end, data):
        if oid == x and not seen and threading.current_thread().name != "zeotwist-reactor":
            seen.append(data)
            free = lock.acquire(False)      # False: the store runs under the send lock
            if free:
                lock.release()
            _commit(writer, x, first, b"two")       # the invalidation: never read
            reader.client.reactor.callFromThread(proto.transport.abortConnection)
            if free:                        # else the loss waits for this store
                connector = reader.client.connector
                _wait_for(lambda: connector.protocol not in (None, proto),
                          "the reader reconnected and verified its cache")
        real_store(oid, start, end, data)

    cache.store = store
    assert reader.loadBefore(x, maxtid)[0] == b"one"    # read by this thread
    assert seen == [b"one"]
    _wait_for(lambda: reader.client.connector.protocol not in (None, proto), "reconnected")
    reader.ping()
    assert reader.load(x)[0] == b"two"


class Interrupted(BaseException):
    """What a signal handler raises in the reading thread (KeyboardInterrupt, an alarm's)."""


class InterruptedSocket:
    """The reader's socket, whose ``recv`` returns the first ``first``
    bytes (if any), then raises once as a signal handler would while the
    thread waits; after that it reads as the socket does (the next load may
    find the reactor reading, or read itself: both must see the stream
    whole, the bytes already read first)."""

    def __init__(self, sock, first: int):
        self.sock, self.first, self.raised = sock, first, False

    def recv(self, size):
        first, self.first = self.first, 0
        if first:
            return self.sock.recv(first)
        if self.raised:
            return self.sock.recv(size)
        self.raised = True
        raise Interrupted()

    def __getattr__(self, name):
        return getattr(self.sock, name)


@pytest.mark.parametrize("first", [0, 5])
def test_a_reader_interrupted_in_recv_hands_the_socket_back(
        server, make_client, no_park_timer, first):
    """A signal handler raises while the loading thread waits in ``recv``
    (after ``first`` bytes of its answer, or none): the exception reaches
    the caller, and the reactor reads again, the bytes already read first:
    later loads are answered, the interrupted one's answer reaches the
    cache, and invalidations are applied."""
    writer, reader = make_client(), make_client(timeout=10)
    x, y, z = writer.new_oid(), writer.new_oid(), writer.new_oid()
    first_x = _commit(writer, x, z64, b"x1")
    _commit(writer, y, z64, b"y")
    _commit(writer, z, z64, b"z")
    reader.ping()
    proto = _parked(reader, y)
    proto._rsock = InterruptedSocket(proto._rsock, first)
    with pytest.raises(Interrupted):
        reader.loadBefore(x, maxtid)
    assert reader.loadBefore(z, maxtid)[0] == b"z"  # answered: the socket is read
    assert reader.client.cache.loadBefore(x, maxtid)[0] == b"x1"   # the late answer
    second = _commit(writer, x, first_x, b"x2")
    reader.ping()
    assert reader.load(x) == (b"x2", second)


class SilentSocket:
    """The reader's socket as if the server never answered: every ``recv``
    ends by its timeout, which it records."""

    def __init__(self, sock):
        self.sock, self.waits = sock, []

    def recv(self, size):
        self.waits.append(self.sock.gettimeout())
        raise TimeoutError("timed out")

    def __getattr__(self, name):
        return getattr(self.sock, name)


def test_a_reader_never_waits_past_its_timeout(server, make_client, no_park_timer):
    """The storage's ``timeout`` bounds the reader's wait: no ``recv`` of
    the reading thread may wait longer than the time left (a slice of a
    minute in ``recv`` made a 1 s timeout a 60 s one)."""
    writer, reader = make_client(), make_client(timeout=1.0)
    x, y = writer.new_oid(), writer.new_oid()
    _commit(writer, x, z64, b"x")
    _commit(writer, y, z64, b"y")
    reader.ping()
    proto = _parked(reader, y)
    silent = proto._rsock = SilentSocket(proto._rsock)
    with pytest.raises(ClientDisconnected):
        reader.loadBefore(x, maxtid)
    assert silent.waits and max(silent.waits) <= 1.0, silent.waits
    proto._rsock = silent.sock
    reader.ping()                       # the reactor reads again: the answer came
    assert reader.client.cache.loadBefore(x, maxtid)[0] == b"x"
