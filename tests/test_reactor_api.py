"""The Deferred API inside the running (pytest-twisted) reactor.

The server runs on the global reactor too; nothing here blocks it.
"""
import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads
from ZODB.POSException import ConflictError, POSKeyError
from ZODB.utils import maxtid, z64

import zeotwist
from zeotwist import ClientStorage, DatabasePool, ReactorThreadError
from zeotwist.server.tap import ServerService


@pytest.fixture
def rserver(tmp_path):
    svc = ServerService(str(tmp_path / "data.fs"), ["tcp:0:interface=127.0.0.1"],
                        reactor=reactor)
    svc.startService()
    host, port = pytest_twisted.blockon(svc.listening)[0].rsplit(":", 1)
    yield svc, "tcp:host=%s:port=%s" % (host, port)
    pytest_twisted.blockon(svc.stopService())


@pytest.fixture
def connect(rserver):
    made = []

    def make(**kw):
        d = zeotwist.connect(reactor, rserver[1], wait_timeout=10, **kw)
        return d.addCallback(lambda c: made.append(c) or c)

    yield make
    for c in made:
        pytest_twisted.blockon(c.stop())


async def store_objects(client, items):
    """Commit {oid: data} through the Deferred API; returns the tid."""
    txn = client.begin(description="test")
    for oid, data in items.items():
        txn.store(oid, z64, data)
    await txn.vote()
    return await txn.finish()


@pytest_twisted.ensureDeferred
async def test_pipelined_loads_answered_correctly(connect, rserver):
    writer = await connect()
    oids = await writer.new_oids(300)
    data = {oid: b"object %d" % i for i, oid in enumerate(oids)}
    tid = await store_objects(writer, data)
    reader = await connect()                      # fresh client: empty cache
    before = rserver[0].servers["1"].stats["loads"]
    # 300 loads outstanding at once, plus a duplicate of each of the first 50
    ds = [reader.load_before(oid, maxtid) for oid in oids]
    dups = [reader.load_before(oid, maxtid) for oid in oids[:50]]
    results = await defer.gatherResults(ds + dups)
    for oid, (got, start, end) in zip(oids + oids[:50], results):
        assert (got, start, end) == (data[oid], tid, None)
    # duplicates in flight shared one request each
    assert rserver[0].servers["1"].stats["loads"] - before == 300
    # and the answers are now cached
    assert reader.cache.stats()["revisions"] >= 300


@pytest_twisted.ensureDeferred
async def test_missing_object_is_poskeyerror(connect):
    client = await connect()
    with pytest.raises(POSKeyError):
        await client.load(b"\0" * 7 + b"\x99")


@pytest_twisted.ensureDeferred
async def test_commit_seen_as_event_by_another_client(connect):
    a, b = await connect(), await connect()
    seen = []
    b.events.subscribe(seen.append)
    start = b.last_transaction()
    waiting = b.events.next_after(start)
    oid = (await a.new_oids(1))[0]
    tid = await store_objects(a, {oid: b"hello"})
    event = await waiting
    assert event.tid == tid and event.oids == (oid,) and not event.local
    assert seen == [event]
    assert b.last_transaction() == tid
    assert (await b.load(oid)) == (b"hello", tid)
    # a's own commit is an event for a, marked local
    assert a.events.last.tid == tid and a.events.last.local


@pytest_twisted.ensureDeferred
async def test_conflict_through_the_deferred_api(connect):
    a, b = await connect(), await connect()
    oid = (await a.new_oids(1))[0]
    tid1 = await store_objects(a, {oid: b"v1"})
    await b.events.next_after(z64)
    txn = a.begin()
    txn.store(oid, tid1, b"v2")
    await txn.vote()
    await txn.finish()
    stale = b.begin()
    stale.store(oid, tid1, b"stale")
    with pytest.raises(ConflictError) as e:
        await stale.vote()
    assert e.value.oid == oid
    await stale.abort()
    # the lock was released: b commits on top of the current revision
    current = (await b.load(oid))[1]
    txn = b.begin()
    txn.store(oid, current, b"v3")
    await txn.vote()
    assert await txn.finish() > current


def _increment(root, key="n"):
    root[key] = root.get(key, 0) + 1
    return root[key]


@pytest_twisted.ensureDeferred
async def test_run_in_transaction_retries_conflicts(connect):
    client = await connect()
    db = await client.open_db()
    other = await connect()
    other_db = await other.open_db()
    pool = DatabasePool(db, reactor, max_threads=2, backoff=0.001)
    try:
        await pool.run_in_transaction(_increment)
        await other.ping()      # every invalidation sent so far has reached other
        attempts = []

        def collide_once(root):
            attempts.append(1)
            value = root["n"]
            if len(attempts) == 1:
                # another client commits the same object under our feet
                _commit_other(other_db)
            root["n"] = value + 10
            return root["n"]

        result = await pool.run_in_transaction(collide_once)
        assert len(attempts) == 2            # first attempt conflicted, retried
        assert result == 12                  # 1, then other's +1, then +10
        assert await pool.run_read_only(lambda root: root["n"]) == 12
    finally:
        pool.close()
        await threads.deferToThread(db.close)
        await threads.deferToThread(other_db.close)


def _commit_other(db):
    import transaction
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    conn.root()["n"] += 1
    tm.commit()
    conn.close()


@pytest_twisted.ensureDeferred
async def test_run_in_transaction_gives_up_after_retries(connect):
    client = await connect()
    db = await client.open_db()
    pool = DatabasePool(db, reactor, retries=2, backoff=0.001)
    calls = []

    def always_conflicts(root):
        calls.append(1)
        raise ConflictError("synthetic")

    try:
        with pytest.raises(ConflictError):
            await pool.run_in_transaction(always_conflicts)
        assert len(calls) == 3
        with pytest.raises(ZeroDivisionError):      # other errors: no retry
            await pool.run_in_transaction(lambda root: 1 / 0)
        assert len(calls) == 3
    finally:
        pool.close()
        await threads.deferToThread(db.close)


@pytest_twisted.ensureDeferred
async def test_read_only_interaction_never_commits(connect):
    client = await connect()
    db = await client.open_db()
    pool = DatabasePool(db, reactor)
    try:
        await pool.run_read_only(_increment)
        assert await pool.run_read_only(lambda root: root.get("n")) is None
    finally:
        pool.close()
        await threads.deferToThread(db.close)


def test_blocking_call_on_reactor_thread_raises(rserver):
    # pytest-twisted runs this body on the reactor thread: the global reactor
    # is running, so ClientStorage uses it and cannot wait here.
    cs = ClientStorage(rserver[1])
    try:
        with pytest.raises(ReactorThreadError) as e:
            cs.load(z64)
        assert "Deferred API" in str(e.value)
    finally:
        cs.close()


@pytest_twisted.ensureDeferred
async def test_twistd_style_app_uses_both_halves(connect):
    """Deferred client and ZODB DB share one connection and cache; worker
    threads commit through the DB, the reactor side sees the events."""
    client = await connect()
    db = await client.open_db()
    pool = DatabasePool(db, reactor)
    try:
        before = client.last_transaction()
        nxt = client.events.next_after(before)
        value = await pool.run_in_transaction(_increment, "hits")
        event = await nxt
        assert value == 1 and event.local
        assert client.connections == 1          # one connection for both halves
        assert db.storage.client is client
        # and a blocking ClientStorage made from a worker thread uses this reactor
        def from_worker():
            return db.storage.lastTransaction()
        assert await threads.deferToThread(from_worker) == event.tid
    finally:
        pool.close()
        await threads.deferToThread(db.close)
