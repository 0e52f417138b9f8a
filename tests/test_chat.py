"""The chat example (docs/examples/chatter.py).

Three chatter processes post 100 lines each, concurrently, through a live
server; every process must show each of the other two's 200 messages exactly
once (its own are not echoed, as the example's docstring says), each
poster's messages in the order they were typed, and the channel's B-tree
must end up with exactly the 300 messages.  The test waits for the outputs
with a deadline, then closes the inputs: each process then waits for its own
commits, reads once more, and exits 0.

Also: ChatSession on its own (same-instant keys, late commits, the cursor's
backup), a participant across a server restart that resets its cache, a
participant stopped by SIGTERM, and DatabasePool stopping with its reactor.
"""
import math
import os
import subprocess
import sys
import threading
import time
import types
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


def test_no_server_is_one_line_not_a_traceback():
    """Nothing listening: one line saying it cannot connect, exit status 1."""
    import socket
    with socket.socket() as bound:                 # bound, not listening: refused
        bound.bind(("127.0.0.1", 0))
        p = Participant(bound.getsockname(), "eve", 0, "--wait-timeout", "1")
        try:
            code = p.finish(time.monotonic() + 20)
        finally:
            p.kill()
    errors = "".join(p.errors)
    assert code == 1, errors
    assert p.errors[-1].startswith("chatter: cannot connect to 127.0.0.1:"), errors
    assert "Traceback" not in errors and len(p.errors) <= 2, errors


# -- ChatSession on its own (an in-memory database) -------------------------------

@pytest.fixture
def chat_root(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import transaction
    import ZODB
    db = ZODB.DB(None)
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    yield conn.root(), tm
    tm.abort()
    conn.close()
    db.close()


def test_messages_at_the_same_instant_all_kept(chat_root, monkeypatch):
    import chatter
    root, tm = chat_root
    chatter.open_session(root, "c")
    session = root[chatter.ROOT_KEY]["c"]
    monkeypatch.setattr(chatter, "time", types.SimpleNamespace(time=lambda: 1000.0))
    keys = [session.add_message("m%d" % i, author)
            for i, author in enumerate(["ann", "bob", "ann", "ann"])]
    tm.commit()
    assert len(set(keys)) == 4 and len(session._messages) == 4
    later = math.nextafter(1000.0, math.inf)
    assert keys == [(1000.0, "ann"), (1000.0, "bob"), (later, "ann"),
                    (math.nextafter(later, math.inf), "ann")]
    assert [m for _, _, m in session.new_messages()] == ["m0", "m1", "m2", "m3"]


def test_new_messages_returns_late_commits_once(chat_root):
    import chatter
    root, tm = chat_root
    chatter.open_session(root, "c")
    session = root[chatter.ROOT_KEY]["c"]
    session._messages[100.0, "ann"] = "first"
    session._messages[200.0, "bob"] = "second"
    assert [m for _, _, m in session.new_messages()] == ["first", "second"]
    assert session.new_messages() == []
    session._messages[150.0, "cyd"] = "late"       # stamped before "second"
    session._messages[250.0, "ann"] = "third"
    assert session.new_messages() == [(150.0, "cyd", "late"), (250.0, "ann", "third")]
    assert session.new_messages() == []
    # Older than the look-back window: taken as final, never scanned again.
    session._messages[250.0 - chatter.LATE - 1, "dee"] = "too late"
    assert session.new_messages() == []


def test_cursor_backup_survives_a_ghost(chat_root):
    import chatter
    root, tm = chat_root
    chatter.open_session(root, "c")
    tm.commit()
    session = root[chatter.ROOT_KEY]["c"]
    session._messages[100.0, "ann"] = "hello"
    tm.commit()
    backup = {}
    assert len(session.new_messages(backup)) == 1
    session._p_invalidate()                        # what dropping the cache does
    assert not hasattr(session, "_v_seen")
    assert session.new_messages(backup) == []      # not the history again
    session._p_invalidate()
    assert len(session.new_messages()) == 1        # without a backup: from the start


def test_participant_survives_a_cache_reset(tmp_path, monkeypatch):
    """A server restart after which the clients cannot verify their caches
    (commits were made meanwhile, and the server remembers too few): they
    drop their caches, ZODB ghosts every object, which drops the _v_
    cursor.  A participant then shows the messages it missed, then the new
    ones, and not the history again."""
    import transaction
    import ZODB
    import ZODB.FileStorage
    from zeotwist.testing import start_server
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import chatter

    filename = str(tmp_path / "data.fs")
    srv = start_server(filename, invalidation_queue_size=1)
    host, port = srv.address
    until = time.monotonic() + 45
    ann = Participant((host, port), "ann")
    bob = Participant((host, port), "bob", 10)
    try:
        ann.process.stdin.write(
            "".join(message("ann", i) + "\n" for i in range(10)).encode())
        ann.process.stdin.flush()
        assert bob.wait_for_all(until), (bob.lines, bob.errors)
        srv.stop()
        db = ZODB.DB(ZODB.FileStorage.FileStorage(filename))    # while nobody serves
        try:
            tm = transaction.TransactionManager()
            session = db.open(tm).root()[chatter.ROOT_KEY]["lobby"]
            for i in range(2):
                session.add_message(message("cyd", i), "cyd")
                tm.commit()
        finally:
            db.close()
        srv = start_server(filename, listen="tcp:%d:interface=127.0.0.1" % port,
                           invalidation_queue_size=1)
        bob.expected = 12
        assert bob.wait_for_all(until), (bob.lines, bob.errors)
        ann.process.stdin.write(
            "".join(message("ann", i) + "\n" for i in range(10, 20)).encode())
        ann.process.stdin.flush()
        bob.expected = 22
        arrived = bob.wait_for_all(until)
        codes = [ann.finish(until), bob.finish(until)]
    finally:
        ann.kill()
        bob.kill()
        srv.stop()
    report = (bob.lines, "".join(ann.errors + bob.errors)[-4000:])
    assert bob.lines == (["ann: " + message("ann", i) for i in range(10)]
                         + ["cyd: " + message("cyd", i) for i in range(2)]
                         + ["ann: " + message("ann", i) for i in range(10, 20)]), report
    assert ann.lines == ["cyd: " + message("cyd", i) for i in range(2)], report
    assert arrived and codes == [0, 0], report


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
