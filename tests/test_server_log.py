"""The server's log as an operator reads it.

A real server on 127.0.0.1 (FileStorage in a temporary folder) and real
clients; the test captures twisted.logger events and checks the lines: the
version at start, an ordinary unresolved conflict at info once per class,
one transaction-timeout line with a readable peer, pack start and end with
ISO times and the duration, each storage's close at stop.
"""
import re
import threading
import time

import pytest
import transaction
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from ZODB import DB
from ZODB.Connection import TransactionMetaData
from ZODB.POSException import ConflictError
from ZODB.tests.MinPO import MinPO
from ZODB.tests.StorageTestBase import zodb_pickle

from zeotwist import ClientStorage
from zeotwist.client.reactorthread import background_reactor
from zeotwist.testing import start_server


@pytest.fixture
def log():
    """The (level, text) of every zeotwist event logged during the test."""
    events, lock = [], threading.Lock()

    def observe(event):
        if str(event.get("log_namespace", "")).startswith("zeotwist"):
            with lock:
                events.append((event.get("log_level"), formatEvent(event)))
    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def wait_for_line(events, pattern, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in list(events) if re.search(pattern, e[1])]
        if found:
            return found
        time.sleep(0.02)        # polling the captured log, bounded
    raise AssertionError("no log line matching %r in:\n%s" % (
        pattern, "\n".join(t for _, t in events)))


def texts(events, pattern):
    return [(level, text) for level, text in list(events) if re.search(pattern, text)]


def test_start_conflicts_pack_and_stop(tmp_path, log):
    running = start_server(str(tmp_path / "data.fs"))
    assert texts(log, r"^zeotwist \S+ starting \(ZODB \S+, Twisted \S+, Python \S+\)$")
    dbs = [DB(ClientStorage(running.address, reactor=background_reactor(), wait_timeout=10))
           for _ in range(2)]
    try:
        for attempt in range(2):                 # the same kind of conflict, twice
            c1 = dbs[0].open(transaction.TransactionManager())
            c2 = dbs[1].open(transaction.TransactionManager())
            c2.root()._p_activate()
            c1.root()["n"] = attempt
            c1.transaction_manager.commit()
            c2.root()["n"] = -1
            with pytest.raises(ConflictError):
                c2.transaction_manager.commit()
            c2.transaction_manager.abort()
            c1.close()
            c2.close()
        dbs[0].pack(time.time())
        wait_for_line(log, r"pack of storage '1' ended")
    finally:
        for db in dbs:
            db.close()
        running.stop()
    refused = texts(log, "not resolving conflicts of this kind")
    assert [level for level, _ in refused] == [LogLevel.info, LogLevel.debug], refused
    assert "persistent.mapping.PersistentMapping" in refused[0][1]
    assert not [t for level, t in log if level >= LogLevel.warn and "conflict" in t]
    iso = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00"
    assert texts(log, r"^zeotwist: pack of storage '1' started at %s, removing history "
                      r"before %s$" % (iso, iso))
    assert texts(log, r"^zeotwist: pack of storage '1' ended at %s \(\d+\.\d s\)$" % iso)
    assert texts(log, r"^zeotwist closed storage '1' \(FileStorage %s\)$"
                 % re.escape(str(tmp_path / "data.fs")))


def test_transaction_timeout_is_one_line(tmp_path, log):
    running = start_server(str(tmp_path / "data.fs"), transaction_timeout=0.5)
    cs = ClientStorage(running.address, reactor=background_reactor(), wait_timeout=10)
    try:
        t = TransactionMetaData()
        cs.tpc_begin(t)
        cs.store(cs.new_oid(), b"\0" * 8, zodb_pickle(MinPO(1)), "", t)
        cs.tpc_vote(t)                           # holds the commit lock, then stalls
        (line,) = wait_for_line(log, "^transaction timeout")   # the client says it too
        assert line[0] == LogLevel.warn
        assert re.fullmatch(r"transaction timeout: 127\.0\.0\.1:\d+ held the commit lock "
                            r"too long \(over 0\.5 s, storage '1'\); disconnecting it",
                            line[1]), line
        assert running.server.traffic["transaction_timeouts"] == 1
        assert not texts(log, "protocol violation")
    finally:
        cs.close()
        running.stop()
