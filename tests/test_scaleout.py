"""Several zeotwist servers over one RelStorage database on PostgreSQL.

Real servers (the background reactor, in this process) serving RelStorage
on a real PostgreSQL the tests start themselves (``pg_cluster`` in
conftest.py: one cluster per session, one database per test).  Every wait
polls a real condition under a deadline.  docs/scale-out.md.
"""
import statistics
import threading
import time

import pytest
import transaction
from ZODB import DB
from ZODB.POSException import ConflictError, ReadConflictError

from zeotwist.client.reactorthread import background_reactor, blocking_call
from zeotwist.pgtesting import relstorage_opener
from zeotwist.server.mvcc import PerThreadStorage
from zeotwist.testing import start_storages

from procutil import wait_for
from test_reconnect import WAIT, client, closing, commit  # noqa: F401

HISTORY = pytest.mark.parametrize("keep_history", [True, False], ids=["history", "history-free"])


def serve(dsn, closing, keep_history=True, rs_options=None, **options):
    server = start_storages({"1": relstorage_opener(dsn, keep_history, **(rs_options or {}))},
                            **options)
    closing(server)
    return server


def on_reactor(f, *args):
    return blocking_call(background_reactor(), lambda: __import__(
        "twisted.internet.defer", fromlist=["maybeDeferred"]).maybeDeferred(f, *args), timeout=10)


def record_invalidations(cs) -> list:
    """The (tid, oids) of other clients' transactions as ``cs`` hears of them."""
    seen = []

    def heard(event):
        if not event.local and not event.reset:
            seen.append((event.tid, list(event.oids)))
    cs.client.events.subscribe(heard, before_visible=True)
    return seen


def read(db, name):
    """root[name]['v'] in a new transaction (None if absent)."""
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    try:
        with tm:
            obj = conn.root().get(name)
            return None if obj is None else obj["v"]
    finally:
        conn.close()


def read_settled(db, name):
    """``read``, or None where a history-free database no longer has the
    revision of the client's (lagging) snapshot: ReadConflictError, retried."""
    try:
        return read(db, name)
    except ReadConflictError:
        return None


def reached(cs, tid):
    return cs.lastTransaction() >= tid


def commit_retrying(db, **changes):
    """``commit`` as applications do it: a ConflictError means retry."""
    for _ in range(20):
        try:
            return commit(db, **changes)
        except ConflictError:
            continue
    raise AssertionError("20 conflicts in a row")


def open_dbs(closing, first, *others):
    """ZODB DBs over the clients; the root is created through ``first`` and
    the others wait to hear of it (else they would create it too: a conflict)."""
    dbs = [DB(first)]
    closing(dbs[0])
    for cs in others:
        wait_for(lambda: reached(cs, first.lastTransaction()), WAIT, "the root's creation")
        dbs.append(DB(cs))
        closing(dbs[-1])
    return dbs


@HISTORY
def test_commits_through_either_server_reach_clients_of_both_in_tid_order(
        pg_dsn, closing, keep_history):
    s1 = serve(pg_dsn, closing, keep_history)
    s2 = serve(pg_dsn, closing, keep_history)
    a, watcher, b = client(s1.address), client(s1.address), client(s2.address)
    for cs in (a, watcher, b):
        closing(cs)
    seen = {name: record_invalidations(cs) for name, cs in
            (("a", a), ("watcher", watcher), ("b", b))}
    db_a, db_b = open_dbs(closing, a, b)
    tids = [commit(db_a, x=-1, y=-1)]
    wait_for(lambda: reached(b, tids[0]), WAIT, "the mappings' creation")
    for i in range(8):
        tids.append(commit_retrying(db_a, x=i))
        tids.append(commit_retrying(db_b, y=i))
    last = max(tids)
    for cs in (a, watcher, b):
        wait_for(lambda: reached(cs, last), WAIT, "every client to reach the last tid")
    for name, got in seen.items():
        order = [tid for tid, _ in got]
        assert order == sorted(set(order)), "%s: not in tid order" % name
    # the passive client of server 1 heard of every commit, its own server's
    # and the other's (history-free: each announced tid covers the window)
    heard = {tid for tid, _ in seen["watcher"]}
    if keep_history:
        assert set(tids) <= heard
    assert last in heard
    db_w, = open_dbs(closing, watcher)
    assert read(db_w, "x") == 7 and read(db_w, "y") == 7
    assert s1.server.last_tid == s2.server.last_tid == last
    status = b.server_status()
    # every transaction it announced, through either server (and the root)
    assert status["last_tid"] == last and status["commits"] == len(tids) + 1


