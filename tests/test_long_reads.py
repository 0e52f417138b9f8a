"""Big records read by the loading thread into their own bytes object
(zeotwist.client.longreads).

In memory, over a reading socket that behaves as a stream (``recv(n)``
and ``recv_into`` take at most what the test delivered, in the pieces it
delivered them): a 10 MB record split across many reads arrives whole,
without the reactor, and the reader takes no byte past its answer; a
connection lost, or a signal, mid-record hands every byte read to the
reactor in order and caches nothing; a record announced over the box limit
is left to the reactor, which refuses it.  The cache makes room for a big
record before it arrives.  The reactor's parser, on the client, writes a
long value into its own object too (every cut of the bytes; a connection
lost midway caches nothing), and reads the rest of it straight from the
socket; the server's keeps pieces of what came (a client's announced size
takes no memory).  Live: cold loads of big records against a real server
take these paths.
"""
import os

import pytest
import transaction
import ZODB
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from ZODB.tests.MinPO import MinPO
from ZODB.utils import maxtid, p64

from zeotwist import transportcompat
from zeotwist.client.cache import ENTRY_OVERHEAD, ClientCache
from zeotwist.client.longreads import ValueBuffer
from zeotwist.client.threadreads import PARKED, RETURNING
from zeotwist.errors import ClientDisconnected
from zeotwist.wire import commitframes, loadframes, prefetch
from zeotwist.server.session import ServerSession
from tests.test_long_entries import BIG, END, START, Receiver
from tests.test_thread_loads import OID, TID, connected
from tests.test_thread_reads import (  # noqa: F401 (served: a fixture)
    handed, invalidate, parked, read_only, run_queued, served, storage, world)

MB = 10**6
RECORD = os.urandom(10 * MB)


class Stream:
    """The reader's socket as a stream: ``pieces`` are what arrived, in
    turn; a read takes at most one piece's bytes (and at most what it asks),
    leaving the rest of that piece for the next read.  An exception in
    ``pieces`` is raised, ``b""`` is the connection's end."""

    def __init__(self, *pieces):
        self.pieces, self.reads = list(pieces), []

    def _next(self, size):
        item = self.pieces[0]
        if isinstance(item, BaseException):
            self.pieces.pop(0)
            raise item
        taken, rest = item[:size], item[size:]
        if rest:
            self.pieces[0] = rest
        else:
            self.pieces.pop(0)
        return taken

    def recv(self, size):
        data = self._next(size)
        self.reads.append(("recv", len(data)))
        return data

    def recv_into(self, view):
        data = self._next(len(view))
        view[:len(data)] = data
        self.reads.append(("recv_into", len(data)))
        return len(data)

    def settimeout(self, seconds):
        pass

    def shutdown(self, how):
        pass

    def close(self):
        pass

    def left(self) -> bytes:
        return b"".join(p for p in self.pieces if isinstance(p, bytes))


def big_answer(tag, data=RECORD, end=None):
    return loadframes.load_before_answer(tag, (data, p64(3), end), long_values=True)


def thread_load(stream, make_room=None):
    """A parked world whose next load is read by its thread from ``stream``."""
    proto, sock, owner, script, cache, events, store = w = world()
    parked(w)
    proto.reading_socket = lambda transport: stream
    proto._rsock = stream
    load = proto.load_before_from_thread(OID, TID, store, make_room)
    assert load.reading
    return proto, owner, cache, events, load


def cuts(frame: bytes, sizes) -> list:
    """``frame`` in pieces of the given sizes, in turn, the last piece
    taking what is left."""
    pieces, at = [], 0
    for size in sizes:
        pieces.append(frame[at:at + size])
        at += size
    return pieces + [frame[at:]]


@pytest.mark.parametrize("end", [None, p64(7)])
def test_a_10mb_record_split_across_many_reads_is_read_by_the_thread_into_one_object(end):
    proto, owner, cache, events, load = thread_load(None)
    frame = big_answer(load.tag, end=end)
    head = len(frame) - len(RECORD) - (36 if end is None else 51)
    # the head cut inside its tag and length, the record in 4093-byte
    # pieces and one byte, the tail byte by byte
    sizes = [1, 12, head - 13 + 100] + [4093] * 2000 + [1] * 60
    proto._rsock = stream = Stream(*cuts(frame, sizes))
    assert load.wait(1) == (RECORD, p64(3), end)
    assert stream.pieces == [] and owner.queued == []      # no byte for the reactor
    assert sum(1 for how, n in stream.reads if how == "recv_into") > 2000
    assert proto.read_state == PARKED
    found = cache.loadBefore(OID, maxtid if end is None else end)
    assert found[0] == RECORD
    assert found[0] is load.result[0]                      # one object: no copy kept


