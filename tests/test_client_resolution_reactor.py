"""Client-side conflict resolution through the Deferred API and DatabasePool.

The server (``--client-conflict-resolution``) and the clients run on the
global reactor under pytest-twisted; resolution runs in the reactor's
thread pool (raw transactions) or the committing worker thread (ZODB over
DatabasePool), never on the reactor thread.
"""
import pickle
import pytest
import pytest_twisted
from BTrees.Length import Length
from twisted.internet import reactor, threads
from twisted.python.threadable import isInIOThread
from ZODB.POSException import ConflictError
from ZODB.tests.StorageTestBase import zodb_pickle, zodb_unpickle
from ZODB.utils import z64

import zeotwist
from zeotwist import DatabasePool
from zeotwist.server.tap import ServerService


@pytest.fixture
def crserver(tmp_path):
    svc = ServerService(str(tmp_path / "data.fs"), ["tcp:0:interface=127.0.0.1"],
                        reactor=reactor, client_conflict_resolution=True)
    svc.startService()
    host, port = pytest_twisted.blockon(svc.listening)[0].rsplit(":", 1)
    yield svc.servers["1"], "tcp:host=%s:port=%s" % (host, port)
    pytest_twisted.blockon(svc.stopService())


@pytest.fixture
def resolving_threads(monkeypatch):
    """Where Length's _p_resolveConflict runs: True for the reactor thread."""
    seen = []
    original = Length._p_resolveConflict

    def recording(self, old, committed, new):
        seen.append(isInIOThread())
        return original(self, old, committed, new)

    monkeypatch.setattr(Length, "_p_resolveConflict", recording)
    return seen


@pytest.fixture
def connect(crserver):
    made = []

    def make():
        d = zeotwist.connect(reactor, crserver[1], wait_timeout=10)
        return d.addCallback(lambda c: made.append(c) or c)

    yield make
    for c in made:
        pytest_twisted.blockon(c.stop())


async def commit(client, oid, serial, data):
    txn = client.begin()
    txn.store(oid, serial, data)
    resolved = await txn.vote()
    return resolved, await txn.finish()


async def two_revisions(a, first: bytes, second: bytes):
    """``oid``, committed as ``first`` then ``second``; returns (oid, tid1)."""
    oid = (await a.new_oids(1))[0]
    _, tid1 = await commit(a, oid, z64, first)
    await commit(a, oid, tid1, second)
    return oid, tid1


@pytest_twisted.ensureDeferred
async def test_a_raw_transaction_is_resolved_in_the_vote(connect, crserver, resolving_threads):
    assert isInIOThread()                            # the test body: the reactor thread
    a, b = await connect(), await connect()
    oid, tid1 = await two_revisions(a, zodb_pickle(Length(10)), zodb_pickle(Length(15)))
    resolved, tid3 = await commit(b, oid, tid1, zodb_pickle(Length(12)))   # stale
    assert resolved == [oid]
    data, serial = await b.load(oid)
    assert serial == tid3 and zodb_unpickle(data).value == 17
    assert crserver[0].stats["client_resolutions"] == 1
    assert resolving_threads == [False]              # in the pool, not the reactor


@pytest_twisted.ensureDeferred
async def test_a_class_the_client_lacks_is_a_clean_conflict_error(connect, crserver):
    def record(state):
        return pickle.dumps((("zeotwist_no_such_module", "Thing"), None), 3) \
            + pickle.dumps(state, 3)
    a, b = await connect(), await connect()
    oid, tid1 = await two_revisions(a, record({"v": 1}), record({"v": 2}))
    txn = b.begin()
    txn.store(oid, tid1, record({"v": 3}))
    with pytest.raises(ConflictError) as e:
        await txn.vote()
    assert e.value.oid == oid
    # the client aborted before raising: the lock is free, nothing of it is kept
    assert crserver[0].lock.holder is None
    assert crserver[0].stats["client_resolutions"] == 1
    current = (await a.load(oid))[1]
    _, tid = await commit(a, oid, current, record({"v": 4}))   # the other writer proceeds
    assert tid > current
    await txn.abort()                                           # harmless afterwards


@pytest_twisted.ensureDeferred
async def test_database_pool_commits_without_retrying(connect, crserver, resolving_threads):
    db = await (await connect()).open_db()
    other_db = await (await connect()).open_db()
    pool = DatabasePool(db, reactor, max_threads=2, backoff=0.001)
    try:
        await pool.run_in_transaction(lambda root: root.__setitem__("n", Length()))
        attempts = []

        def collide(root):
            attempts.append(1)
            root["n"].change(10)
            if len(attempts) == 1:
                _bump(other_db)          # another client commits the Length first
            return "done"

        assert await pool.run_in_transaction(collide) == "done"
        assert len(attempts) == 1                   # no ConflictError, no retry
        assert await pool.run_read_only(lambda root: root["n"].value) == 11
        stats = crserver[0].stats
        assert stats["client_resolutions"] == 1 and stats["conflicts"] == 0
        assert resolving_threads == [False]          # the committing worker thread
    finally:
        pool.close()
        await threads.deferToThread(db.close)
        await threads.deferToThread(other_db.close)


def _bump(db):
    import transaction
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    conn.root()["n"].change(1)
    tm.commit()
    conn.close()
