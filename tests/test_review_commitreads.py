"""Adversarial checks of the Vote and Finish answers the committing thread
reads itself (zeotwist.client.threadreads; issue 10's review of bea7305).

In memory, over test_thread_reads' scripted reading socket: whatever
interrupts the reader (a signal handler's exception while it parses, an
error while it stores its answer) must leave the socket to the reactor
with every byte it read, never owned by the thread; and the second stage
of a commit the thread made visible must run even when the reactor takes
the socket back without reading anything; and another client's invalidation in the
same bytes as the Finish answer comes after the commit, in order.
"""
import os
import signal

import pytest
from ZODB.utils import p64

from zeotwist.client.threadreads import PARKED, RETURNING, THREAD
from tests.test_thread_commit_reads import TID1, TID2, Committing
from tests.test_thread_loads import OID, answer
from tests.test_thread_reads import a_thread_reads, invalidate, run_queued
from zeotwist.wire import commitframes


class Interrupted(Exception):
    """What the test's signal handler raises."""


@pytest.fixture
def sigusr1():
    """SIGUSR1's handler raises Interrupted (in the main thread, where
    Python runs signal handlers): ``os.kill`` of this process with it."""
    def raise_(signum, frame):
        raise Interrupted()
    previous = signal.signal(signal.SIGUSR1, raise_)
    yield lambda: os.kill(os.getpid(), signal.SIGUSR1)
    signal.signal(signal.SIGUSR1, previous)


def test_a_signal_while_the_thread_parses_its_finish_answer_hands_everything_over(
        sigusr1, monkeypatch):
    """The signal arrives after ``recv`` returned the answer, while the
    reader looks at it: the reader raises the handler's exception, and the
    bytes and the socket go to the reactor, which makes the commit visible."""
    c = Committing()
    c.voted()
    match = commitframes.match_finish_answer
    signals = [sigusr1]

    def signalled(buf, tag):
        if signals:
            signals.pop()()                     # its handler raises here
        return match(buf, tag)

    monkeypatch.setattr(commitframes, "match_finish_answer", signalled)
    finish = c.finish()
    frame = commitframes.finish_answer(finish.tag, TID1)
    c.script.chunks = [frame]
    with pytest.raises(Interrupted):
        finish.wait(1)
    assert c.proto.read_state != THREAD         # else nobody ever reads the socket again
    assert c.proto.read_state == RETURNING
    run_queued(c.owner)                         # the reactor takes the bytes
    assert finish.wait(0) == TID1 and c.client.last_transaction() == TID1
    assert c.client.cache.load(OID) == (b"new", TID1)


def test_an_error_storing_a_read_answer_leaves_the_socket_to_the_reactor():
    """The reader's own answer, consumed, but its store fails (a cache
    file's disk full): the load fails with that error, and the socket is
    not left to a thread that no longer reads it."""
    proto, sock, owner, script, cache, events, store, load = a_thread_reads()

    def full(oid, start, end, data):
        raise OSError(28, "No space left on device")

    load.store = full
    script.chunks = [answer(load.tag)]
    with pytest.raises(OSError):
        load.wait(1)
    assert proto.read_state == PARKED and owner.queued == []
    later = proto.load_before_from_thread(OID, p64(9), store)     # the next load: read again
    assert later.reading
    script.chunks = [answer(later.tag)]
    assert later.wait(1) == (b"rec", p64(3), None)


def test_the_second_stage_runs_when_the_reactor_takes_the_socket_back_after_a_read_finish():
    """The thread reads its Finish answer while the reactor wrote (a
    one-way frame: no answer will come to read): the socket goes back to
    the reactor without any bytes.  The commit's second stage must still
    run (``events.last``, ``next_after``), not wait for a box that may
    never come."""
    c = Committing()
    c.voted()
    finish = c.finish()
    frame = commitframes.finish_answer(finish.tag, TID1)

    def reactor_writes_meanwhile():
        c.proto.emit(b"one-way")                # e.g. a reactor program's StoreData
        return frame

    c.script.chunks = [reactor_writes_meanwhile]
    assert finish.wait(1) == TID1 and c.proto.read_state == RETURNING
    run_queued(c.owner)                         # the reactor reads again
    waiter = c.client.events.next_after(p64(1))
    c.owner.reactor.advance(0)
    assert c.client.events.last is not None and c.client.events.last.tid == TID1
    assert waiter.called and waiter.result.tid == TID1


def test_another_client_s_invalidation_right_after_the_finish_answer_comes_after_it():
    """The Finish answer (TID1) and another client's Invalidate (TID2) in
    one ``recv``: the thread consumes neither; the reactor makes TID1
    visible, then applies TID2, and both events reach everyone in order."""
    c = Committing()
    c.owner.invalidated = lambda p, tid, oids: c.client.apply_invalidation(tid, oids)
    seen = []
    c.client.events.subscribe(lambda e: seen.append(e.tid))
    c.voted()
    finish = c.finish()
    c.script.chunks = [commitframes.finish_answer(finish.tag, TID1) + invalidate(TID2, OID)]
    c.proto.read_answer(finish, 1)
    finish.reading = False
    assert c.proto.read_state == RETURNING and c.visible == [] and seen == []
    run_queued(c.owner)                         # the reactor handles both boxes
    assert finish.wait(0) == TID1
    assert c.visible == [("zodb", TID1, True), ("early", TID1), ("early", TID2)]
    assert seen == [TID1, TID2] and c.client.last_transaction() == TID2
    assert c.client.cache.loadBefore(OID, TID2) == (b"new", TID1, TID2)
