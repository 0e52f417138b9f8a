"""Reconnection and cache verification against the real server.

A client that loses its link reconnects by itself (Twisted's ClientService
with backoff), asks the server what changed since its cache's last
transaction (``Verify``) and invalidates just that, in its cache and in
ZODB; it drops everything only when the server cannot tell (queue too
short) or is *older* than its cache.  Servers run in this process on the
background reactor (FileStorage in tmp_path) or as ``twistd`` subprocesses;
traffic stays on 127.0.0.1 and Unix sockets in tmp_path.  Every wait polls
a real condition under a deadline.
"""
import os
import shutil
import signal

import pytest
import pytest_twisted
import transaction
from persistent.mapping import PersistentMapping
from twisted.internet import reactor, threads
from twisted.logger import LogLevel, globalLogPublisher
from ZODB import DB
from ZODB.utils import maxtid, p64, u64

import zeotwist
from zeotwist import ClientStorage
from zeotwist.client.reactorthread import background_reactor, blocking_call
from zeotwist.errors import ClientDisconnected
from zeotwist.testing import start_server, start_twistd
from zeotwist.wire.commands import STORE_CHUNK

from procutil import child_env, wait_for
from proxy import Proxy

WAIT = 15      # seconds any single condition may take before the test fails


def client(addr, **kw):
    kw.setdefault("reactor", background_reactor())
    kw.setdefault("wait_timeout", 10)
    return ClientStorage(addr, **kw)


def connected(cs):
    return cs.client.is_connected


def after(tid):
    """The ``before`` argument that reads the snapshot at ``tid``."""
    return p64(u64(tid) + 1)


def commit(db, **changes):
    """Set root[name]['v'] = value (creating the mappings); the new tid."""
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    try:
        with tm:
            root = conn.root()
            for name, value in changes.items():
                if name not in root:
                    root[name] = PersistentMapping()
                root[name]["v"] = value
        return conn._storage.lastTransaction()
    finally:
        conn.close()


class Events:
    """The Invalidation events a client publishes (reactor thread)."""

    def __init__(self, cs):
        self.seen = []
        cs.client.events.subscribe(self.seen.append)


class ErrorLog:
    """Error-level log events, from any thread, while in use."""

    def __init__(self):
        self.events = []

    def __call__(self, event):
        if event.get("log_level") in (LogLevel.error, LogLevel.critical):
            self.events.append(event)

    def __enter__(self):
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc):
        globalLogPublisher.removeObserver(self)

    def text(self):
        from twisted.logger import formatEvent
        return "\n".join(formatEvent(e) for e in self.events)


@pytest.fixture
def closing():
    """Close what a test registers, last first (clients, DBs, servers)."""
    things = []
    yield things.append
    for thing in reversed(things):
        try:
            thing.close() if hasattr(thing, "close") else thing.stop()
        except Exception:
            pass


# -- 1. the link cut under a connected client, the server stays up ------------------

