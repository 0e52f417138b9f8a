"""Blocking loads whose answer the asking thread reads (zeotwist.client.threadreads).

In memory, with a transport whose reading socket returns what the test
scripts: when the reactor stops reading (parks) and takes the socket back
(its own writes, its timer, a hand-over); a reader that gets exactly its
answer stores it and wakes nobody; every other arrival (an invalidation
before or after the answer, another question's answer, a box in pieces,
the end of the connection, a timeout, a connection lost meanwhile) goes
to the reactor untouched and in order.  Live: cold loads against a real
server take this path, and a reader racing committed invalidations never
keeps a stale record (see also test_prefetch's racing writers without
prefetch, which run over this path).
"""
import threading

import pytest
import transaction
import ZODB
from twisted.internet.error import ConnectionLost
from twisted.protocols import amp
from twisted.python.failure import Failure
from ZODB.tests.MinPO import MinPO
from ZODB.utils import maxtid, p64

from zeotwist import twistedcompat
from zeotwist.client import threadreads
from zeotwist.client.cache import ClientCache
from zeotwist.client.reactorthread import background_reactor
from zeotwist.client.threadreads import PARKED, REACTOR, RETURNING, THREAD
from zeotwist.client.threadwrites import ThreadAnswer, ThreadLoad
from zeotwist.errors import ClientDisconnected
from zeotwist.testing import start_server
from zeotwist.wire import commands as C
from zeotwist.wire import commitframes, loadframes, prefetch
from tests.test_thread_loads import OID, TID, Socket, answer, connected

OID2 = p64(2)


class Script:
    """Stands for the reader's socket: ``recv`` returns the scripted
    chunks in turn (a callable is called, an exception raised)."""

    def __init__(self):
        self.chunks, self.shut, self.closed = [], False, False

    def recv(self, size):
        item = self.chunks.pop(0)
        if callable(item):
            item = item()
        if isinstance(item, BaseException):
            raise item
        return item

    def settimeout(self, seconds):
        pass

    def shutdown(self, how):
        self.shut = True

    def close(self):
        self.closed = True


def world():
    """A protocol over a socket transport, with a cache and an event log."""
    proto, sock, owner = connected()
    script, cache, events = Script(), ClientCache(), []
    proto.reading_socket = lambda transport: script
    sock.getHandle = lambda: None
    sock.startReading()                  # as a connected TCP transport does

    def store(oid, start, end, data):
        events.append(("store", oid, start, end))
        cache.store(oid, start, end, data)

    def invalidated(p, tid, oids):
        events.append(("invalidate", tid, list(oids)))
        for oid in oids:
            cache.invalidate(oid, tid)

    owner.invalidated = invalidated
    return proto, sock, owner, script, cache, events, store


def reading(sock) -> bool:
    return sock in sock.reactor.getReaders()


def handed(owner) -> bytes:
    """The bytes of the first call queued for the reactor: a reader's
    hand-back (``_take_back_from``) of what it read."""
    f, (got, then) = owner.queued[0]
    assert f.__name__ == "_take_back_from", f
    return b"".join(p if isinstance(p, bytes) else p.received() for p in got)


def run_queued(owner):
    while owner.queued:
        f, a = owner.queued.pop(0)
        f(*a)


def parked(w):
    """Answer one thread load on the reactor: the socket parks."""
    proto, sock, owner, script, cache, events, store = w
    load = proto.load_before_from_thread(OID2, TID, store)
    assert load is not None and not load.reading          # the reactor reads this one
    proto.dataReceived(answer(load.tag, b"first"))
    assert load.wait(0) == (b"first", p64(3), None)
    assert proto.read_state == PARKED and not reading(sock)
    del events[:]
    return load


def a_thread_reads():
    """:func:`world`, parked, and a thread's load sent: that thread reads."""
    w = world()
    parked(w)
    load = w[0].load_before_from_thread(OID, TID, w[-1])
    assert load.reading
    return w + (load,)


def read_only(proto, load):
    """The reader's part of ``load.wait()`` alone (the test waits later)."""
    load.reading = False
    proto.read_answer(load, 1)


def invalidate(tid, *oids):
    return commitframes.invalidate(tid, oids) or amp.AmpBox(
        C.Invalidate.makeArguments({"tid": tid, "oids": list(oids)}, None)).serialize()


