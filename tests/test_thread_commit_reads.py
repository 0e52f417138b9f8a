"""A small commit's Vote and Finish answers read by the committing thread
(zeotwist.client.threadreads, ClientTransaction.vote_from_thread and
finish_from_thread).

In memory, over test_thread_reads' scripted reading socket: on a parked
socket the committing thread reads its plain Vote and Finish answers
itself and wakes nobody; the Finish makes the commit visible in that
thread (cache refreshed, ZODB's callback under the visibility lock, the
last tid) and the second stage of its event runs on the reactor thread
before any later box.  Every other arrival (the answer in pieces, an
invalidation before the answer, a conflict, the end of the connection, a
connection lost while reading, a timeout) goes to the reactor untouched
and in order.  Live: commits through ZODB take this path and a reader
racing them sees every commit in order.
"""
import threading

import pytest
import transaction
import ZODB
from twisted.internet.error import ConnectionLost
from twisted.protocols import amp
from twisted.python.failure import Failure
from ZODB.Connection import TransactionMetaData
from ZODB.POSException import ConflictError
from ZODB.tests.MinPO import MinPO
from ZODB.utils import p64

from zeotwist.client import threadreads
from zeotwist.client.client import Client
from zeotwist.client.threadreads import PARKED, REACTOR, RETURNING
from zeotwist.client.threadwrites import ThreadAnswer
from zeotwist.client.transaction import ClientTransaction
from zeotwist.errors import ClientDisconnected
from zeotwist.wire import commands as C
from zeotwist.wire import commitframes
from tests.test_thread_loads import OID
from tests.test_thread_reads import handed, invalidate, parked, run_queued, served, storage, world

TID1, TID2 = p64(0x20), p64(0x30)
assert served       # the live fixture


class Committing:
    """:func:`world` parked, a real Client on its protocol, and a
    ClientTransaction that changed OID: ``vote()`` sends its Vote from
    this thread."""

    def __init__(self):
        w = world()
        self.proto, self.sock, self.owner, self.script, _, self.events, _ = w
        parked(w)
        self.owner.reactor.threadCallQueue = self.owner.queued     # calls_pending
        self.client = Client(self.owner.reactor, None)
        self.client.connector.protocol = self.proto
        self.visible = []
        self.client.events.subscribe(lambda e: self.visible.append(("early", e.tid)),
                                     before_visible=True, any_thread=True)
        self.txn = ClientTransaction(self.client, TransactionMetaData())
        self.txn.store(OID, p64(1), b"new")

    def vote(self):
        answer = self.txn.vote_from_thread()
        assert answer is not None
        return answer

    def finish(self):
        def callback(tid):
            self.visible.append(("zodb", tid, self.client.visibility_lock._is_owned()))
        answer = self.txn.finish_from_thread(callback)
        assert answer is not None
        return answer

    def committed(self):
        """Vote and Finish (TID1), both answers read by this thread."""
        self.voted()
        finish = self.finish()
        self.script.chunks = [commitframes.finish_answer(finish.tag, TID1)]
        assert finish.wait(1) == TID1

    def voted(self):
        """Vote, answered by this thread: the socket is parked again."""
        vote = self.vote()
        self.script.chunks = [commitframes.vote_answer(vote.tag, [])]
        assert vote.wait(1) == [] and self.proto.read_state == PARKED
        return vote


def test_the_committing_thread_reads_its_vote_and_finish_answers():
    c = Committing()
    vote = c.vote()
    assert vote.reading
    c.script.chunks = [commitframes.vote_answer(vote.tag, [])]
    assert vote.wait(1) == []
    assert c.proto.read_state == PARKED and c.owner.queued == []
    finish = c.finish()
    assert finish.reading
    c.script.chunks = [commitframes.finish_answer(finish.tag, TID1)]
    assert finish.wait(1) == TID1
    assert c.proto.read_state == PARKED and c.owner.queued == []     # no reactor turn
    # visible here: the cache refreshed, ZODB's callback under the lock, the last tid
    assert c.visible == [("zodb", TID1, True), ("early", TID1)]
    assert c.client.cache.load(OID) == (b"new", TID1)
    assert c.client.last_transaction() == TID1


def test_the_second_stage_of_the_commit_runs_on_the_reactor_before_the_next_box():
    c = Committing()
    seen = []
    c.client.events.subscribe(lambda e: seen.append(e.tid))
    c.voted()
    finish = c.finish()
    c.script.chunks = [commitframes.finish_answer(finish.tag, TID1)]
    assert finish.wait(1) == TID1 and seen == []
    assert [f.__name__ for f, a in c.owner.queued] == ["publish_pending"]   # someone listens
    c.proto.dataReceived(invalidate(TID2, OID))     # the reactor reads before that call ran
    assert seen == [TID1] and c.client.events.last.tid == TID1
    assert c.events == [("invalidate", TID2, [OID])]
    run_queued(c.owner)
    assert seen == [TID1]                           # once


