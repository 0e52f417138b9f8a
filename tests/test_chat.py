"""The chat example (docs/examples/chatter.py) with three real participants.

Three chatter processes post 100 lines each, concurrently, through a live
server; every process must show each of the other two's 200 messages exactly
once (its own are not echoed, as the example's docstring says), each
poster's messages in the order they were typed, and the channel's B-tree
must end up with exactly the 300 messages.  The test waits for the outputs
with a deadline, then closes the inputs: each process then waits for its own
commits, reads once more, and exits 0.
"""
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "docs" / "examples"
CHATTER = EXAMPLES / "chatter.py"
PEOPLE = ("ann", "bob", "cyd")
LINES = 100
ARRIVAL_DEADLINE = 45.0       # seconds for all messages to be shown
EXIT_DEADLINE = 15.0          # then, for the processes to exit


class Participant:
    """A chatter process; its stdout lines are collected by a thread."""

    def __init__(self, address, name, expected=0, *options):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        self.name = name
        self.expected = expected             # how many lines it must show
        self.process = subprocess.Popen(
            [sys.executable, str(CHATTER), "--server", "%s:%d" % address,
             "--name", name, "--wait-timeout", "20", *options],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=env, cwd=str(REPO))
        self.lines: list[str] = []
        self.eof = False
        self.errors: list[str] = []
        self.changed = threading.Condition()
        self._threads = [threading.Thread(target=self._read, daemon=True),
                         threading.Thread(target=self._drain, daemon=True)]
        for t in self._threads:
            t.start()

    def _read(self):
        for raw in self.process.stdout:
            with self.changed:
                self.lines.append(raw.decode("utf-8").rstrip("\n"))
                self.changed.notify_all()
        with self.changed:
            self.eof = True                  # it exited (or closed stdout)
            self.changed.notify_all()

    def _drain(self):
        for raw in self.process.stderr:
            with self.changed:
                self.errors.append(raw.decode("utf-8", "replace"))
                self.changed.notify_all()

    def wait_for_error_line(self, text: str, until: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: any(text in e for e in self.errors),
                                         max(0.0, until - time.monotonic()))

    def wait_for_all(self, until: float) -> bool:
        """Wait (until the monotonic time ``until``) for every expected line;
        False at once if the process ends its output first."""
        with self.changed:
            self.changed.wait_for(lambda: len(self.lines) >= self.expected or self.eof,
                                  max(0.0, until - time.monotonic()))
            return len(self.lines) >= self.expected

    def finish(self, until: float):
        """Close its input; its exit code, or None if it is still running at ``until``."""
        try:
            self.process.stdin.close()
        except BrokenPipeError:
            pass
        try:
            code = self.process.wait(max(0.1, until - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            code = None
        for t in self._threads:
            t.join(max(0.1, until - time.monotonic()))
        return code

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def message(name, i):
    return "%s says %03d" % (name, i)


def test_three_participants_see_every_message_once(server, make_client, monkeypatch):
    arrival = time.monotonic() + ARRIVAL_DEADLINE
    others = (len(PEOPLE) - 1) * LINES
    people = [Participant(server.address, name, others) for name in PEOPLE]
    try:
        # Everyone types at once: the lines sit in the pipes until each
        # process has joined the channel, then are posted one commit each.
        for p in people:
            p.process.stdin.write(
                "".join(message(p.name, i) + "\n" for i in range(LINES)).encode())
            p.process.stdin.flush()
        arrived = [p.wait_for_all(arrival) for p in people]
        leave = time.monotonic() + EXIT_DEADLINE
        codes = [p.finish(leave) for p in people]
    finally:
        for p in people:
            p.kill()
    report = {p.name: (len(p.lines), "".join(p.errors)[-4000:]) for p in people}

    for p in people:
        want = Counter("%s: %s" % (other, message(other, i))
                       for other in PEOPLE if other != p.name for i in range(LINES))
        got = Counter(p.lines)
        assert got == want, (p.name, "extra:", got - want, "missing:", want - got, report)
        for other in PEOPLE:                                    # each poster in order
            said = [line for line in p.lines if line.startswith(other + ": ")]
            assert said == sorted(said)
    assert all(arrived), report
    assert codes == [0] * len(people), report

    # The database: exactly the 300 messages, stored as chatter.ChatSession.
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import ZODB
    db = ZODB.DB(make_client())
    try:
        conn = db.open()
        session = conn.root()["chatter"]["lobby"]
        assert type(session).__module__ == "chatter"
        assert len(session._messages) == len(PEOPLE) * LINES
        assert sorted(session._messages.values()) == sorted(
            message(name, i) for name in PEOPLE for i in range(LINES))
        authors = Counter(author for _, author in session._messages.keys())
        assert authors == {name: LINES for name in PEOPLE}
        conn.close()
    finally:
        db.close()


def test_terminated_participant_exits(server):
    """SIGTERM stops the reactor; the pool's worker thread must not keep the
    process alive (DatabasePool stops with its reactor)."""
    until = time.monotonic() + 20
    p = Participant(server.address, "dee", 0, "--verbose")
    try:
        assert p.wait_for_error_line("joined channel", until), p.errors
        p.process.terminate()
        try:
            code = p.process.wait(max(0.1, until - time.monotonic()))
        except subprocess.TimeoutExpired:
            code = None
    finally:
        p.kill()
    assert code is not None, "still running after SIGTERM: " + "".join(p.errors)[-4000:]
    assert not any("Traceback" in e for e in p.errors), "".join(p.errors)


def test_database_pool_stops_with_its_reactor():
    """The pool's shutdown trigger stops its threads (it once raised
    ValueError removing itself while firing, leaving a worker running)."""
    from twisted.internet.selectreactor import SelectReactor
    from zeotwist import DatabasePool
    reactor = SelectReactor()          # a private, never-run reactor
    pool = DatabasePool(None, reactor)
    try:
        assert pool.threadpool.started
        reactor.fireSystemEvent("shutdown")
        assert not pool.threadpool.started
        pool.close()                   # and closing again is harmless
    finally:
        if pool.threadpool.started:    # else its worker keeps pytest from exiting
            pool.threadpool.stop()
        reactor.removeReader(reactor.waker)
        reactor.waker.connectionLost(None)