def test_after_a_thread_load_the_reactor_parks_and_the_next_answer_is_read_by_its_thread():
    w = world()
    proto, sock, owner, script, cache, events, store = w
    assert reading(sock) and proto.read_state == REACTOR
    parked(w)
    load = proto.load_before_from_thread(OID, TID, store)
    assert load.reading and proto.read_state == THREAD
    assert sock.sent[-1] == loadframes.load_before_request(load.tag, OID, TID)
    script.chunks = [answer(load.tag)]
    assert load.wait(1) == (b"rec", p64(3), None)
    assert events == [("store", OID, p64(3), None)]
    assert proto.read_state == PARKED and not reading(sock) and owner.queued == []
    assert not twistedcompat.amp_awaits_answers(proto)


def test_an_answer_in_pieces_is_read_whole_by_the_thread():
    proto, sock, owner, script, cache, events, store, load = a_thread_reads()
    frame = answer(load.tag, b"x" * 300)
    script.chunks = [frame[:1], frame[1:20], frame[20:-1], frame[-1:]]
    assert load.wait(1) == (b"x" * 300, p64(3), None)
    assert proto.read_state == PARKED and owner.queued == []


def test_a_missing_record_read_by_the_thread():
    proto, sock, owner, script, cache, events, store, load = a_thread_reads()
    script.chunks = [loadframes.load_before_answer(load.tag, None)]
    assert load.wait(1) is None and events == [] and proto.read_state == PARKED


@pytest.mark.parametrize("order", ["invalidation first", "answer first"])
def test_anything_besides_the_answer_goes_to_the_reactor_in_order(order):
    """An invalidation of the record, before or after the answer in the
    same bytes: the reader consumes neither; the reactor handles both in
    arrival order, so an answer first is ended by the invalidation after it."""
    proto, sock, owner, script, cache, events, store, load = a_thread_reads()
    inval, first = invalidate(p64(5), OID), order == "invalidation first"
    script.chunks = [inval + answer(load.tag) if first else answer(load.tag) + inval]
    read_only(proto, load)
    assert events == [] and proto.read_state == RETURNING
    run_queued(owner)                                # the reactor takes the bytes
    assert load.wait(0) == (b"rec", p64(3), None)
    expected = [("invalidate", p64(5), [OID]), ("store", OID, p64(3), None)]
    assert events == (expected if first else expected[::-1])
    if not first:
        assert cache.loadBefore(OID, maxtid) is None
        assert cache.loadBefore(OID, p64(5)) == (b"rec", p64(3), p64(5))


def test_another_questions_answer_goes_to_the_reactor():
    proto, sock, owner, script, cache, events, store, load = a_thread_reads()
    other = answer(b"t999999")
    script.chunks = [other]
    read_only(proto, load)
    assert proto.read_state == RETURNING and handed(owner) == other
    assert not load.lock.acquire(False)              # still waiting for its answer


def test_a_write_of_the_reactor_takes_the_socket_back():
    w = world()
    proto, sock, owner, script, cache, events, store = w
    parked(w)
    proto.emit(b"question")                          # parked: reading again at once
    assert reading(sock) and proto.read_state == REACTOR
    parked(w)
    load = proto.load_before_from_thread(OID, TID, store)

    def reactor_writes_meanwhile():
        proto.emit(b"question")                      # while the thread reads
        assert not reading(sock)
        return answer(load.tag)

    script.chunks = [reactor_writes_meanwhile]
    assert load.wait(1) == (b"rec", p64(3), None)
    assert proto.read_state == RETURNING            # own answer read, socket handed back
    run_queued(owner)
    assert reading(sock) and proto.read_state == REACTOR


def test_other_questions_of_threads_are_read_by_the_reactor():
    """A thread's vote while parked: sent by the thread, the socket taken
    back for it; a second thread's load while one reads: sent, and the
    reader hands the socket back after its own answer."""
    w = world()
    proto, sock, owner, script, cache, events, store = w
    parked(w)
    vote = ThreadAnswer(proto, b"t1", "Vote", None, None, None)
    assert proto.ask_from_thread(b"vote", vote) is True                 # asks no reading
    assert not vote.reading
    assert sock.sent[-1] == b"vote" and proto.read_state == RETURNING
    run_queued(owner)
    assert proto.read_state == REACTOR and reading(sock)
    proto, sock, owner, script, cache, events, store, load = a_thread_reads()
    second = proto.load_before_from_thread(OID2, TID, store)
    assert second is not None and not second.reading                   # one reader
    script.chunks = [answer(load.tag)]
    assert load.wait(1) == (b"rec", p64(3), None)
    assert proto.read_state == RETURNING
    run_queued(owner)
    proto.dataReceived(answer(second.tag, b"second"))                  # the reactor reads
    assert second.wait(0) == (b"second", p64(3), None)