def test_a_commit_reaches_the_other_servers_clients_by_notification(pg_dsn, closing):
    # a poll interval far longer than the test: only notifications bring commits over
    s1 = serve(pg_dsn, closing, poll_interval=3600)
    s2 = serve(pg_dsn, closing, poll_interval=3600)
    assert s1.server.feed.listener is not None and s2.server.feed.listener is not None
    a, b = client(s1.address), client(s2.address)
    closing(a)
    closing(b)
    db_a = DB(a)
    closing(db_a)
    latencies = []
    for i in range(10):
        tid = commit(db_a, x=i)
        start = time.monotonic()
        wait_for(lambda: reached(b, tid), 60, "the other server's client")  # a hang guard
        latencies.append(time.monotonic() - start)
    assert s2.server.feed.stats["notifications"] >= 1
    print("fan-out latency through NOTIFY: median %.1f ms, max %.1f ms"
          % (1000 * statistics.median(latencies), 1000 * max(latencies)))


def test_without_the_trigger_servers_notify_each_other_of_their_own_commits(
        pg_cluster, pg_dsn, closing):
    # no poll within the test: only a notification brings a commit over
    s1 = serve(pg_dsn, closing, poll_interval=3600)
    s2 = serve(pg_dsn, closing, poll_interval=3600)
    # as where the database user may not create triggers: the server notifies itself
    pg_cluster.execute("DROP TRIGGER zeotwist_notify_commit ON object_state",
                       dbname=pg_dsn.split("dbname='")[1].split("'")[0])
    for s in (s1, s2):
        s.server.feed.listener.trigger = False
    a, b = client(s1.address), client(s2.address)
    closing(a)
    closing(b)
    db_a, = open_dbs(closing, a)
    notified = s2.server.feed.stats["notifications"]
    for i in range(3):
        tid = commit(db_a, x=i)
        wait_for(lambda: reached(b, tid), 60, "server 2's client")     # a hang guard
    assert s2.server.feed.stats["notifications"] > notified


def test_polling_alone_brings_commits_of_plain_relstorage_clients(pg_dsn, closing):
    s1 = serve(pg_dsn, closing, poll_interval=0.2)
    s1.server.feed.listen = False                  # no notifications: polling only
    on_reactor(s1.server.feed.listener.stop)
    b = client(s1.address)
    closing(b)
    db_b = DB(b)
    closing(db_b)
    commit(db_b, x=0)
    # a plain RelStorage client of the same database, no zeotwist in between
    plain = DB(relstorage_opener(pg_dsn)())
    closing(plain)
    tid = commit(plain, x=1)
    wait_for(lambda: reached(b, tid), WAIT, "the poll to bring the plain client's commit")
    assert read(db_b, "x") == 1
    assert s1.server.feed.stats["notifications"] == 0


def pg_sessions(pg_cluster, dsn):
    db = dsn.split("dbname='")[1].split("'")[0]
    return pg_cluster.execute(
        "SELECT application_name, state, EXTRACT(EPOCH FROM now() - xact_start) "
        "FROM pg_stat_activity WHERE datname = '%s' AND pid <> pg_backend_pid()" % db)


