"""SIGTERM and SIGINT stop a server without logging in the signal handler
(zeotwist/server/stopsignals.py).

Twisted's own handler logged ``Received SIGTERM, shutting down.`` from
inside the signal handler; a signal landing while the main thread was
taking twistd's log-file lock (a pure-Python RLock) made that line wait for
the lock forever, and the server hung instead of stopping.  Here the
handler is called while the lock is held in exactly that state (in a
thread of its own, so a hang fails the test instead of hanging it), a real
reactor is run and stopped by a real SIGTERM, and real twistd processes are
stopped while they log.
"""
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest
from twisted.logger import globalLogPublisher, textFileLogObserver
from twisted.python.logfile import LogFile

from zeotwist.server.service import ServerService
from zeotwist.server.stopsignals import SignalStop
from zeotwist.testing import start_twistd
from zeotwist.twistedcompat import private_reactor, reactor_signal_handlers, stopped_by_signal

from procutil import child_env, wait_for

LINE = "[twisted.internet.base#info] Received SIGTERM, shutting down."


@pytest.fixture
def main_thread_signals():
    """Whatever a test does to the process's signal handlers is undone."""
    names = [signal.SIGTERM, signal.SIGINT, signal.SIGCHLD]
    saved = {signum: signal.getsignal(signum) for signum in names}
    wakeup = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup)
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)
    signal.set_wakeup_fd(wakeup)


@pytest.fixture
def log_file(tmp_path):
    """twistd's kind of log file, observing every log event while the test runs."""
    log = LogFile.fromFullPath(str(tmp_path / "twistd.log"))
    observer = textFileLogObserver(log)
    globalLogPublisher.addObserver(observer)
    yield log
    globalLogPublisher.removeObserver(observer)
    log.close()


def closed_reactor(reactor) -> None:
    """Close the file descriptors of a reactor that will not run again."""
    reactor.disconnectAll()
    for reader in reactor.getReaders():
        reactor.removeReader(reader)
    reactor.waker.connectionLost(None)


def test_the_handler_neither_logs_nor_waits_for_the_log_files_lock(
        tmp_path, log_file, main_thread_signals):
    reactor = private_reactor()
    try:
        own = reactor_signal_handlers(reactor)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, own[signum])      # as the running reactor installs them
        stop = SignalStop(reactor)
        stop.replace()
        handler = signal.getsignal(signal.SIGTERM)
        assert handler == stop.noted and signal.getsignal(signal.SIGINT) == stop.noted
        log_file.write("a first line makes the file's lock\n")
        lock = log_file._threadable_lock            # twisted.python.threadable.XLock
        returned = []

        def signal_lands_in_the_lock():
            # threading._RLock.acquire: the inner lock taken, its owner not
            # yet set; a signal handled here must not log (it would wait
            # for this very lock, held by its own thread)
            lock._block.acquire()
            try:
                handler(signal.SIGTERM, None)
                returned.append(True)
            finally:
                lock._block.release()
        thread = threading.Thread(target=signal_lands_in_the_lock, daemon=True)
        thread.start()
        thread.join(30)                             # a guard: done at once when it works
        if thread.is_alive():
            lock._block.release()                   # let the stuck handler go
            thread.join(30)
            pytest.fail("the SIGTERM handler waited for the log file's lock")
        assert returned == [True]
        assert "SIGTERM" not in (tmp_path / "twistd.log").read_text()   # nothing logged yet
        reactor.runUntilCurrent()                   # the reactor thread's turn
        assert LINE in (tmp_path / "twistd.log").read_text()
        assert stop.received == signal.SIGTERM == stopped_by_signal(reactor)

        handler(signal.SIGINT, None)                # a second signal: said, nothing more
        reactor.runUntilCurrent()
        assert "Received SIGINT again; already shutting down." in (
            tmp_path / "twistd.log").read_text()
        assert stop.received == signal.SIGTERM == stopped_by_signal(reactor)
    finally:
        closed_reactor(reactor)


