"""Client diagnostics reach Python's logging (issue 13, item 3).

A client process that sets up only the standard ``logging`` module (as an
ordinary ZODB program or Zope does) gets zeotwist's events under ``zeotwist.*``
logger names at sensible levels: a dropped cache file, a lost connection and
the retries (one line, however many attempts) are warnings, the reconnection
is info.  A process that began Twisted logging
itself gets them through its own observer and not twice through ``logging``.
The server runs in this process (background reactor), stopped and restarted
on the same port; the client is a child process.
"""
import logging
import queue
import threading
import time

import pytest
import pytest_twisted
from twisted.logger import LogLevel, Logger, globalLogPublisher

from zeotwist import logbridge
from zeotwist.testing import start_server

from procutil import Child

#: prints every stdlib log record as one line: LOG <logger> <LEVEL> <message>
STDLIB_HANDLER = """
import logging
class Show(logging.Handler):
    def emit(self, record):
        say("LOG", record.name, record.levelname, record.getMessage())
logging.getLogger().addHandler(Show())
logging.getLogger().setLevel(logging.INFO)
"""

CLIENT = STDLIB_HANDLER + """
storage = ClientStorage(ADDR, client="c", var=ARGS[0], wait_timeout=20)
say("READY")
sys.stdin.readline()
storage.close()
say("DONE")
"""

TWISTED_CLIENT = STDLIB_HANDLER + """
from twisted.logger import globalLogBeginner
def observe(event):
    if event.get("log_namespace", "").startswith("zeotwist"):
        say("TWISTED", event["log_namespace"], event["log_level"].name)
globalLogBeginner.beginLoggingTo([observe], redirectStandardIO=False)
storage = ClientStorage(ADDR, client="c", var=ARGS[0], wait_timeout=20)
say("READY")
sys.stdin.readline()
storage.close()
say("DONE")
"""