def test_cut_link_reconnects_and_invalidates_only_what_changed(tmp_path, closing):
    server = start_server(str(tmp_path / "data.fs"))
    closing(server)
    proxy = Proxy.start(server.address)
    closing(proxy)
    cs_b = client(server.address)
    closing(cs_b)
    db_b = DB(cs_b)
    closing(db_b)
    cs_a = client(proxy.address)
    closing(cs_a)
    db_a = DB(cs_a)
    closing(db_a)

    tid1 = commit(db_b, changed=1, same=1)
    wait_for(lambda: cs_a.lastTransaction() >= tid1, WAIT, "A to see B's first commit")
    tm_a = transaction.TransactionManager()
    conn_a = db_a.open(tm_a)
    tm_a.begin()
    root_a = conn_a.root()
    changed, same = root_a["changed"], root_a["same"]
    assert (changed["v"], same["v"]) == (1, 1)
    changed_oid, same_oid = changed._p_oid, same._p_oid
    events = Events(cs_a)
    connections = cs_a.client.connections

    assert proxy.cut(refuse=True) == 1          # A's one link, gone
    wait_for(lambda: not connected(cs_a), WAIT, "A to notice the cut")
    tid2 = commit(db_b, changed=2)               # A cannot hear of this one
    assert cs_a.lastTransaction() == tid1
    wait_for(lambda: proxy.refused > 0, WAIT, "A to try again while refused")
    proxy.allow()
    wait_for(lambda: connected(cs_a), WAIT, "A to reconnect")
    assert cs_a.client.connections == connections + 1

    # Verified: A's view moved to tid2, and the changed object is new.
    assert cs_a.lastTransaction() == tid2
    data, start, end = cs_a.loadBefore(changed_oid, after(cs_a.lastTransaction()))
    assert (data, start, end) == (cs_b.load(changed_oid)[0], tid2, None)
    assert cs_a.load(changed_oid)[1] == tid2
    tm_a.begin()                                 # the next transaction boundary
    assert root_a["changed"]["v"] == 2
    # Only that object was invalidated: the other one is still a live object
    # in A's ZODB connection and still served from A's cache.
    assert same._p_changed is not None, "db.invalidateCache() was called"
    loads, hits = server.server.stats["loads"], cs_a.client.cache.hits
    assert cs_a.load(same_oid)[1] == tid1
    assert cs_a.client.cache.hits == hits + 1
    assert server.server.stats["loads"] == loads
    assert same["v"] == 1
    # One event for the verification, naming just the changed object.
    assert [(e.tid, e.oids, e.reset) for e in events.seen if e.tid > tid1] == \
        [(tid2, (changed_oid,), False)]
    tm_a.abort()
    conn_a.close()


# -- 2. the server killed and restarted under connected clients --------------------

def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Twistd:
    """``twistd zeotwist`` on one data file and listen address, (re)startable."""

    def __init__(self, filename, listen, *args):
        self.filename, self.listen, self.args = filename, listen, args
        self.process = None
        self.logs = []

    def start(self):
        self.process = start_twistd(self.filename, *self.args, listen=self.listen,
                                    env=child_env())
        return self.process

    def kill(self):
        """SIGKILL: no clean shutdown, the clients see their links die."""
        process = self.process
        os.kill(process.pid, signal.SIGKILL)
        process.process.wait(10)
        self.logs.append(process.log())

    def stop(self):
        if self.process is not None and self.process.process.poll() is None:
            self.process.stop()
            self.logs.append(self.process.log())


class KillServerInCommit:
    """A second resource manager, committed after the storage's stores went
    out and before its vote: it kills the server there and waits until every
    client has noticed, so the transaction is in flight when the link drops."""

    def __init__(self, kill, clients):
        self.kill, self.clients = kill, clients
        self.killed = False

    def sortKey(self):
        return "~after the storage"

    def tpc_begin(self, txn):
        pass

    def commit(self, txn):
        blocking_call(background_reactor(), lambda: None, timeout=WAIT)  # stores sent
        self.kill()
        self.killed = True
        wait_for(lambda: not any(c.is_connected for c in self.clients), WAIT,
                 "every client to notice the dead server")

    def tpc_vote(self, txn):
        pass

    def tpc_finish(self, txn):
        pass

    def tpc_abort(self, txn):
        pass

    abort = tpc_abort


