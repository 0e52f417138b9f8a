"""Blocking loads sent by the application's thread (zeotwist.client.threadwrites).

In memory, with a transport whose socket takes what the test says: the
frame of a load asked from another thread, and its rest when the socket
took only part of it, stay in order with the reactor's own writes; the
conditions under which the thread must leave the sending to the reactor;
a lost connection fails the waiting load.  Against a live server: cold
loads from the application's thread take this path, get the right records
into the cache, and fall back to the reactor when a prefetch of the same
revision is in flight.
"""
import threading

import pytest
import transaction
import ZODB
from twisted.internet import abstract
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols import amp
from twisted.python.failure import Failure
from ZODB.tests.MinPO import MinPO
from ZODB.utils import maxtid, p64

from zeotwist.client.protocol import ClientProtocol
from zeotwist.client.reactorthread import background_reactor
from zeotwist.errors import ClientDisconnected
from zeotwist.testing import Recorder, start_server
from zeotwist.wire import loadframes

OID, TID = p64(1), p64(9)


class Socket(abstract.FileDescriptor):
    """A transport whose socket takes at most ``room`` bytes per send."""

    def __init__(self):
        super().__init__(reactor=MemoryReactorClock())
        self.connected, self._writeDisconnected = True, False
        self.room = 10**9
        self.sent = []

    def writeSomeData(self, data):
        taken = bytes(data[:self.room])
        self.sent.append(taken)
        return len(taken)

    @property
    def socket(self):
        """What a thread's frame is sent to (transportcompat.socket_send)."""
        return self

    def send(self, data):
        return self.writeSomeData(data)

    def flush(self):
        """The reactor's doWrite, until nothing is left."""
        while self.dataBuffer or self._tempDataBuffer:
            self.doWrite()


class Owner(Recorder):
    def __init__(self):
        super().__init__()
        self.reactor = MemoryReactorClock()
        self.reactor.callFromThread = lambda f, *a: self.queued.append((f, a))
        self.queued = []


def connected():
    owner = Owner()
    proto, sock = ClientProtocol(owner), Socket()
    proto.makeConnection(sock)
    return proto, sock, owner


def stored():
    records = []
    return records, lambda oid, start, end, data: records.append((oid, start, end, data))


def answer(tag, data=b"rec", start=p64(3)):
    return loadframes.load_before_answer(tag, (data, start, None))


def test_a_thread_load_is_written_by_the_thread_and_answered_without_the_reactor_queue():
    proto, sock, owner = connected()
    records, store = stored()
    load = proto.load_before_from_thread(OID, TID, store)
    assert load is not None and owner.queued == []
    assert sock.sent == [loadframes.load_before_request(load.tag, OID, TID)]
    assert load.tag.startswith(b"t")                    # never one of AMP's own tags
    proto.dataReceived(answer(load.tag))
    assert load.wait(0) == (b"rec", p64(3), None)
    assert records == [(OID, p64(3), None, b"rec")]     # stored before the waiter woke


def test_the_rest_of_a_partly_sent_frame_goes_before_later_writes():
    proto, sock, owner = connected()
    sock.room = 5
    load = proto.load_before_from_thread(OID, TID, stored()[1])
    frame = loadframes.load_before_request(load.tag, OID, TID)
    assert sock.sent == [frame[:5]] and len(owner.queued) == 1
    sock.room = 10**9
    proto.emit(b"LATER")                                  # the reactor writes meanwhile
    assert sock.sent == [frame[:5]]                       # queued behind the rest
    assert proto.load_before_from_thread(OID, TID, stored()[1]) is None   # none overtakes it
    f, a = owner.queued.pop()
    f(*a)
    sock.flush()
    assert b"".join(sock.sent) == frame + b"LATER"


def test_a_thread_leaves_the_sending_to_the_reactor_when_bytes_wait():
    proto, sock, owner = connected()
    sock.room = 0
    proto.emit(b"queued")                                 # the socket took none of it
    assert proto.load_before_from_thread(OID, TID, stored()[1]) is None
    sock.room = 10**9
    sock.flush()
    assert proto.load_before_from_thread(OID, TID, stored()[1]) is not None