def test_an_idle_server_holds_no_postgresql_transaction(pg_cluster, pg_dsn, closing):
    interval = 0.2
    s1 = serve(pg_dsn, closing, poll_interval=interval)
    a = client(s1.address)
    closing(a)
    db_a, = open_dbs(closing, a)
    for i in range(3):
        commit(db_a, x=i)
        read(db_a, "x")                                  # reactor-thread loads
        a.history(b"\0" * 8, size=2)                      # thread-pool work
    # while idle, no transaction lives longer than about one poll interval
    ages = []
    for _ in range(20):
        ages += [age for _, state, age in pg_sessions(pg_cluster, pg_dsn)
                 if state == "idle in transaction"]
        time.sleep(interval / 4)        # sampling over 5 intervals, not waiting for anything
    assert all(float(age) < interval + 0.5 for age in ages), ages
    wait_for(lambda: all(state == "idle" for _, state, _ in pg_sessions(pg_cluster, pg_dsn)),
             WAIT, "every connection of the idle server to leave its transaction")
    assert pg_sessions(pg_cluster, pg_dsn), "it keeps its connections, outside transactions"


def test_one_storage_instance_per_thread_released_on_close(pg_cluster, pg_dsn, closing):
    s1 = serve(pg_dsn, closing)
    storage = s1.server.storage
    assert isinstance(storage, PerThreadStorage)
    a = client(s1.address)
    closing(a)
    db_a = DB(a)
    closing(db_a)
    commit(db_a, x=1)                               # storage thread
    read(db_a, "x")                                 # reactor thread (loads)
    a.history(b"\0" * 8, size=1)                    # thread pool
    roots = {id(inst.storage) for inst in storage._instances}
    assert len(roots) == storage.instances() >= 3   # each thread its own
    assert storage.root not in [inst.storage for inst in storage._instances]
    a.close()
    s1.stop()
    wait_for(lambda: not pg_sessions(pg_cluster, pg_dsn), WAIT,
             "the stopped server to close every PostgreSQL connection")


def increment(db, n, counts, errors):
    """``n`` increments of root['counter']['v'], retrying conflicts; the
    ConflictErrors of commits (the server's) go to ``errors``."""
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    done = 0
    while done < n:
        tm.begin()
        try:
            conn.root()["counter"]["v"] += 1
        except ReadConflictError:       # history-free: the snapshot's revision is gone
            tm.abort()
            continue
        try:
            tm.commit()
        except ConflictError:
            tm.abort()
            errors.append(1)
            continue
        done += 1
        counts.append(1)
    conn.close()