@pytest_twisted.ensureDeferred
async def test_server_killed_and_restarted_under_threaded_and_reactor_clients(tmp_path):
    port = free_port()
    server = Twistd(str(tmp_path / "data.fs"), "tcp:%d:interface=127.0.0.1" % port)
    addr = ("127.0.0.1", port)
    made = []
    r = None
    await threads.deferToThread(server.start)
    try:
        def open_threaded():
            cs_t = client(addr, wait_timeout=WAIT)
            made.append(cs_t)
            db_t = DB(cs_t)
            made.append(db_t)
            cs_s = client(addr, wait_timeout=1)      # for the server that never comes back
            made.append(cs_s)
            return cs_t, db_t, cs_s
        cs_t, db_t, cs_s = await threads.deferToThread(open_threaded)
        r = await zeotwist.connect(reactor, "tcp:host=127.0.0.1:port=%d" % port,
                                   wait_timeout=WAIT)
        tid0 = await threads.deferToThread(commit, db_t, counter=0)
        r_oid = (await r.new_oids(1))[0]

        # In flight: R has sent a whole chunk of its transaction (TpcBegin and
        # data go out with it); T's transaction has stored a big record too.
        r_txn = r.begin(description="in flight")
        r_txn.store(r_oid, None, b"r" * (STORE_CHUNK + 1))
        tm_t = transaction.TransactionManager()
        conn_t = db_t.open(tm_t)
        killer = KillServerInCommit(server.kill, [cs_t.client, cs_s.client, r])

        def commit_t(big):
            tm_t.begin()
            conn_t.root()["big"] = big
            conn_t.root()["counter"]["v"] += 1
            tm_t.get().join(killer)
            try:
                tm_t.commit()
            except BaseException as e:
                tm_t.abort()
                return e
            return cs_t.lastTransaction()

        big = b"t" * (STORE_CHUNK + 1)
        failed = await threads.deferToThread(commit_t, big)
        assert killer.killed
        assert isinstance(failed, ClientDisconnected), repr(failed)
        assert isinstance(failed, transaction.interfaces.TransientError)
        with pytest.raises(ClientDisconnected):
            await r_txn.vote()
        await r_txn.abort()

        # Next attempts and other calls, made while the server is down, wait.
        killer.kill = lambda: None
        killer.clients = []
        t_retry = threads.deferToThread(commit_t, big)
        r_info = r.info()
        r_txn = r.begin(description="second attempt")
        r_txn.store(r_oid, None, b"r2")
        r_vote = r_txn.vote()
        assert not r_info.called and not r_vote.called
        # (A transaction that lost a piece meanwhile fails at once: waiting
        # for the server would not bring the piece back.)
        lost = r.begin(description="lost a piece")
        lost.store(r_oid, None, b"x" * (STORE_CHUNK + 1))
        lost_vote = lost.vote()
        assert lost_vote.called
        with pytest.raises(ClientDisconnected):
            await lost_vote
        assert not (cs_t.client.is_connected or r.is_connected)

        await threads.deferToThread(server.start)          # same file, same port
        assert (await r_info)["last_tid"] >= tid0
        await r_vote                  # R holds the commit lock until it finishes
        tid_r = await r_txn.finish()
        tid_t = await t_retry
        assert not isinstance(tid_t, BaseException), repr(tid_t)
        assert min(tid_t, tid_r) > tid0 and tid_t != tid_r

        # Everybody sees both commits.
        assert (await r.load(conn_t.root()._p_oid))[1] == tid_t
        assert await threads.deferToThread(lambda: cs_t.load(r_oid)) == (b"r2", tid_r)
        wait_t = threads.deferToThread(
            wait_for, lambda: cs_s.lastTransaction() == max(tid_r, tid_t), WAIT,
            "S to see both commits")
        await wait_t
        tm_t.begin()
        assert conn_t.root()["counter"]["v"] == 1
        assert conn_t.root()["big"] == big
        tm_t.abort()
        conn_t.close()

        # The server goes away for good: S's calls wait for a reconnection
        # and fail when its wait_timeout (1 s) runs out.  The message is the
        # timeout's own (a refusal or a lost call says otherwise); that the
        # timeout fires after wait_timeout and not before is pinned on a
        # Clock (test_client_memory.test_a_call_waits_wait_timeout_for_a_reconnection).
        await threads.deferToThread(server.kill)

        def call_s():
            wait_for(lambda: not cs_s.client.is_connected, WAIT, "S to notice")
            with pytest.raises(ClientDisconnected) as info:
                cs_s.server_status()
            return str(info.value)

        message = await threads.deferToThread(call_s)
        assert message.startswith("no connection to the zeotwist server within 1 s"), message
    finally:
        if r is not None:
            await r.stop()

        def cleanup():
            for thing in reversed(made):
                thing.close()
            server.stop()
        await threads.deferToThread(cleanup)