def test_a_big_record_with_records_prefetched_beside_it():
    """A record over 64 KiB (not over 1 MiB, which the server scans for
    references) may carry a ``prefetch`` value of up to 65,000 bytes in
    its tail: the thread reads it too and caches those records first."""
    proto, owner, cache, events, load = thread_load(None)
    record, near = RECORD[:300_000], [(p64(40 + i), bytes(6400), p64(3), None) for i in range(10)]
    frame = loadframes.load_before_answer(load.tag, (record, p64(3), p64(7)),
                                    prefetch.encode(near), long_values=True)
    proto._rsock = stream = Stream(*cuts(frame, [5000] * 60))
    assert load.wait(1) == (record, p64(3), p64(7))
    assert stream.pieces == [] and owner.queued == []
    assert owner.prefetched_records == near


def test_the_reader_takes_no_byte_past_its_big_answer():
    """What follows the answer in the same arrival (an invalidation of the
    record) stays in the socket for the reactor."""
    proto, owner, cache, events, load = thread_load(None)
    after = invalidate(p64(5), OID)
    proto._rsock = stream = Stream(big_answer(load.tag) + after)
    assert load.wait(1)[0] == RECORD
    assert stream.left() == after and owner.queued == []
    assert events == [("store", OID, p64(3), None)]