def test_without_listeners_the_second_stage_waits_for_the_park_timer():
    c = Committing()
    c.committed()
    assert c.owner.queued == [] and c.client.events.last is None
    c.owner.reactor.advance(threadreads.PARK_CHECK)
    assert c.client.events.last.tid == TID1


def test_a_vote_answer_in_pieces_is_read_whole():
    c = Committing()
    vote = c.vote()
    frame = commitframes.vote_answer(vote.tag, [OID])
    c.script.chunks = [frame[:1], frame[1:9], frame[9:-1], frame[-1:]]
    assert vote.wait(1) == [] and c.txn.resolved == [OID]
    assert c.proto.read_state == PARKED and c.owner.queued == []


def test_an_invalidation_before_the_vote_answer_goes_to_the_reactor_first():
    c = Committing()
    vote = c.vote()
    c.script.chunks = [invalidate(TID1, OID) + commitframes.vote_answer(vote.tag, [])]
    vote.proto.read_answer(vote, 1)
    vote.reading = False
    assert c.proto.read_state == RETURNING and c.events == []
    run_queued(c.owner)
    assert c.events == [("invalidate", TID1, [OID])]
    assert vote.wait(0) == []


def test_an_invalidation_before_the_finish_answer_is_applied_first():
    c = Committing()
    c.owner.invalidated = lambda p, tid, oids: c.client.apply_invalidation(tid, oids)
    c.voted()
    finish = c.finish()
    c.script.chunks = [invalidate(TID1, p64(5)), commitframes.finish_answer(finish.tag, TID2)]
    c.proto.read_answer(finish, 1)              # the invalidation alone: handed over
    finish.reading = False
    assert c.proto.read_state == RETURNING and c.visible == []
    run_queued(c.owner)
    assert c.visible == [("early", TID1)] and c.client.last_transaction() == TID1
    c.proto.dataReceived(commitframes.finish_answer(finish.tag, TID2))     # the reactor reads it
    assert finish.wait(0) == TID2
    assert c.visible == [("early", TID1), ("zodb", TID2, True), ("early", TID2)]
    assert c.client.last_transaction() == TID2


def test_a_conflict_answer_goes_to_the_reactor():
    c = Committing()
    vote = c.vote()
    box = amp.AmpBox(C.Vote.makeResponse(
        {"resolved": [], "conflicts": OID + p64(3) + p64(1)}, None))
    box[amp.ANSWER] = vote.tag
    c.script.chunks = [box.serialize()]
    c.proto.read_answer(vote, 1)
    vote.reading = False
    assert c.proto.read_state == RETURNING
    run_queued(c.owner)                         # the reactor parses it
    with pytest.raises(ConflictError):
        vote.wait(0)


def test_the_end_of_the_connection_during_the_finish_fails_it():
    c = Committing()
    c.voted()
    finish = c.finish()
    frame = commitframes.finish_answer(finish.tag, TID1)
    c.script.chunks = [frame[:5], b""]
    c.proto.read_answer(finish, 1)
    finish.reading = False
    assert handed(c.owner) == frame[:5]
    run_queued(c.owner)
    c.proto.connectionLost(Failure(ConnectionLost("gone")))
    with pytest.raises(ClientDisconnected):
        finish.wait(0)
    assert c.client.last_transaction() != TID1 and c.visible == []


def test_a_connection_lost_while_the_thread_reads_the_vote_fails_it():
    c = Committing()
    vote = c.vote()

    def lost():
        c.proto.connectionLost(Failure(ConnectionLost("gone")))
        return commitframes.vote_answer(vote.tag, [])       # read, but the connection is gone

    c.script.chunks = [lost]
    with pytest.raises(ClientDisconnected):
        vote.wait(1)
    assert c.script.closed and c.owner.queued == []


def test_a_connection_lost_while_the_thread_reads_the_finish_leaves_the_cache_alone():
    c = Committing()
    c.voted()
    finish = c.finish()

    def lost():
        c.proto.connectionLost(Failure(ConnectionLost("gone")))
        return commitframes.finish_answer(finish.tag, TID1)

    c.script.chunks = [lost]
    with pytest.raises(ClientDisconnected):
        finish.wait(1)
    assert c.visible == [] and c.client.cache.load(OID) is None


def test_a_finish_answered_after_the_timeout_still_reaches_the_cache():
    c = Committing()
    c.voted()
    finish = c.finish()
    frame = commitframes.finish_answer(finish.tag, TID1)
    c.script.chunks = [frame[:7], TimeoutError()]
    with pytest.raises(TimeoutError):
        finish.wait(0)
    assert c.proto.read_state == RETURNING and c.visible == []
    run_queued(c.owner)
    c.proto.dataReceived(frame[7:])                 # the reactor reads the rest
    assert c.visible == [("zodb", TID1, True), ("early", TID1)]
    assert c.client.cache.load(OID) == (b"new", TID1)