# -- 3. verification after a restart: the queue is rebuilt from the file ------------

def open_objects(db, *names):
    """A ZODB connection (own transaction manager) and its live root[name] objects."""
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    tm.begin()
    root = conn.root()
    objects = [root[name] for name in names]
    for obj in objects:
        obj["v"]                                  # unghost
    return tm, conn, objects


def test_restarted_server_verifies_a_cache_from_before_its_restart(tmp_path, closing):
    fs = str(tmp_path / "data.fs")
    a_sock, b_sock = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    server = start_server(fs, listen="unix:" + a_sock)
    cs_a = client(a_sock)
    closing(cs_a)
    db_a = DB(cs_a)
    closing(db_a)
    tid1 = commit(db_a, o1=1, o2=1, o3=1, o4=1)
    tm_a, conn_a, (o1, o2, o3, o4) = open_objects(db_a, "o1", "o2", "o3", "o4")
    events = Events(cs_a)
    server.stop()
    wait_for(lambda: not connected(cs_a), WAIT, "A to notice the server stop")

    # While A cannot reach it, the server (at another address) takes two commits.
    server = start_server(fs, listen="unix:" + b_sock)
    cs_b = client(b_sock)
    db_b = DB(cs_b)
    tid2 = commit(db_b, o1=2)
    tid3 = commit(db_b, o2=2)
    db_b.close()
    server.stop()

    # Restarted at A's address: its queue comes from the file alone.
    server = start_server(fs, listen="unix:" + a_sock)
    closing(server)
    assert server.server.invalidations.since(tid1) == {o1._p_oid, o2._p_oid}
    wait_for(lambda: connected(cs_a), WAIT, "A to reconnect")
    assert cs_a.lastTransaction() == tid3 > tid2 > tid1
    assert [(e.tid, set(e.oids), e.reset) for e in events.seen] == \
        [(tid3, {o1._p_oid, o2._p_oid}, False)]
    # Unchanged objects: still served from A's cache, no load reaches the server.
    loads, hits = server.server.stats["loads"], cs_a.client.cache.hits
    assert cs_a.load(o3._p_oid)[1] == tid1 and cs_a.load(o4._p_oid)[1] == tid1
    assert (cs_a.client.cache.hits, server.server.stats["loads"]) == (hits + 2, loads)
    # Changed ones: new data, in the raw storage and in ZODB.
    assert cs_a.loadBefore(o1._p_oid, after(tid3))[1:] == (tid2, None)
    tm_a.begin()
    assert (o1["v"], o2["v"]) == (2, 2)
    assert o3._p_changed is not None and o4._p_changed is not None   # not invalidated
    assert (o3["v"], o4["v"]) == (1, 1)
    tm_a.abort()
    conn_a.close()


def test_queue_too_short_drops_the_cache_and_zodbs(tmp_path, closing):
    fs = str(tmp_path / "data.fs")
    a_sock, b_sock = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    server = Twistd(fs, "unix:" + a_sock, "--invalidation-queue-size", "1")
    closing(server)
    server.start()
    cs_a = client(a_sock)
    closing(cs_a)
    db_a = DB(cs_a)
    closing(db_a)
    tid1 = commit(db_a, o1=1, o2=1, o3=1)
    tm_a, conn_a, (o1, o2, o3) = open_objects(db_a, "o1", "o2", "o3")
    events = Events(cs_a)
    server.kill()
    wait_for(lambda: not connected(cs_a), WAIT, "A to notice the dead server")

    other = start_server(fs, listen="unix:" + b_sock)
    cs_b = client(b_sock)
    db_b = DB(cs_b)
    commit(db_b, o1=2)
    commit(db_b, o1=3)
    tid4 = commit(db_b, o2=2)
    db_b.close()
    other.stop()

    server.start()               # remembers one transaction: A's cache is too old
    wait_for(lambda: connected(cs_a), WAIT, "A to reconnect")
    assert cs_a.lastTransaction() == tid4
    assert [(e.tid, e.oids, e.reset) for e in events.seen] == [(tid4, (), True)]
    assert len(cs_a.client.cache) == 0
    # ZODB dropped its objects too (db.invalidateCache): fresh values, and
    # even the unchanged object is a ghost at the next transaction.
    tm_a.begin()
    assert o3._p_changed is None
    assert (o1["v"], o2["v"], o3["v"]) == (3, 2, 1)
    assert cs_a.client.cache.misses > 0
    tm_a.abort()
    conn_a.close()