def test_the_timer_takes_an_idle_parked_socket_back():
    w = world()
    proto, sock, owner, script, cache, events, store = w
    parked(w)
    clock = owner.reactor
    clock.advance(threadreads.PARK_CHECK)            # no thread took it: the reactor reads
    assert proto.read_state == REACTOR and reading(sock)
    assert not clock.getDelayedCalls()


def test_while_a_thread_keeps_reading_the_timer_looks_less_often():
    """A thread that took the parked socket since the timer's last look
    (it reads now, or read and will ask again): the next look comes
    PARK_BUSY later, and the first look that finds no new thread read
    takes the socket back.  (Looks every PARK_CHECK woke the reactor every
    other commit of a committing thread.)"""
    w = world()
    proto, sock, owner, script, cache, events, store = w
    parked(w)
    clock = owner.reactor
    load = proto.load_before_from_thread(OID, TID, store)
    clock.advance(threadreads.PARK_CHECK)            # a thread reads: looked at again later
    assert proto.read_state == THREAD and not reading(sock)
    assert [c.getTime() for c in clock.getDelayedCalls()] == [
        threadreads.PARK_CHECK + threadreads.PARK_BUSY]
    script.chunks = [answer(load.tag)]
    load.wait(1)
    second = proto.load_before_from_thread(OID2, TID, store)     # and again, parked between
    script.chunks = [answer(second.tag)]
    second.wait(1)
    assert proto.read_state == PARKED
    clock.advance(threadreads.PARK_BUSY)             # it took the socket since the last look
    assert proto.read_state == PARKED and not reading(sock)
    clock.advance(threadreads.PARK_BUSY)             # nobody since: the reactor reads
    assert proto.read_state == REACTOR and reading(sock)
    assert not clock.getDelayedCalls()


def test_no_parking_while_a_question_of_the_reactor_is_outstanding():
    w = world()
    proto, sock, owner, script, cache, events, store = w
    proto.call(C.LastTransaction)
    load = proto.load_before_from_thread(OID2, TID, store)
    proto.dataReceived(answer(load.tag))
    assert proto.read_state == REACTOR and reading(sock)


def test_the_end_of_the_connection_goes_to_the_reactor():
    proto, sock, owner, script, cache, events, store, load = a_thread_reads()
    frame = answer(load.tag)
    script.chunks = [frame[:10], b""]                # half an answer, then the end
    read_only(proto, load)
    assert handed(owner) == frame[:10] and proto.read_state == RETURNING
    run_queued(owner)
    assert reading(sock)                             # the reactor meets the end itself
    proto.connectionLost(Failure(ConnectionLost("gone")))
    with pytest.raises(ClientDisconnected):
        load.wait(0)
    assert script.closed


def test_a_connection_lost_while_the_thread_reads_wakes_it_and_fails_the_load():
    proto, sock, owner, script, cache, events, store, load = a_thread_reads()

    def lost():
        proto.connectionLost(Failure(ConnectionLost("gone")))
        assert script.shut and not script.closed     # woken, the reader closes it
        return answer(load.tag)                      # read, but the connection is gone

    script.chunks = [lost]
    with pytest.raises(ClientDisconnected):
        load.wait(1)
    assert script.closed and events == [] and owner.queued == []


def test_a_timed_out_reader_hands_over_and_the_late_answer_still_reaches_the_cache():
    proto, sock, owner, script, cache, events, store, load = a_thread_reads()
    frame = answer(load.tag)
    script.chunks = [frame[:7], TimeoutError()]
    with pytest.raises(TimeoutError):
        load.wait(0)
    assert proto.read_state == RETURNING
    run_queued(owner)
    proto.dataReceived(frame[7:])                    # the reactor reads the rest
    assert events == [("store", OID, p64(3), None)]


def test_the_reading_socket_is_closed_with_the_connection():
    w = world()
    proto, sock, owner, script, cache, events, store = w
    parked(w)
    proto.connectionLost(Failure(ConnectionLost("gone")))
    assert script.closed and not owner.reactor.getDelayedCalls()


def test_an_answer_with_prefetched_records_is_read_by_the_thread():
    proto, sock, owner, script, cache, events, store, load = a_thread_reads()
    records = [(p64(7), b"child", p64(2), None)]
    frame = loadframes.load_before_answer(load.tag, (b"rec", p64(3), None), prefetch.encode(records))
    script.chunks = [frame[:30], frame[30:]]
    assert load.wait(1) == (b"rec", p64(3), None)
    assert owner.prefetched_records == records and events == [("store", OID, p64(3), None)]
    assert proto.read_state == PARKED and owner.queued == []


