"""The server's transaction and vote timeouts as a client meets them (issue 13 item 11).

A real server on 127.0.0.1 (FileStorage in a temporary folder) with a short
``transaction_timeout``; real clients that stall while they hold the commit
lock.  The client's transaction fails with TransactionTimeout (carrying the
timeout), not a bare ClientDisconnected; nothing of it is committed; the
server logs one line naming the peer; the client's next transaction
reconnects and commits.  The stalls end on events the test controls (the
client's notice arriving), never on a sleep.  The vote timeout (a
transaction that does not vote in time) is met the same way, as VoteTimeout.
"""
import re
import threading
from contextlib import asynccontextmanager

import pytest
import pytest_twisted
import transaction
from twisted.internet import defer, reactor
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from ZODB import DB
from ZODB.Connection import TransactionMetaData
from ZODB.FileStorage import FileStorage
from ZODB.POSException import POSKeyError, StorageTransactionError
from ZODB.tests.MinPO import MinPO
from ZODB.tests.StorageTestBase import zodb_pickle
from ZODB.utils import z64
from transaction.interfaces import TransientError

import zeotwist
from zeotwist import ClientStorage
from zeotwist.client.reactorthread import background_reactor
from zeotwist.errors import ClientDisconnected, TransactionTimeout, VoteTimeout
from zeotwist.server.storageserver import DEFAULT_INLINE_COMMIT_BYTES
from zeotwist.server.tap import ServerService
from zeotwist.testing import start_server, start_storages
from zeotwist.wire.commands import STORE_CHUNK

TIMEOUT = 0.5
#: bounds the waits for events that do come (a failing test, not a hang)
PATIENCE = 30


class Log:
    """The zeotwist log events of the test; ``notice`` is set once the client
    has heard of its transaction timeout."""

    def __init__(self):
        self.events, self.notice = [], threading.Event()
        self.server_said = threading.Event()        # the server's timeout line
        self.heard = defer.Deferred()

    def __call__(self, event):
        if not str(event.get("log_namespace", "")).startswith("zeotwist"):
            return
        self.events.append(event)
        if event["log_namespace"] == "zeotwist.server.session" and \
                re.match("(transaction|vote) timeout", formatEvent(event)):
            self.server_said.set()
        if event["log_namespace"] == "zeotwist.client.protocol" and \
                re.search("(transaction|vote) timeout", formatEvent(event)):
            self.notice.set()
            if not self.heard.called:
                self.heard.callback(None)

    def lines(self, pattern, namespace="zeotwist"):
        return [(e["log_level"], formatEvent(e)) for e in list(self.events)
                if e["log_namespace"].startswith(namespace)
                and re.search(pattern, formatEvent(e))]


@pytest.fixture
def log():
    observer = Log()
    globalLogPublisher.addObserver(observer)
    yield observer
    globalLogPublisher.removeObserver(observer)


def assert_one_server_line(log, said=r"transaction timeout: 127\.0\.0\.1:\d+ held the commit "
                                        r"lock too long \(over 0\.5 s, storage '1'\)"):
    (line,) = log.lines("timeout:", "zeotwist.server")
    assert line[0] == LogLevel.warn
    assert re.fullmatch(said + "; disconnecting it", line[1]), line
    assert not [e for e in log.events if e.get("log_failure") is not None]
    assert not log.lines("protocol violation")


class StallAfterVote:
    """A resource manager that votes after the storage (its sort key comes
    later) and waits there, so the storage's transaction holds the commit
    lock, until the client has heard of its timeout."""

    def __init__(self, until: threading.Event):
        self.until = until

    def sortKey(self):
        return "~stall"

    def tpc_vote(self, txn):
        assert self.until.wait(PATIENCE), "the server's transaction timeout never came"

    def tpc_begin(self, txn):
        pass

    commit = tpc_finish = tpc_abort = abort = tpc_begin


def _stalled_commit(db, value, stall, error):
    """A ZODB commit of root["x"] = ``value`` that the resource ``stall``
    holds up: ``(transaction manager, connection, the error it raised)``,
    which must be an ``error``."""
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    conn.root()["x"] = value
    tm.get().join(stall)
    with pytest.raises(error) as caught:
        tm.commit()
    return tm, conn, caught.value


