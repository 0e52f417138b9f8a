"""Helpers for the multi-process tests: client scripts in subprocesses.

A client process is ``sys.executable -c PRELUDE + script HOST PORT ...``;
in it no reactor runs, so ``ClientStorage`` uses its private background
reactor.  Processes talk to the test through line-oriented pipes: the test
waits for a line (``Child.expect``) or sends one (``Child.send``), always
with a deadline, never with a sleep.  Raw-socket helpers drive the server
with hand-made bytes for the fault tests.
"""
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from zeotwist.testing import start_twistd

REPO = Path(__file__).resolve().parent.parent

#: Imported by every client script; ``ADDR`` is the server, ``ARGS`` the rest of argv.
PRELUDE = """\
import sys, time
import transaction
from ZODB import DB
from ZODB.POSException import ConflictError
from zeotwist import ClientStorage
ADDR = (sys.argv[1], int(sys.argv[2]))
ARGS = sys.argv[3:]
def say(*words):
    print(*words, flush=True)
"""


def child_env() -> dict:
    """The environment for child processes: this checkout first on sys.path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Child:
    """A client script in a subprocess, with line I/O under deadlines."""

    def __init__(self, script: str, address, *args):
        host, port = address
        self.argv = [sys.executable, "-c", PRELUDE + script, host, str(port),
                     *map(str, args)]
        self.process = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=child_env(), cwd=str(REPO))
        self.lines: queue.Queue = queue.Queue()
        self.output: list = []
        self.errors: list = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.process.stdout, self.lines),
                             daemon=True),
            threading.Thread(target=self._drain, args=(self.process.stderr,), daemon=True)]
        for t in self._readers:
            t.start()

    def _read(self, stream, q):
        for line in stream:
            self.output.append(line)
            q.put(line.rstrip("\n"))
        q.put(None)   # EOF

    def _drain(self, stream):
        for line in stream:
            self.errors.append(line)

    @property
    def pid(self) -> int:
        return self.process.pid

    def describe(self) -> str:
        self.process.poll()
        for t in self._readers:
            t.join(0.5 if self.process.returncode is not None else 0)
        return ("child exit status %s\n--- stdout ---\n%s--- stderr ---\n%s"
                % (self.process.returncode, "".join(self.output), "".join(self.errors)))

    def expect(self, prefix: str, timeout: float = 30) -> str:
        """The next line; it must start with ``prefix``. Returns the rest, stripped."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail("no line %r from the child within %g s\n%s"
                        % (prefix, timeout, self.describe()))
        if line is None:
            pytest.fail("child ended while a line %r was expected\n%s"
                        % (prefix, self.describe()))
        if not line.startswith(prefix):
            pytest.fail("expected a line %r, got %r\n%s" % (prefix, line, self.describe()))
        return line[len(prefix):].strip()

    def send(self, line: str = "go") -> None:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail("child still running after %g s\n%s" % (timeout, self.kill()))

    def finish(self, timeout: float = 30) -> None:
        """Wait for a clean exit (status 0)."""
        status = self.wait(timeout)
        if status != 0:
            pytest.fail("child failed\n%s" % self.describe())

    def kill(self) -> str:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        return self.describe()

    def close(self) -> None:
        self.kill()
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            try:
                stream.close()
            except OSError:
                pass


def run_client(script: str, address, *args, timeout: float = 60) -> list:
    """Run a client script to completion; its stdout lines (fails on status != 0)."""
    child = Child(script, address, *args)
    try:
        child.finish(timeout)
        child.describe()
        return [line.rstrip("\n") for line in child.output]
    finally:
        child.close()


class Children:
    """Every Child a test starts; all killed at teardown."""

    def __init__(self):
        self.all = []

    def __call__(self, script, address, *args) -> Child:
        child = Child(script, address, *args)
        self.all.append(child)
        return child

    def close(self):
        for child in self.all:
            child.close()


@pytest.fixture
def children():
    made = Children()
    yield made
    made.close()


@pytest.fixture
def twistd_server(tmp_path):
    """``twistd -n zeotwist`` in a subprocess serving tmp_path/data.fs."""
    server = start_twistd(str(tmp_path / "data.fs"), env=child_env())
    yield server
    status = server.stop()
    # Shown by pytest only if the test failed.
    print("--- twistd log (exit status %s) ---\n%s" % (status, server.log()))


def wait_for(condition, timeout: float, what: str, interval: float = 0.02):
    """Poll ``condition()`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail("timed out after %g s waiting for %s" % (timeout, what))
        time.sleep(interval)


#: wait_timeout of a client that must be refused at once: so far above any
#: delay of a loaded machine (a password check is a PBKDF2 of a tenth of a
#: CPU-second or more) that a refusal before half of it came from the
#: server, not from the timeout (which would raise the same refusal)
REFUSAL_WAIT = 120.0


def refused_at_once(kinds, connect) -> BaseException:
    """``connect(wait_timeout)`` raises one of ``kinds`` as the server
    refuses, long before ``wait_timeout`` (REFUSAL_WAIT) ends; the error."""
    start = time.monotonic()
    with pytest.raises(kinds) as info:
        connect(REFUSAL_WAIT)
    assert time.monotonic() - start < REFUSAL_WAIT / 2, "refused only at wait_timeout"
    return info.value


# -- raw sockets ------------------------------------------------------------------

def raw_connect(address, timeout: float = 10) -> socket.socket:
    sock = socket.create_connection(address, timeout=timeout)
    sock.settimeout(timeout)
    return sock


def wait_closed(sock: socket.socket, timeout: float) -> float:
    """Read until the server closes ``sock``; seconds it took. Fails on timeout."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail("the server kept the connection open for %g s" % timeout)
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                break
        except (ConnectionResetError, ConnectionAbortedError):
            break
        except socket.timeout:
            continue
    return time.monotonic() - start


def push_until_closed(sock: socket.socket, chunks, limit: int, timeout: float = 20) -> int:
    """Send ``chunks`` (an iterable of bytes) until the server drops the link.

    Returns the bytes sent; fails if ``limit`` bytes went out, or ``timeout``
    seconds passed, with the connection still open.
    """
    sent = 0
    deadline = time.monotonic() + timeout
    sock.settimeout(timeout)
    for chunk in chunks:
        try:
            sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            return sent
        except socket.timeout:
            break
        sent += len(chunk)
        if sent >= limit or time.monotonic() > deadline:
            break
    # Everything went out: the server must still close the link now.
    wait_closed(sock, max(1.0, deadline - time.monotonic()))
    if sent >= limit:
        pytest.fail("the server accepted %d bytes without closing the link" % sent)
    return sent


__all__ = ["Child", "Children", "children", "twistd_server", "run_client", "wait_for",
           "raw_connect", "wait_closed", "push_until_closed", "child_env", "REPO",
           "REFUSAL_WAIT", "refused_at_once",
           "start_twistd"]