@pytest.mark.parametrize("as_process", [True, False], ids=["process", "in-a-tac"])
def test_a_server_stopped_by_sigterm_before_and_while_its_reactor_runs(
        tmp_path, main_thread_signals, as_process):
    """ServerService as the process (twistd zeotwist, ``zeotwist serve``): a
    SIGTERM before the reactor runs stops it once it runs, and the stop
    forgets the signal (status 0).  Built in one's own .tac file (not the
    process): a SIGTERM once the reactor runs.  Either way the running
    reactor's handlers are SignalStop's, the stop is clean, and once the
    reactor has stopped signals are ignored."""
    events = []
    globalLogPublisher.addObserver(events.append)
    reactor = private_reactor()
    service = ServerService(str(tmp_path / "d.fs"), ["tcp:0:interface=127.0.0.1"],
                            reactor=reactor, pid_filename=str(tmp_path / "pid"),
                            stop_reactor_on_failure=as_process)
    seen = {}

    def running():
        seen.update((signum, signal.getsignal(signum))
                    for signum in (signal.SIGTERM, signal.SIGINT))
        if not as_process:
            signal.raise_signal(signal.SIGTERM)
    signal.signal(signal.SIGINT, signal.default_int_handler)   # pytest's own otherwise
    try:
        service.privilegedStartService()
        assert (tmp_path / "pid").read_text() == "%d\n" % os.getpid()
        if as_process:
            signal.raise_signal(signal.SIGTERM)     # the supervisor saw the pid file
        reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
        reactor.callWhenRunning(running)
        guard = reactor.callLater(30, reactor.stop)  # a guard: stopped at once when it works
        reactor.run()
        assert guard.active(), "the SIGTERM did not stop the reactor"
        guard.cancel()
        # on its way out, the process ignores signals: its exit status stays
        assert signal.getsignal(signal.SIGTERM) == signal.getsignal(signal.SIGINT) \
            == signal.SIG_IGN
    finally:
        globalLogPublisher.removeObserver(events.append)
        for server in service.servers.values():
            server.close()
        closed_reactor(reactor)
    handlers = {getattr(h, "__func__", h) for h in seen.values()}
    assert handlers == {SignalStop.noted}, seen
    said = [e.get("log_format", "").format(**e) for e in events]
    assert "Received SIGTERM, shutting down." in said
    assert any(s.startswith("zeotwist closed storage '1'") for s in said), said
    assert not (tmp_path / "pid").exists()
    # twistd exits with status 0 (the process), or by re-raising SIGTERM (its way)
    assert stopped_by_signal(reactor) == (None if as_process else signal.SIGTERM)


#: twistd with the log file's lock made to take a SIGTERM exactly where
#: threading._RLock.acquire can (inner lock taken, owner not yet set), once
#: the reactor runs: without SignalStop, twistd's handler logs, waits for
#: that lock, and the process never exits
TWISTD_SIGTERM_IN_LOCK = [sys.executable, "-c", """\
import signal, sys, threading
from twisted.python import threadable

class WindowLock(threadable.XLock):
    armed = False
    def acquire(self, blocking=True, timeout=-1):
        me = threading.get_ident()
        if self._owner == me:
            self._count += 1
            return True
        if not self._block.acquire(blocking, timeout):
            return False
        if WindowLock.armed and threading.current_thread() is threading.main_thread():
            WindowLock.armed = False
            signal.raise_signal(signal.SIGTERM)     # handled here, before the owner is set
        self._owner, self._count = me, 1
        return True
    __enter__ = acquire

threadable.XLock = WindowLock                       # the LogFile's lock, made at its first write
from twisted.internet import reactor
from twisted.logger import Logger

def arm():
    WindowLock.armed = True
    Logger().info("a SIGTERM lands while this line takes the log file's lock")
reactor.callWhenRunning(arm)
from twisted.scripts.twistd import run
sys.argv[0] = "twistd"
run()
"""]


def test_twistd_stopped_by_a_sigterm_landing_in_its_log_files_lock(tmp_path):
    log = tmp_path / "window.log"
    launcher = [*TWISTD_SIGTERM_IN_LOCK, "-n", "--pidfile=", "-l", str(log), "zeotwist"]
    server = start_twistd(str(tmp_path / "d.fs"), launcher=launcher)
    try:
        status = server.process.wait(60)            # a guard: it stops at once when it works
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
        pytest.fail("twistd hung on a SIGTERM taken inside its log file's lock:\n%s"
                    % log.read_text())
    text = log.read_text()
    assert status == 0, text + server.log()
    assert "a SIGTERM lands while this line" in text and LINE in text, text
    assert "zeotwist closed storage '1'" in text


def churn(address: str, stop: threading.Event) -> None:
    """Connect and hang up until ``stop``: two log lines per connection."""
    while not stop.is_set():
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(address)
        except OSError:
            return                                  # the server stopped listening
        finally:
            s.close()


@pytest.mark.parametrize("how, signum, status", [
    ("twistd", signal.SIGTERM, 0), ("serve", signal.SIGTERM, 0),
    ("twistd", signal.SIGINT, -signal.SIGINT)])     # twistd's way for Ctrl-C: killed by it
def test_signals_while_the_server_logs_heavily(tmp_path, how, signum, status):
    """Four threads connect and hang up as fast as they can (the server logs
    each connection opening and closing) while five signals arrive: the
    first stops the server, the others change nothing; the exit status is
    the usual one, the storage closed."""
    sock = str(tmp_path / "s.sock")
    launcher = None if how == "twistd" else [sys.executable, "-m", "zeotwist", "serve"]
    server = start_twistd(str(tmp_path / "d.fs"), listen="unix:" + sock, launcher=launcher,
                          env=child_env(), preexec_fn=_default_sigint)
    stop = threading.Event()
    threads = [threading.Thread(target=churn, args=(sock, stop)) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        wait_for(lambda: server.log().count("closed") >= 200, 60, "heavy logging")
        for _ in range(5):
            server.process.send_signal(signum)
        exited = server.process.wait(60)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        server.stop()
    log = server.log()
    assert exited == status, log[-3000:]
    name = signal.Signals(signum).name
    assert log.count("Received %s, shutting down." % name) == 1, log[-3000:]
    assert "zeotwist closed storage '1'" in log


def _default_sigint():
    # a child of a shell's background job would inherit SIGINT ignored
    signal.signal(signal.SIGINT, signal.SIG_DFL)