# -- live ----------------------------------------------------------------------------------

def test_commits_read_their_own_answers_and_a_reader_sees_each_in_order(served, monkeypatch):
    """One process commits through ZODB (its thread reads its answers);
    another connection's subscriber sees every tid once, in order, and
    the committer's cache and last transaction follow each commit."""
    taken = []
    original = ThreadAnswer.take

    def take(self, value):
        taken.append(self.name)
        return original(self, value)

    monkeypatch.setattr(ThreadAnswer, "take", take)
    db = ZODB.DB(storage(served))
    watcher = storage(served)
    seen, tids = [], []
    watcher.client.events.subscribe(lambda e: seen.append(e.tid), before_visible=True)
    try:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        root = conn.root()
        root["x"] = MinPO(0)
        tm.commit()
        for i in range(1, 60):
            root["x"].value = i
            tm.commit()
            tid = root["x"]._p_serial
            tids.append(tid)
            assert db.storage.lastTransaction() == tid
            assert db.storage.client.cache.load(root["x"]._p_oid)[1] == tid
        assert "Finish" in taken and "Vote" in taken
        watcher.ping()                              # every invalidation in
        assert seen[-len(tids):] == tids and seen == sorted(set(seen))
        other = db.open(transaction.TransactionManager())
        assert other.root()["x"].value == 59
    finally:
        db.close()
        watcher.close()


def test_a_reader_thread_racing_thread_read_commits_never_sees_a_stale_state(served):
    """Loader threads of the committing process start transactions while
    its committing thread reads its own Finish answers: each sees a
    counter no lower than any value committed before it started."""
    db = ZODB.DB(storage(served))
    try:
        tm = transaction.TransactionManager()
        root = db.open(tm).root()
        root["n"] = MinPO(0)
        tm.commit()
        committed, problems, stop = [0], [], threading.Event()

        def read():
            rtm = transaction.TransactionManager()
            conn = db.open(rtm)
            while not stop.is_set():
                floor = committed[0]
                rtm.begin()
                value = conn.root()["n"].value
                if value < floor:
                    problems.append((value, floor))
                rtm.abort()
            conn.close()

        readers = [threading.Thread(target=read) for _ in range(2)]
        for t in readers:
            t.start()
        for i in range(1, 150):
            root["n"].value = i
            tm.commit()
            committed[0] = i
        stop.set()
        for t in readers:
            t.join()
        assert problems == []
    finally:
        db.close()


def test_a_subscriber_added_after_a_thread_read_commit_does_not_get_it():
    """As on the reactor's path, where tpc_finish returns after stage two."""
    c = Committing()
    c.committed()
    seen = []
    c.client.events.subscribe(lambda e: seen.append(e.tid))
    waiter = c.client.events.next_after(p64(1))
    c.owner.reactor.advance(threadreads.PARK_CHECK)
    assert seen == [] and waiter.result.tid == TID1


def test_other_clients_commits_before_the_answers_are_applied_by_the_committing_thread():
    """Invalidations that come before the Vote answer (in pieces) and
    before the Finish answer: the committing thread applies them itself,
    in order, as the reactor would (cache, before_visible subscribers,
    last tid), and wakes no reactor; their second stage waits for it."""
    c = Committing()
    c.owner.invalidated_by_thread = lambda p, tid, oids, later: \
        c.client.apply_invalidation(tid, oids, later)           # as the Connector's
    other = p64(5)
    c.client.cache.store(other, p64(1), None, b"old")
    first, second = invalidate(p64(0x18), other), invalidate(p64(0x1c), p64(6))
    vote = c.vote()
    c.script.chunks = [first[:10], first[10:] + commitframes.vote_answer(vote.tag, [])]
    assert vote.wait(1) == [] and c.proto.read_state == PARKED
    assert c.client.cache.loadBefore(other, p64(0x30)) is None       # ended at 0x18
    assert c.client.last_transaction() == p64(0x18)
    finish = c.finish()
    c.script.chunks = [second, commitframes.finish_answer(finish.tag, TID1)]
    assert finish.wait(1) == TID1 and c.proto.read_state == PARKED
    assert c.visible == [("early", p64(0x18)), ("early", p64(0x1c)),
                         ("zodb", TID1, True), ("early", TID1)]
    assert c.proto.invalidations == 2 and c.owner.queued == []
    assert c.events == []                   # nothing went to the reactor's path
    assert c.client.events.last is None     # the second stage: on the reactor, later
    c.owner.reactor.advance(threadreads.PARK_CHECK)
    assert c.client.events.last.tid == TID1