def test_no_thread_load_over_a_transport_without_a_socket_or_after_the_loss():
    proto = ClientProtocol(Owner())
    proto.makeConnection(_Plain())
    assert proto.load_before_from_thread(OID, TID, stored()[1]) is None
    proto, sock, owner = connected()
    proto.connectionLost(Failure(ConnectionLost("gone")))
    assert proto.load_before_from_thread(OID, TID, stored()[1]) is None


def test_a_lost_connection_fails_the_waiting_load():
    proto, sock, owner = connected()
    load = proto.load_before_from_thread(OID, TID, stored()[1])
    proto.connectionLost(Failure(ConnectionLost("gone")))
    with pytest.raises(ClientDisconnected):
        load.wait(0)


def test_a_bad_answer_fails_the_load_and_drops_the_connection():
    proto, sock, owner = connected()
    load = proto.load_before_from_thread(OID, TID, stored()[1])
    proto.dataReceived(amp.AmpBox({amp.ANSWER: load.tag, b"found": b"True",
                                   b"data": b"x", b"start": b"short"}).serialize())
    with pytest.raises(ClientDisconnected):
        load.wait(0)
    assert sock.disconnecting or not sock.connected


class _Plain:
    """A transport with no socket of its own (as TLS's, or iosim's)."""
    disconnecting = False

    def write(self, data):
        pass

    def loseConnection(self):
        pass

    abortConnection = loseConnection

    def getPeer(self):
        return None

    def getHost(self):
        return None


# -- live ----------------------------------------------------------------------------------

@pytest.fixture
def served(tmp_path):
    srv = start_server(str(tmp_path / "data.fs"))
    from zeotwist import ClientStorage
    writer = ClientStorage(srv.address, reactor=background_reactor(), wait_timeout=10)
    db = ZODB.DB(writer)
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    root = conn.root()
    for i in range(20):
        root["o%d" % i] = MinPO(i)
    tm.commit()
    oids = [root["o%d" % i]._p_oid for i in range(20)]
    conn.close()
    db.close()
    yield srv, oids
    srv.stop()


@pytest.fixture
def reader(served):
    """A blocking client of ``served`` (reference prefetch off: one request per load)."""
    from zeotwist import ClientStorage
    srv, oids = served
    storage = ClientStorage(srv.address, reactor=background_reactor(), wait_timeout=10,
                            reference_prefetch=False)
    yield storage
    storage.close()


def test_cold_loads_from_the_application_thread_send_it_themselves(served, reader, monkeypatch):
    from zeotwist.client import client as client_module
    srv, oids = served
    sent = []
    original = client_module.Client.load_from_thread

    def counted(self, oid, tid):
        load = original(self, oid, tid)
        sent.append(load is not None)
        return load

    monkeypatch.setattr(client_module.Client, "load_from_thread", counted)
    fs = srv.server.storage
    for oid in oids:
        assert reader.loadBefore(oid, maxtid) == fs.loadBefore(oid, maxtid)
    assert sent == [True] * len(oids)
    for oid in oids:                                     # now from the cache
        assert reader.client.cache.loadBefore(oid, maxtid) == fs.loadBefore(oid, maxtid)


def test_a_load_of_a_revision_being_prefetched_waits_for_that_answer(served, reader):
    srv, oids = served
    stats = srv.server.stats
    before = stats["loads"]
    reader.prefetch(oids, maxtid)
    for oid in oids:
        reader.loadBefore(oid, maxtid)
    assert stats["loads"] - before == len(oids)      # nothing asked twice


def test_loads_from_many_threads_at_once(served, reader):
    srv, oids = served
    fs, errors = srv.server.storage, []

    def read(k):
        try:
            for i in range(200):
                oid = oids[(i + k) % len(oids)]
                if i % 50 == 49:
                    reader.client.cache.clear()
                assert reader.loadBefore(oid, maxtid) == fs.loadBefore(oid, maxtid)
        except Exception as e:          # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=read, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and not any(t.is_alive() for t in threads)


def test_the_bench_counts_loads_the_thread_sent_as_round_trips(served, reader):
    from zeotwist.bench.reads import LoadCounter
    srv, oids = served
    counter = LoadCounter("zeotwist", reader)
    for oid in oids[:5]:
        reader.loadBefore(oid, maxtid)
    reader.loadBefore(oids[0], maxtid)                 # from the cache
    assert counter.snapshot() == (6, 5)