# -- 4. a server OLDER than the client's cache ----------------------------------------

def test_server_older_than_the_cache_is_refused(tmp_path, closing):
    """By default: a clear error, logged and in the calls' ClientDisconnected;
    the client keeps its cache and takes the right server when it is back."""
    fs, old = str(tmp_path / "data.fs"), str(tmp_path / "old.fs")
    sock = str(tmp_path / "s.sock")
    server = start_server(fs, listen="unix:" + sock)
    cs_a = client(sock, wait_timeout=1)
    closing(cs_a)
    db_a = DB(cs_a)
    closing(db_a)
    commit(db_a, o1=1)
    shutil.copyfile(fs, old)                 # a backup taken at T1
    tid2 = commit(db_a, o1=2)
    server.stop()
    wait_for(lambda: not connected(cs_a), WAIT, "A to notice the server stop")
    with ErrorLog() as errors:
        restored = start_server(old, listen="unix:" + sock)
        wait_for(lambda: "older than this client's cache" in errors.text(), WAIT,
                 "the refusal to be logged")
    assert not connected(cs_a) and cs_a.lastTransaction() == tid2
    with pytest.raises(ClientDisconnected, match="older than this client's cache"):
        cs_a.server_status()
    restored.stop()
    server = start_server(fs, listen="unix:" + sock)         # the right server again
    closing(server)
    wait_for(lambda: connected(cs_a), WAIT, "A to take the right server")
    assert cs_a.lastTransaction() == tid2
    assert read_o1(db_a) == 2


def read_o1(db):
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    try:
        with tm:
            return conn.root()["o1"]["v"]
    finally:
        conn.close()


def test_server_older_than_the_cache_allowed_drops_it_and_serves_the_server_data(
        tmp_path, closing):
    """With allow_older_server=True (operators who mean it), as before."""
    fs, old = str(tmp_path / "data.fs"), str(tmp_path / "old.fs")
    sock = str(tmp_path / "s.sock")
    server = start_server(fs, listen="unix:" + sock)
    cs_a = client(sock, allow_older_server=True)
    closing(cs_a)
    db_a = DB(cs_a)
    closing(db_a)
    tid1 = commit(db_a, o1=1)
    shutil.copyfile(fs, old)                 # a backup taken at T1
    tid2 = commit(db_a, o1=2)
    tm_a, conn_a, (o1,) = open_objects(db_a, "o1")
    assert o1["v"] == 2
    assert cs_a.client.cache.loadBefore(o1._p_oid, maxtid)[1] == tid2   # cached at T2
    events = Events(cs_a)
    server.stop()
    wait_for(lambda: not connected(cs_a), WAIT, "A to notice the server stop")

    with ErrorLog() as errors:
        server = start_server(old, listen="unix:" + sock)      # restored from the backup
        closing(server)
        wait_for(lambda: connected(cs_a), WAIT, "A to reconnect")
    assert "OLDER" in errors.text(), errors.text()
    assert cs_a.lastTransaction() == tid1
    assert [(e.tid, e.reset) for e in events.seen] == [(tid1, True)]
    loads = server.server.stats["loads"]
    data, start, end = cs_a.loadBefore(o1._p_oid, after(cs_a.lastTransaction()))
    assert (start, end) == (tid1, None)
    assert server.server.stats["loads"] == loads + 1        # asked the server, not the cache
    assert cs_a.load(o1._p_oid) == (data, tid1)
    tm_a.begin()
    assert o1["v"] == 1
    tm_a.abort()
    conn_a.close()