def expect_containing(child: Child, text: str, timeout: float = 20) -> str:
    """Skip lines until one containing ``text``; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = child.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            line = None
        if line is None:
            pytest.fail("no line containing %r\n%s" % (text, child.describe()))
        if text in line:
            return line


def test_stdlib_logging_gets_cache_file_and_reconnection(tmp_path):
    (tmp_path / "c-1.ztc").write_bytes(b"ZTC1 and then not a cache file")
    server = start_server(str(tmp_path / "data.fs"))
    host, port = server.address
    child = Child(CLIENT, (host, port), tmp_path)
    try:
        line = expect_containing(child, "ignoring client cache file")
        assert line.startswith("LOG zeotwist.client.cachefile WARNING "), line
        expect_containing(child, "READY")
        server.stop()
        line = expect_containing(child, "lost its connection")
        assert line.startswith("LOG zeotwist.client.") and " WARNING " in line, line
        line = expect_containing(child, "cannot connect")        # the retries begin
        assert line.startswith("LOG zeotwist.client.connector WARNING "), line
        assert line.endswith("; retrying"), line
        server = start_server(str(tmp_path / "data.fs"),
                              listen="tcp:%d:interface=127.0.0.1" % port)
        line = expect_containing(child, "registered with storage")
        assert line.startswith("LOG zeotwist.client.") and " INFO " in line, line
        assert sum("cannot connect" in l for l in child.output) == 1, child.output
        line = expect_containing(child, "cache verified")      # the handshake is done
        assert line.startswith("LOG zeotwist.client.") and " INFO " in line, line
        child.send()
        line = expect_containing(child, "lost its connection")  # closed: not a warning
        assert " INFO " in line, line
        expect_containing(child, "DONE")
        child.finish()
    finally:
        child.close()
        server.stop()
    assert "Traceback" not in "".join(child.errors), "".join(child.errors)[-2000:]


def test_application_with_twisted_logging_is_not_logged_twice(tmp_path):
    (tmp_path / "c-1.ztc").write_bytes(b"ZTC1 and then not a cache file")
    server = start_server(str(tmp_path / "data.fs"))
    child = Child(TWISTED_CLIENT, server.address, tmp_path)
    try:
        line = expect_containing(child, "zeotwist.client.cachefile")
        assert line == "TWISTED zeotwist.client.cachefile warn", line
        expect_containing(child, "READY")
        child.send()
        expect_containing(child, "DONE")
        child.finish()
    finally:
        child.close()
        server.stop()
    assert not [l for l in child.output if l.startswith("LOG zeotwist")], child.output


def test_stopping_during_the_handshake_is_no_warning(server, monkeypatch):
    """A program that closes its client while a handshake is under way
    (here: Verify unanswered) gets an info line, not a warning or a traceback."""
    from twisted.internet.defer import Deferred
    from twisted.logger import globalLogPublisher

    from zeotwist.client.addresses import to_endpoint
    from zeotwist.client.cache import ClientCache
    from zeotwist.client.client import Client
    from zeotwist.client.reactorthread import background_reactor, blocking_call
    from zeotwist.server.storageserver import StorageServer
    events, verifying = [], []
    monkeypatch.setattr(StorageServer, "verify",
                        lambda self, tid: verifying.append(tid) or Deferred())
    reactor = background_reactor()
    cache = ClientCache()
    cache.last_tid = b"\0" * 8                    # so that the handshake sends Verify
    client = Client(reactor, to_endpoint(reactor, server.address), cache=cache)
    globalLogPublisher.addObserver(events.append)
    try:
        blocking_call(reactor, client.start, timeout=10)
        deadline = time.monotonic() + 10
        while not verifying:
            assert time.monotonic() < deadline
            time.sleep(0.01)                        # polling a real condition, bounded
        blocking_call(reactor, client.stop, timeout=10)
    finally:
        globalLogPublisher.removeObserver(events.append)
    ours = [e for e in events if (e.get("log_namespace") or "").startswith("zeotwist.client")]
    assert any("handshake abandoned" in e.get("log_format", "") for e in ours), ours
    assert not [e for e in ours if e["log_level"] > LogLevel.info], ours


# -- the bridge on its own (in this process) ---------------------------------------

@pytest.fixture
def records():
    """Records of the ``zeotwist`` loggers made in this test's thread (a
    server of an earlier test may still log from its reactor thread)."""
    got = []
    me = threading.get_ident()

    class Keep(logging.Handler):
        def emit(self, record):
            if record.thread == me:
                got.append(record)

    handler = Keep(level=logging.DEBUG)
    logger = logging.getLogger("zeotwist")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield got
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def _event(namespace, level, text="something {what}", **kw):
    return dict(log_namespace=namespace, log_level=level, log_format=text, what="happened",
                **kw)


def test_levels_and_names(records, monkeypatch):
    monkeypatch.setattr(logbridge, "twisted_logging_begun", lambda: False)
    for level in (LogLevel.debug, LogLevel.info, LogLevel.warn, LogLevel.error,
                  LogLevel.critical):
        logbridge.forward_to_stdlib(_event("zeotwist.client.client", level))
    logbridge.forward_to_stdlib(_event("twisted.internet", LogLevel.error))
    logbridge.forward_to_stdlib(_event("zeotwistish", LogLevel.error))
    assert [(r.name, r.levelname, r.getMessage()) for r in records] == [
        ("zeotwist.client.client", name, "something happened")
        for name in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")]


def test_failures_keep_their_traceback(records, monkeypatch):
    monkeypatch.setattr(logbridge, "twisted_logging_begun", lambda: False)
    log = Logger(namespace="zeotwist.test", observer=logbridge.forward_to_stdlib)
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("listener failed")
    assert records[0].levelname == "CRITICAL" and records[0].exc_info[0] is ZeroDivisionError


def test_nothing_forwarded_once_twisted_logging_began(records, monkeypatch):
    monkeypatch.setattr(logbridge, "twisted_logging_begun", lambda: True)
    logbridge.forward_to_stdlib(_event("zeotwist.client.client", LogLevel.warn))
    assert records == []


def test_twisted_private_name_still_means_begun():
    """The one private Twisted name the bridge reads: a fresh LogBeginner has
    a start-up buffer, which ``beginLoggingTo`` sets to None."""
    import io
    import sys
    import warnings
    from twisted.logger import LogBeginner, LogPublisher
    beginner = LogBeginner(LogPublisher(), io.StringIO(), sys, warnings)
    assert beginner._temporaryObserver is not None
    beginner.beginLoggingTo([lambda event: None], redirectStandardIO=False)
    assert beginner._temporaryObserver is None


@pytest_twisted.ensureDeferred
async def test_a_transaction_timeout_is_one_warning(records, monkeypatch, tmp_path):
    """The client hears of its transaction timeout and loses the connection:
    one warning (the timeout's), not a second for the connection's loss."""
    from twisted.internet import reactor
    from ZODB.utils import z64

    from zeotwist.errors import TransactionTimeout

    from test_transaction_timeout import PATIENCE, Log, serve_and_connect, the_next_commits
    monkeypatch.setattr(logbridge, "twisted_logging_begun", lambda: False)
    svc, client, port = await serve_and_connect(tmp_path, transaction_timeout=0.5)
    heard = Log()
    globalLogPublisher.addObserver(heard)
    try:
        oid = await client.new_oid()
        txn = client.begin()
        txn.store(oid, z64, b"stalled")
        with pytest.raises(TransactionTimeout):
            await txn.vote()                # holds the commit lock (or times out already)
            await heard.heard.addTimeout(PATIENCE, reactor)
            await txn.finish()
        await txn.abort()
        await the_next_commits(client, oid)     # by then the old connection is gone
    finally:
        globalLogPublisher.removeObserver(heard)
        await client.stop()
        await svc.stopService()
    warnings = [(r.name, r.getMessage()) for r in records
                if r.name.startswith("zeotwist.client") and r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0][1].startswith("zeotwist: transaction timeout: 127.0.0.1:%s aborted" % port)