def test_a_malformed_answer_goes_to_the_reactor_which_drops_the_connection():
    proto, sock, owner, script, cache, events, store, load = a_thread_reads()
    script.chunks = [amp.AmpBox({amp.ANSWER: load.tag, b"found": b"True", b"data": b"x",
                                 b"start": b"short"}).serialize()]
    read_only(proto, load)
    assert proto.read_state == RETURNING and events == []
    run_queued(owner)
    with pytest.raises(ClientDisconnected):
        load.wait(0)
    assert sock.disconnecting or not sock.connected


def test_scan_box():
    frame = answer(b"t1", b"x" * 100)
    assert all(threadreads.scan_box(frame[:i]) == (0, None) for i in range(len(frame)))
    end, box = threadreads.scan_box(frame + frame[:3])
    assert end == len(frame) and box[amp.ANSWER] == b"t1" and box[b"data"] == b"x" * 100
    assert threadreads.scan_box(b"\xff\xff\x00\x04data") == (-1, None)


# -- live ----------------------------------------------------------------------------------

@pytest.fixture
def served(tmp_path):
    srv = start_server(str(tmp_path / "data.fs"))
    yield srv
    srv.stop()


def storage(srv, **kw):
    from zeotwist import ClientStorage
    return ClientStorage(srv.address, reactor=background_reactor(), wait_timeout=10,
                         reference_prefetch=False, **kw)


def populate(srv, n):
    db = ZODB.DB(storage(srv))
    tm = transaction.TransactionManager()
    root = db.open(tm).root()
    for i in range(n):
        root["o%d" % i] = MinPO(0)
    tm.commit()
    oids = [root["o%d" % i]._p_oid for i in range(n)]
    db.close()
    return oids


def counting_reads(monkeypatch):
    from zeotwist.client.protocol import ClientProtocol
    counted, original = [], ClientProtocol.read_answer

    def read_answer(self, waiter, timeout):
        if isinstance(waiter, ThreadLoad):      # not a commit's Vote or Finish
            counted.append(waiter.oid)
        return original(self, waiter, timeout)

    monkeypatch.setattr(ClientProtocol, "read_answer", read_answer)
    return counted


def test_cold_loads_read_their_own_answers(served, monkeypatch):
    oids = populate(served, 30)
    counted = counting_reads(monkeypatch)
    reader = storage(served)
    try:
        fs = served.server.storage
        for oid in oids:
            assert reader.loadBefore(oid, maxtid) == fs.loadBefore(oid, maxtid)
        assert len(counted) >= len(oids) // 2, counted      # the timer may take some back
    finally:
        reader.close()


def test_a_reader_racing_commits_never_keeps_a_stale_record(served, monkeypatch):
    """A writer commits new revisions of the objects a reader keeps
    cold-loading (its cache cleared now and then); at the end, after a
    round trip (every invalidation in), each current record in the
    reader's cache is the server's current one."""
    oids = populate(served, 10)
    counted = counting_reads(monkeypatch)
    reader, writer = storage(served), ZODB.DB(storage(served))
    stop, problems = threading.Event(), []

    def write():
        tm = transaction.TransactionManager()
        root = writer.open(tm).root()
        i = 0
        while not stop.is_set():
            i += 1
            root["o%d" % (i % 10)].value = i
            tm.commit()

    t = threading.Thread(target=write)
    t.start()
    try:
        cache = reader.client.cache
        for n in range(3000):
            if n % len(oids) == 0:
                cache.clear()                        # every load a cold one
            reader.loadBefore(oids[n % len(oids)], maxtid)
    except Exception as e:                           # pragma: no cover - reported below
        problems.append(e)
    finally:
        stop.set()
        t.join(30)
    try:
        assert problems == [] and counted
        reader.ping()                                # every invalidation has arrived
        fs = served.server.storage
        for oid in oids:
            cached = reader.client.cache.loadBefore(oid, maxtid)
            assert cached is None or cached == fs.loadBefore(oid, maxtid)
    finally:
        writer.close()
        reader.close()


def test_a_malformed_answer_to_a_threads_question_wakes_the_thread():
    """A Vote or Finish answer the thread's parser refuses (handled on the
    reactor thread): the connection is dropped and the waiting thread
    raises ClientDisconnected at once, not after its timeout (it waited
    on a lock nobody released)."""
    violations = []

    class Proto:
        def thread_answered(self):
            pass

        def protocolViolation(self, why):
            violations.append(why)

    def parse(box):
        raise ValueError("no tid")

    vote = ThreadAnswer(Proto(), b"t1", "Vote", parse, None, None)
    vote.callback(amp.AmpBox())
    assert violations == ["bad Vote answer: no tid"]
    with pytest.raises(ClientDisconnected):
        vote.wait(0)
