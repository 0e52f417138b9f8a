"""Where a commit's storage calls run (docs/performance.md, "Where the time
of a commit goes"): a small commit on a local storage runs them on the
reactor thread when the storage's worker is idle, anything else in the
worker, and a slow inline call sends the next ones back to the worker; a
client whose vote the server refused for conflicts still asks it to abort
(a round trip that brings the commits made meanwhile before the retry)."""
import queue
import threading

import pytest
from ZODB.Connection import TransactionMetaData
from ZODB.FileStorage import FileStorage
from ZODB.POSException import ConflictError
from ZODB.utils import maxtid, z64

from zeotwist.server import storagecalls
from zeotwist.server.commit import ServerTransaction
from zeotwist.server.storagecalls import StorageThreads, SynchronousCalls
from zeotwist.server.txnbuffer import TransactionBuffer
from zeotwist.testing import memory_server


class QueueReactor:
    """Collects what the worker hands back (callFromThread) for the test to run."""

    def __init__(self):
        self.calls = queue.SimpleQueue()

    def callFromThread(self, f, *args):
        self.calls.put((f, args))

    def deliver(self):
        f, args = self.calls.get(timeout=10)
        f(*args)


@pytest.fixture
def threads():
    reactor = QueueReactor()
    t = StorageThreads(reactor, "test-storage")
    t.reactor = reactor
    yield t
    t.stop()


def where(out):
    out.append(threading.current_thread())
    return len(out)


def test_a_short_call_runs_on_the_calling_thread_when_the_worker_is_idle(threads):
    out = []
    d = threads.inline_or_in_order(where, out)
    assert out == [threading.current_thread()]
    assert d.called and d.result == 1
    assert threads.inline_calls == 1


def test_a_short_call_queues_behind_a_call_in_the_worker(threads):
    gate, out = threading.Event(), []
    threads.in_order(gate.wait, 10)
    d = threads.inline_or_in_order(where, out)
    assert out == [] and not d.called      # not run beside the worker's call
    gate.set()
    threads.reactor.deliver()               # the first call's answer
    threads.reactor.deliver()
    assert d.called and out[0] is not threading.current_thread()
    assert threads.inline_calls == 0
    # delivered: the worker is idle again
    threads.inline_or_in_order(where, out)
    assert out[1] is threading.current_thread()


def test_a_slow_inline_call_sends_the_next_ones_to_the_worker(threads, monkeypatch):
    monkeypatch.setattr(storagecalls, "INLINE_SLOW", -1.0)    # every call is "slow"
    monkeypatch.setattr(storagecalls, "INLINE_COOLING", 2)
    out = []
    threads.inline_or_in_order(where, out)
    assert threads.slow_inline_calls == 1
    for _ in range(2):                      # cooling: these go to the worker
        threads.inline_or_in_order(where, out)
        threads.reactor.deliver()
    threads.inline_or_in_order(where, out)  # then inline again
    me = threading.current_thread()
    assert [t is me for t in out] == [True, False, False, True]


def test_a_failing_inline_call_fails_its_deferred(threads):
    d = threads.inline_or_in_order(lambda: 1 / 0)
    failures = []
    d.addErrback(failures.append)
    assert failures and failures[0].check(ZeroDivisionError)


class Recording(SynchronousCalls):
    def __init__(self):
        self.how = []

    def in_order(self, f, *args):
        self.how.append("worker")
        return super().in_order(f, *args)

    def inline_or_in_order(self, f, *args):
        self.how.append("inline")
        return super().in_order(f, *args)


def _txn(size, tid=None):
    buffer = TransactionBuffer()
    buffer.append(b"x" * size)
    return ServerTransaction(TransactionMetaData(), buffer, False, tid)


def test_only_small_commits_on_local_storages_may_run_inline(tmp_path):
    from twisted.internet.task import Clock
    server = memory_server(FileStorage(str(tmp_path / "data.fs")), Clock())
    try:
        server.threads = calls = Recording()
        limit = server.inline_commit_bytes
        assert limit > 0
        for txn in (_txn(limit), _txn(limit + 1), _txn(10, tid=b"\0" * 7 + b"\1")):
            server.commit_call(lambda storage, txn: None, txn)
        assert calls.how == ["inline", "worker", "worker"]
        server.inline_commit_bytes = 0          # off
        server.commit_call(lambda storage, txn: None, _txn(10))
        assert calls.how[-1] == "worker"
    finally:
        server.close()


def test_a_vote_refused_for_conflicts_is_aborted_without_a_round_trip(make_client, monkeypatch):
    """The server aborts a transaction whose vote it answers with conflicts
    before answering; after a first refusal the client's tpc_abort sends
    nothing (a round trip the commit lock would wait for: docs/performance.md,
    "Cheaper refusals, strict turns"), after a second in a row it makes one,
    and the next transaction commits."""
    first, second = make_client(), make_client()
    oid = first.new_oid()
    for cs, serial in ((first, z64), (second, z64)):
        txn = TransactionMetaData()
        cs.tpc_begin(txn)
        cs.store(oid, serial, b"data", "", txn)
        if cs is first:
            cs.tpc_vote(txn)
            committed = cs.tpc_finish(txn)
            continue
        waited = []
        real_call = cs._call
        monkeypatch.setattr(cs, "_call", lambda f, *a, **kw: (
            waited.append(f), real_call(f, *a, **kw))[1])
        for refusal in range(2):
            if refusal:
                txn = TransactionMetaData()
                cs.tpc_begin(txn)
                cs.store(oid, serial, b"data", "", txn)
            with pytest.raises(ConflictError):
                cs.tpc_vote(txn)                # based on z64: a conflict
            cs.tpc_abort(txn)
            assert [f.__name__ for f in waited] == ["abort"] * refusal
    txn = TransactionMetaData()
    second.tpc_begin(txn)
    second.store(oid, committed, b"more", "", txn)
    second.tpc_vote(txn)
    assert second.tpc_finish(txn) > committed


def test_a_conflict_answer_brings_the_current_record(make_client):
    """A vote refused for a conflict brings the conflicting object's current
    record into the client's cache (the retry loads it without a round
    trip), with its exact validity: a later commit's invalidation ends it."""
    first, second = make_client(), make_client()
    oid = first.new_oid()
    serials = []
    for data in (b"one", b"two"):
        txn = TransactionMetaData()
        first.tpc_begin(txn)
        first.store(oid, serials[-1] if serials else z64, data, "", txn)
        first.tpc_vote(txn)
        serials.append(first.tpc_finish(txn))
    txn = TransactionMetaData()
    second.tpc_begin(txn)
    second.store(oid, serials[0], b"stale", "", txn)
    with pytest.raises(ConflictError):
        second.tpc_vote(txn)
    second.tpc_abort(txn)
    assert second.client.cache.loadBefore(oid, maxtid) == (b"two", serials[1], None)
    txn = TransactionMetaData()                  # a third commit, by the first client
    first.tpc_begin(txn)
    first.store(oid, serials[1], b"three", "", txn)
    first.tpc_vote(txn)
    third = first.tpc_finish(txn)
    second.ping()                                # its invalidation has arrived
    assert second.client.cache.loadBefore(oid, third) == (b"two", serials[1], third)
    assert second.load(oid) == (b"three", third)