def test_zodb_commit_raises_transaction_timeout_then_the_next_commits(tmp_path, log):
    running = start_server(str(tmp_path / "data.fs"), transaction_timeout=TIMEOUT)
    db = DB(ClientStorage(running.address, reactor=background_reactor(), wait_timeout=10))
    try:
        tm, conn, err = _stalled_commit(db, "stalled", StallAfterVote(log.notice),
                                        TransactionTimeout)
        assert err.timeout == TIMEOUT and str(err).startswith(
            "transaction timeout: 127.0.0.1:%d aborted this transaction" % running.address[1])
        assert isinstance(err, StorageTransactionError) and isinstance(err, TransientError)
        assert isinstance(err, ClientDisconnected)         # what it was before
        tm.abort()
        assert_one_server_line(log)
        assert running.server.traffic["transaction_timeouts"] == 1
        # nothing of it was committed; the same client reconnects and commits
        assert "x" not in conn.root()
        conn.root()["x"] = "committed"
        tm.commit()
        other = DB(ClientStorage(running.address, reactor=background_reactor(),
                                 wait_timeout=10))
        try:
            assert other.open().root()["x"] == "committed"
        finally:
            other.close()
        assert db.storage.client.connections == 2
    finally:
        db.close()
        running.stop()


def test_a_client_that_does_not_know_the_notice_gets_clientdisconnected(
        tmp_path, log, monkeypatch):
    """An older client (its Register lacks ``timeout_notice``) is dropped
    without the notice, as before: its commit fails with ClientDisconnected."""
    from zeotwist.client.connector import Connector
    from zeotwist.wire import commands as C

    def old_register(self, proto, read_only):
        return proto.call(C.Register, protocol=C.PROTOCOL_VERSION,
                          storage=self._client.storage_name, read_only=read_only)
    monkeypatch.setattr(Connector, "send_register", old_register)
    running = start_server(str(tmp_path / "data.fs"), transaction_timeout=TIMEOUT)
    db = DB(ClientStorage(running.address, reactor=background_reactor(), wait_timeout=10))
    try:
        tm = transaction.TransactionManager()
        db.open(tm).root()["x"] = "stalled"
        tm.get().join(StallAfterVote(log.server_said))
        with pytest.raises(ClientDisconnected) as caught:
            tm.commit()
        assert not isinstance(caught.value, TransactionTimeout)
        tm.abort()
        assert_one_server_line(log)
        assert not log.notice.is_set()
    finally:
        db.close()
        running.stop()


def test_a_vote_pending_at_the_timeout_fails_with_it(tmp_path, log):
    """The storage is slow to vote (the server holds the lock meanwhile):
    the waiting tpc_vote fails with TransactionTimeout.  The record is over
    the server's inline_commit_bytes, so the vote runs in the storage's
    worker thread: one run on the reactor thread (a small commit) is not
    cut short by the timeout (docs/server.md)."""
    fs = FileStorage(str(tmp_path / "data.fs"))
    slow = threading.Event()
    vote = fs.tpc_vote

    def slow_vote(txn):
        assert slow.wait(PATIENCE)
        return vote(txn)

    running = start_storages({"1": fs}, transaction_timeout=TIMEOUT)
    cs = ClientStorage(running.address, reactor=background_reactor(), wait_timeout=10)
    try:
        oid = cs.new_oid()
        fs.tpc_vote = slow_vote
        t = TransactionMetaData()
        cs.tpc_begin(t)
        cs.store(oid, z64, zodb_pickle(MinPO(b"x" * DEFAULT_INLINE_COMMIT_BYTES)), "", t)
        with pytest.raises(TransactionTimeout) as caught:
            cs.tpc_vote(t)
        assert caught.value.timeout == TIMEOUT
        with pytest.raises(TransactionTimeout):          # the next call of it too
            cs.tpc_finish(t)
        slow.set()
        fs.tpc_vote = vote
        assert_one_server_line(log)
        t = TransactionMetaData()                        # the next transaction commits
        cs.tpc_begin(t)
        cs.store(oid, z64, zodb_pickle(MinPO(2)), "", t)
        cs.tpc_vote(t)
        tid = cs.tpc_finish(t)
        assert cs.load(oid)[1] == tid
    finally:
        slow.set()
        cs.close()
        running.stop()


@asynccontextmanager
async def one_stored(tmp_path, description: str, data: bytes, **settings):
    """Within: a server with ``settings`` (serve_and_connect) and a Deferred-API
    client whose transaction ``description`` stored ``data`` as a new object:
    (client, oid, txn).  Both are stopped at the end."""
    svc, client, _ = await serve_and_connect(tmp_path, **settings)
    try:
        oid = await client.new_oid()
        txn = client.begin(description=description)
        txn.store(oid, z64, data)
        yield client, oid, txn
    finally:
        await client.stop()
        await svc.stopService()


async def serve_and_connect(tmp_path, **settings):
    """A server of tmp_path/data.fs with ``settings`` on the test's reactor,
    and a Deferred-API client of it: (service, client, port)."""
    svc = ServerService(str(tmp_path / "data.fs"), ["tcp:0:interface=127.0.0.1"],
                        reactor=reactor, **settings)
    svc.startService()
    host, port = (await svc.listening)[0].rsplit(":", 1)
    try:
        client = await zeotwist.connect(reactor, "tcp:host=%s:port=%s" % (host, port),
                                        wait_timeout=10)
    except BaseException:
        await svc.stopService()
        raise
    return svc, client, int(port)