@HISTORY
def test_a_counter_through_two_servers_is_exact(pg_dsn, closing, keep_history):
    from twisted.logger import globalLogPublisher, LogLevel
    bad = []

    def observe(event):
        if event.get("log_failure") is not None or event.get("log_level") in (
                LogLevel.critical, LogLevel.error):
            bad.append(event)
    globalLogPublisher.addObserver(observe)
    try:
        s1 = serve(pg_dsn, closing, keep_history)
        s2 = serve(pg_dsn, closing, keep_history)
        clients = [client(s.address) for s in (s1, s2)]
        for cs in clients:
            closing(cs)
        dbs = open_dbs(closing, *clients)
        created = commit(dbs[0], counter=0)
        wait_for(lambda: reached(clients[1], created), WAIT, "the counter's creation")
        per_server = {0: [], 1: []}
        errors: list = []
        threads = [threading.Thread(target=increment, args=(dbs[i % 2], 15, per_server[i % 2],
                                                             errors)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        total = len(per_server[0]) + len(per_server[1])
        assert total == 60 and per_server[0] and per_server[1]
        for db in dbs:
            wait_for(lambda: read_settled(db, "counter") == total, WAIT, "both servers to agree")
        counted = s1.server.stats["conflicts"] + s2.server.stats["conflicts"]
        assert counted >= len(errors)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert not bad, [e.get("log_format") for e in bad][:5]


def test_a_client_moving_to_a_server_behind_waits_for_it(pg_dsn, closing):
    s1 = serve(pg_dsn, closing)
    s2 = serve(pg_dsn, closing, poll_interval=30)
    s2.server.feed.listen = False                  # s2 hears of nothing by itself
    on_reactor(s2.server.feed.listener.stop)
    c = client(s1.address)
    closing(c)
    resets = []
    c.client.events.subscribe(lambda e: e.reset and resets.append(e), before_visible=True)
    db, = open_dbs(closing, c)
    for i in range(5):
        tid = commit(db, counter=i)
    assert s2.server.last_tid < tid                # s2 is behind the client
    c.new_addr(s2.address)
    wait_for(lambda: len(s2.server.sessions) == 1 and c.client.is_connected, WAIT,
             "the client to move to server 2")
    assert c.lastTransaction() == tid              # not back in time
    assert s2.server.last_tid >= tid               # s2 caught up before it answered
    assert not resets                              # and the cache was kept
    assert read(db, "counter") == 4


def test_catch_up_is_bounded_and_fires_in_order():
    from twisted.internet.task import Clock
    from zeotwist.server.external import Feed

    class Server:
        last_tid = b"\0" * 7 + b"\x05"

    clock = Clock()
    server = Server()
    server.reactor = clock
    feed = Feed(server)
    assert feed.catch_up(b"\0" * 7 + b"\x09").result is False    # nobody else writes
    feed.others_write = True
    assert feed.catch_up(b"\0" * 7 + b"\x05").result is True
    got = []
    feed.catch_up(b"\0" * 7 + b"\x07", timeout=5).addCallback(lambda r: got.append(("7", r)))
    feed.catch_up(b"\0" * 7 + b"\x09", timeout=5).addCallback(lambda r: got.append(("9", r)))
    server.last_tid = b"\0" * 7 + b"\x08"
    feed.advanced()
    assert got == [("7", True)]
    clock.advance(5)
    assert got == [("7", True), ("9", False)]
    assert not clock.getDelayedCalls()


@HISTORY
def test_blobs_in_the_database_through_two_servers(pg_dsn, closing, tmp_path, keep_history):
    from ZODB.blob import Blob
    servers = [serve(pg_dsn, closing, keep_history,
                     rs_options=dict(blob_dir=str(tmp_path / ("server%d-blobs" % i)),
                                     shared_blob_dir=False)) for i in (1, 2)]
    clients = [client(s.address, blob_dir=str(tmp_path / ("client%d-blobs" % i)))
               for i, s in enumerate(servers)]
    for cs in clients:
        closing(cs)
    db1, db2 = open_dbs(closing, *clients)
    data = bytes(range(256)) * 4096 + b"tail"          # 1 MiB and a bit
    tm = transaction.TransactionManager()
    conn = db1.open(tm)
    with tm:
        conn.root()["blob"] = Blob(data)
    conn.close()
    tid = clients[0].lastTransaction()
    wait_for(lambda: reached(clients[1], tid), WAIT, "server 2's client")
    tm2 = transaction.TransactionManager()
    conn2 = db2.open(tm2)
    with tm2:
        with conn2.root()["blob"].open() as f:
            assert f.read() == data
        with conn2.root()["blob"].open("w") as f:            # and back the other way
            f.write(b"rewritten through server 2")
    conn2.close()
    tid2 = clients[1].lastTransaction()
    wait_for(lambda: reached(clients[0], tid2), WAIT, "server 1's client")
    conn = db1.open(tm)
    with tm:
        with conn.root()["blob"].open() as f:
            assert f.read() == b"rewritten through server 2"
    conn.close()


def test_server_sync_sees_a_commit_made_through_another_server_at_once(pg_dsn, closing):
    s1 = serve(pg_dsn, closing)
    s2 = serve(pg_dsn, closing, poll_interval=30)
    s2.server.feed.listen = False                  # s2 hears of nothing by itself
    on_reactor(s2.server.feed.listener.stop)
    a, b = client(s1.address), client(s2.address, server_sync=True)
    closing(a)
    closing(b)
    db_a, = open_dbs(closing, a)
    b.ping()                                       # a fresh look: server 2 has the root
    assert b.lastTransaction() == a.lastTransaction()
    db_b, = open_dbs(closing, b)
    commit(db_a, x=-1)
    fresh = client(s2.address)                     # a new connection starts from it too
    closing(fresh)
    assert fresh.lastTransaction() == a.lastTransaction()
    for i in range(3):
        commit(db_a, x=i)
        # a new transaction through server 2, right after the commit returned
        assert read(db_b, "x") == i