@pytest.mark.parametrize("cut", [30, 5 * MB])
def test_a_connection_lost_mid_record_fails_the_load_and_caches_nothing(cut):
    proto, owner, cache, events, load = thread_load(None)
    frame = big_answer(load.tag)
    proto._rsock = Stream(frame[:cut // 2], frame[cut // 2:cut], b"")
    read_only(proto, load)
    assert proto.read_state == RETURNING
    assert handed(owner) == frame[:cut]       # every byte read, for the reactor
    run_queued(owner)
    proto.connectionLost(Failure(ConnectionLost("gone")))
    with pytest.raises(ClientDisconnected):
        load.wait(0)
    assert events == [] and cache.loadBefore(OID, maxtid) is None


def test_a_signal_mid_record_hands_what_came_to_the_reactor_which_reads_the_rest():
    proto, owner, cache, events, load = thread_load(None)
    frame = big_answer(load.tag)
    proto._rsock = Stream(frame[:4 * MB], frame[4 * MB:6 * MB], KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        read_only(proto, load)
    assert handed(owner) == frame[:6 * MB]
    run_queued(owner)
    assert events == []
    proto.dataReceived(frame[6 * MB:])                # the reactor reads the rest
    assert load.wait(0) == (RECORD, p64(3), None)
    assert cache.loadBefore(OID, maxtid)[0] == RECORD


def test_a_record_announced_over_the_box_limit_is_refused_not_read():
    proto, owner, cache, events, load = thread_load(None)
    proto.maxBoxBytes = 4 * MB                         # the connection's limit
    frame = big_answer(load.tag)
    proto._rsock = stream = Stream(frame[:100], frame[100:])
    read_only(proto, load)
    assert stream.left() == frame[100:]                # not one byte of it read
    assert handed(owner) == frame[:100]
    run_queued(owner)                                  # the reactor's parser refuses it
    assert proto._violated
    proto.connectionLost(Failure(ConnectionLost("aborted")))   # what the abort brings
    with pytest.raises(ClientDisconnected):
        load.wait(0)
    assert events == [] and cache.loadBefore(OID, maxtid) is None


def test_another_questions_big_answer_goes_to_the_reactor():
    proto, owner, cache, events, load = thread_load(None)
    frame = big_answer(b"t999999")
    proto._rsock = stream = Stream(frame[:1000], frame[1000:])
    read_only(proto, load)
    assert handed(owner) == frame[:1000] and stream.left() == frame[1000:]


def test_the_cache_makes_room_for_a_big_record_before_it_arrives():
    cache = ClientCache(size=25 * MB)
    for i in range(2):
        cache.store(p64(10 + i), p64(1), None, bytes(10 * MB))
    cache.make_room(4 * MB)                            # fits beside both
    assert len(cache) == 2
    cache.make_room(10 * MB)                           # the least recently used goes
    assert len(cache) == 1 and cache.loadBefore(p64(10), maxtid) is None
    assert cache.stats()["bytes"] == 10 * MB + ENTRY_OVERHEAD
    made = []
    proto, owner, cache, events, load = thread_load(None, made.append)
    proto._rsock = Stream(big_answer(load.tag))
    load.wait(1)
    assert made == [len(RECORD)]


def test_live_cold_loads_of_big_records_are_read_into_their_own_objects(served, monkeypatch):
    """Whoever reads each answer (the loading thread, or the reactor when
    its park timer took the socket back), the record is written into one
    object of its size."""
    made = []
    real = ValueBuffer.__init__

    def counting(self, size):
        made.append(size)
        real(self, size)

    monkeypatch.setattr(ValueBuffer, "__init__", counting)
    records = [os.urandom(3 * MB) + bytes([i]) for i in range(4)]
    db = ZODB.DB(storage(served))
    try:
        tm = transaction.TransactionManager()
        root = db.open(tm).root()
        for i, record in enumerate(records):
            root[i] = MinPO(record)
            tm.commit()
        oids = [root[i]._p_oid for i in range(len(records))]
    finally:
        db.close()
    del made[:]
    reader = storage(served)
    try:
        fs = served.server.storage
        for oid in oids:
            assert reader.loadBefore(oid, maxtid) == fs.loadBefore(oid, maxtid)
    finally:
        reader.close()
    assert len(made) == len(records) and min(made) > 3 * MB, made


# -- the reactor's parser ------------------------------------------------------------

class ClientReceiver(Receiver):
    long_buffer = ValueBuffer


@pytest.mark.parametrize("cut", [1, 7, 4096, 65536, 10**9])
def test_the_clients_parser_writes_a_long_value_into_its_own_object_at_every_cut(cut):
    frame = loadframes.load_before_answer(b"1", (BIG, START, END), long_values=True) * 2
    r, buffers = ClientReceiver(), []
    for off in range(0, len(frame), cut):
        r.dataReceived(frame[off:off + cut])
        if r._long is not None:
            buffers.append(r._long[2])
    assert [box[b"data"] for box in r.boxes] == [BIG, BIG] and r.violations == []
    assert all(type(b) is ValueBuffer for b in buffers)
    if cut < len(BIG):                                  # (else each came whole)
        assert {id(b.value()) for b in buffers} == {id(box[b"data"]) for box in r.boxes}


def test_the_servers_parser_keeps_only_what_came_of_an_announced_value():
    assert ServerSession.long_buffer is None and Receiver.long_buffer is None
    r = Receiver()
    r.dataReceived(commitframes.store_data(bytes(3 * 2**20), long_values=True)[:1000])
    pieces = r._long[2]
    assert type(pieces) is list and sum(len(p) for p in pieces) < 1000


def test_a_connection_lost_midway_through_the_reactors_read_caches_nothing():
    proto, sock, owner = connected()
    made = []
    load = proto.load_before_from_thread(OID, TID, lambda *a: made.append(a))
    assert not load.reading                             # the reactor reads this one
    proto.dataReceived(big_answer(load.tag)[:5 * MB])
    assert type(proto._long[2]) is ValueBuffer
    proto.connectionLost(Failure(ConnectionLost("gone")))
    with pytest.raises(ClientDisconnected):
        load.wait(0)
    assert made == []


def test_live_the_reactor_reads_the_rest_of_a_big_record_from_the_socket(served, monkeypatch):
    """A load through the Deferred API (the reactor reads its answer): the
    record's bytes after the first read come straight from the socket."""
    taken = []
    real = transportcompat.read_into

    def counting(transport, view):
        n = real(transport, view)
        taken.append(n)
        return n

    monkeypatch.setattr(transportcompat, "read_into", counting)
    record = os.urandom(3 * MB)
    db = ZODB.DB(storage(served))
    try:
        tm = transaction.TransactionManager()
        root = db.open(tm).root()
        root["big"] = MinPO(record)
        tm.commit()
        oid = root["big"]._p_oid
    finally:
        db.close()
    reader = storage(served)
    try:
        from zeotwist.client.reactorthread import blocking_call
        client = reader.client
        got = blocking_call(client.reactor, client.load_before, oid, maxtid, timeout=10)
        assert got == served.server.storage.loadBefore(oid, maxtid)
    finally:
        reader.close()
    assert sum(taken) > MB, taken
