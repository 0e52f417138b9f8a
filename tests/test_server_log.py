"""The server's log as an operator reads it.

A real server on 127.0.0.1 (FileStorage in a temporary folder) and real
clients; the test captures twisted.logger events and checks the lines: the
version at start, an ordinary unresolved conflict at info once per class,
one transaction-timeout line with a readable peer, pack start and end with
ISO times and the duration, each storage's close at stop.
"""
import re
import socket
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
from zeotwist.errors import TransactionTimeout
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
        try:
            cs.tpc_vote(t)                       # holds the commit lock, then stalls
        except TransactionTimeout:
            pass                                 # a loaded machine: the vote took that long
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


@pytest.fixture
def every_line():
    """The text of every event logged during the test, any namespace
    (Twisted's own lines too), with its namespace."""
    events, lock = [], threading.Lock()

    def observe(event):
        with lock:
            events.append((str(event.get("log_namespace", "")), formatEvent(event)))
    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


#: what a peer printed as an object looks like: IPv4Address(...), UNIXAddress(...), <... at 0x...>
REPR = re.compile(r"Address\(|<[^>]* at 0x|HOST:|PEER:")


def test_server_lines_name_peers_as_host_port_or_unix(tmp_path, every_line):
    sock = str(tmp_path / "s.sock")
    running = start_server(str(tmp_path / "data.fs"))
    unix = start_server(str(tmp_path / "other.fs"), listen="unix:%s" % sock)
    try:
        for address in (running.address, sock):
            ClientStorage(address, reactor=background_reactor(), wait_timeout=10).close()
        raw = socket.create_connection(running.address)
        raw.sendall(b"\xff\xfe" + b"x" * 64)                # a protocol violation
        port = r"127\.0\.0\.1:\d+"
        for pattern in (r"^zeotwist: connection from %s$" % port,
                        r"^zeotwist: connection from %s closed$" % port,
                        r"^zeotwist: connection from unix closed$",
                        r"^protocol violation from %s: key length \d+; closing$" % port):
            wait_for_line(every_line, pattern)         # (namespace, text) pairs
    finally:
        raw.close()
        running.stop()
        unix.stop()
    server_lines = [text for namespace, text in list(every_line)
                    if not namespace.startswith("zeotwist.client")]
    assert not [t for t in server_lines if REPR.search(t)], server_lines
    assert not [t for t in server_lines if "ServerSession" in t]
    # the client's side says nothing of AMP's either
    assert not [t for _, t in every_line if "connection established" in t]