async def the_next_commits(client, oid) -> None:
    """Nothing of the timed-out transaction is stored at ``oid``; the
    client's next transaction (on a new connection) commits."""
    with pytest.raises(POSKeyError):
        await client.load(oid)
    txn = client.begin(description="commits")
    txn.store(oid, z64, b"committed")
    await txn.vote()
    tid = await txn.finish()
    assert await client.load(oid) == (b"committed", tid)


@pytest_twisted.ensureDeferred
async def test_deferred_api_finish_fails_with_transaction_timeout(tmp_path, log):
    async with one_stored(tmp_path, "stalls", b"stalled",
                          transaction_timeout=TIMEOUT) as (client, oid, txn):
        with pytest.raises(TransactionTimeout) as caught:
            await txn.vote()        # (on a loaded machine the vote itself may time out)
            await log.heard.addTimeout(PATIENCE, reactor)    # the server's notice came
            await txn.finish()
        assert caught.value.timeout == TIMEOUT
        await txn.abort()
        await the_next_commits(client, oid)
        assert_one_server_line(log)


# -- the vote timeout ------------------------------------------------------------------

VOTE_LINE = (r"vote timeout: 127\.0\.0\.1:\d+ kept a transaction open for over 0\.5 s "
             r"without voting \(storage '1'\)")
#: a record this big sends TpcBegin (and the server's vote clock starts) at its store
BIG = b"x" * STORE_CHUNK


class StallBeforeVote(StallAfterVote):
    """A resource manager whose commit (ZODB's first phase: after every
    tpc_begin and store, before any vote) waits until ``until``."""

    def commit(self, txn):
        assert self.until.wait(PATIENCE), "the server's vote timeout never came"

    tpc_vote = StallAfterVote.tpc_begin


def test_zodb_commit_raises_vote_timeout_then_the_next_commits(tmp_path, log):
    running = start_server(str(tmp_path / "data.fs"), vote_timeout=TIMEOUT)
    db = DB(ClientStorage(running.address, reactor=background_reactor(), wait_timeout=10))
    try:
        tm, conn, err = _stalled_commit(db, MinPO(BIG), StallBeforeVote(log.notice),
                                        VoteTimeout)
        assert err.timeout == TIMEOUT and str(err).startswith(
            "vote timeout: 127.0.0.1:%d aborted this transaction, which did not vote within "
            "0.5 s" % running.address[1])
        assert isinstance(err, TransactionTimeout) and isinstance(err, TransientError)
        tm.abort()
        assert_one_server_line(log, VOTE_LINE)
        assert "x" not in conn.root()
        conn.root()["x"] = "committed"                   # reconnects, commits (small: it
        tm.commit()                                     # votes in TpcBegin's write)
        assert db.storage.client.connections == 2
    finally:
        db.close()
        running.stop()


def test_vote_timeout_to_a_client_that_does_not_ask_for_its_notice(tmp_path, log, monkeypatch):
    """A client whose Register says ``timeout_notice`` but not
    ``vote_timeout_notice`` (the release before) is dropped without a word."""
    from zeotwist.client.connector import Connector
    from zeotwist.wire import commands as C

    def older_register(self, proto, read_only):
        return proto.call(C.Register, protocol=C.PROTOCOL_VERSION,
                          storage=self._client.storage_name, read_only=read_only,
                          timeout_notice=True)
    monkeypatch.setattr(Connector, "send_register", older_register)
    running = start_server(str(tmp_path / "data.fs"), vote_timeout=TIMEOUT)
    db = DB(ClientStorage(running.address, reactor=background_reactor(), wait_timeout=10))
    try:
        tm = transaction.TransactionManager()
        db.open(tm).root()["x"] = MinPO(BIG)
        tm.get().join(StallBeforeVote(log.server_said))
        with pytest.raises(ClientDisconnected) as caught:
            tm.commit()
        assert not isinstance(caught.value, TransactionTimeout)
        tm.abort()
        assert_one_server_line(log, VOTE_LINE)
        assert not log.notice.is_set()
    finally:
        db.close()
        running.stop()


@pytest_twisted.ensureDeferred
async def test_deferred_api_vote_fails_with_vote_timeout(tmp_path, log):
    async with one_stored(tmp_path, "does not vote in time", BIG,    # TpcBegin is sent
                          vote_timeout=TIMEOUT) as (client, oid, txn):
        await log.heard.addTimeout(PATIENCE, reactor)    # the server's notice came
        with pytest.raises(VoteTimeout) as caught:
            await txn.vote()
        assert caught.value.timeout == TIMEOUT
        await txn.abort()
        await the_next_commits(client, oid)
        assert_one_server_line(log, VOTE_LINE)
