"""Bounded resources against the real server (``twistd -n zeotwist`` in a subprocess).

* a client that stops reading its invalidations is dropped once its unread
  output passes ``--max-pending-output``, and the writer is not held up;
* ``--max-connections``: connections past the cap are closed at once, with
  a rate-limited log line instead of one per connection;
* a low file-descriptor limit: the cap stays ``FD_RESERVE`` below it;
* ``accept`` failing anyway (the limit lowered under a running server):
  the port backs off instead of spinning and logs a line or two.

The handshake timeout and hostile bytes (huge length headers, never-ending
boxes) are tests/test_faults.py's.  Each test prints the server's peak
memory (``VmHWM``); every wait has a deadline.
"""
import os
import resource
import socket
import time

import pytest
import transaction
from twisted.protocols import amp
from ZODB import DB
from ZODB.Connection import TransactionMetaData
from ZODB.utils import z64

from zeotwist import ClientStorage
from zeotwist.client.reactorthread import background_reactor
from zeotwist.server.limits import FD_RESERVE
from zeotwist.wire import commands as C

from procutil import child_env, raw_connect, start_twistd, wait_closed, wait_for
from rawamp import BoxReader

MiB = 2**20


def register_box() -> bytes:
    box = amp.AmpBox()
    box.update({b"_command": b"Register", b"_ask": b"1", b"storage": b"1",
                b"protocol": C.PROTOCOL_VERSION.encode(), b"read_only": b"False"})
    return box.serialize()


def register(sock: socket.socket) -> None:
    sock.sendall(register_box())
    answer = BoxReader(sock).box()          # the only bytes the server sends now
    assert answer.get(b"_answer") == b"1", answer


def commit_something(server, key, value) -> None:
    """An ordinary ZODB client connects and commits (10 s to get a connection)."""
    db = DB(ClientStorage(server.address, reactor=background_reactor(), wait_timeout=10))
    try:
        tm = transaction.TransactionManager()
        tm.begin()
        db.open(tm).root()[key] = value
        tm.commit()
    finally:
        db.close()


def server_cpu_seconds(pid: int) -> float:
    fields = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def report(server, scenario: str, **figures) -> None:
    extra = "".join(", %s %s" % kv for kv in figures.items())
    print("[peak memory] %s: server VmHWM %.1f MiB, VmRSS %.1f MiB%s"
          % (scenario, server.peak_rss() / MiB, server.rss() / MiB, extra))


@pytest.fixture
def servers(tmp_path):
    """``servers(*args, preexec_fn=None)`` starts twistd; all stopped at the end."""
    started = []

    def start(*args, preexec_fn=None):
        server = start_twistd(str(tmp_path / "data.fs"), *args, env=child_env(),
                              preexec_fn=preexec_fn)
        started.append(server)
        return server
    yield start
    for server in started:
        status = server.stop()
        print("--- twistd log (exit status %s) ---\n%s" % (status, server.log()))


# -- c. a client that stops reading its invalidations ------------------------------------

OIDS_PER_COMMIT = 2000       # a 16 KB invalidation per commit
CAP = 1 * MiB


class Writer:
    """Commits transactions that each rewrite the same OIDS_PER_COMMIT objects."""

    def __init__(self, server):
        self.storage = ClientStorage(server.address, reactor=background_reactor(),
                                     wait_timeout=10, timeout=60)
        self.oids = [self.storage.new_oid() for _ in range(OIDS_PER_COMMIT)]
        self.serial = z64
        self.slowest = 0.0

    def commit(self) -> None:
        start = time.monotonic()
        txn = TransactionMetaData()
        self.storage.tpc_begin(txn)
        for oid in self.oids:
            self.storage.store(oid, self.serial, b"record", "", txn)
        self.storage.tpc_vote(txn)
        self.serial = self.storage.tpc_finish(txn)
        self.slowest = max(self.slowest, time.monotonic() - start)

    def run(self, count: int) -> float:
        """Commit ``count`` times; commits per second."""
        start = time.monotonic()
        for _ in range(count):
            self.commit()
        return count / (time.monotonic() - start)

    def connections(self) -> int:
        return self.storage.server_status()["connections"]


def test_client_that_stops_reading_is_dropped_and_writer_not_slowed(servers):
    # A short invalidation queue: its 2000 oids a commit are the server's
    # only memory that grows with commits, and it is full before the baseline.
    server = servers("--max-pending-output", "1MB", "--invalidation-queue-size", "10")
    writer = Writer(server)
    stuck = None
    try:
        writer.commit()
        alone = writer.run(40)                      # the writer's rate by itself
        baseline = server.rss()

        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.settimeout(10)
        stuck.connect(server.address)
        register(stuck)                             # ... and never reads again
        assert writer.connections() == 2

        # Commit until the server drops the stuck client (the kernel's socket
        # buffers take a few MB first); bounded by MAX_COMMITS.
        MAX_COMMITS, commits = 1200, 0
        start = time.monotonic()
        while commits < MAX_COMMITS:
            writer.run(10)
            commits += 10
            if writer.connections() == 1:
                break
        stalled = time.monotonic() - start
        assert writer.connections() == 1, "stuck client still connected after %d commits" % commits
        during = commits / stalled
        grown = server.rss() - baseline
        after = writer.run(40)                      # and afterwards
        wait_closed(stuck, 10)
    finally:
        if stuck is not None:
            stuck.close()
        writer.storage.close()

    destined = (commits + 40) * OIDS_PER_COMMIT * 8
    report(server, "client stops reading (--max-pending-output 1MB)",
           **{"commits/s alone": "%.0f" % alone, "while stuck": "%.0f" % during,
              "after": "%.0f" % after, "slowest commit": "%.2f s" % writer.slowest,
              "invalidations meant for the stuck client": "%.1f MiB" % (destined / MiB),
              "RSS growth meanwhile": "%.1f MiB" % (grown / MiB)})
    log = server.log()
    lines = [line for line in log.splitlines() if "client is not reading" in line]
    assert len(lines) == 1, log
    pending = int(lines[0].split("client is not reading: ")[1].split()[0])
    # Dropped by the first invalidation that took it past the cap.
    assert CAP < pending <= CAP + OIDS_PER_COMMIT * 8 + 100, lines
    assert destined > 3 * CAP
    assert grown < 50 * MiB, "server RSS grew by %.1f MiB" % (grown / MiB)
    # Not slowed: no commit waited on the stuck client (its output was queued
    # past the cap above, by commits that finished; a commit waiting on it
    # would have hit the writer's 60 s call timeout, a hang guard).
    assert "Traceback" not in log


# -- d. the connection cap, and the file-descriptor limit ------------------------------------

def open_connections(server, count: int) -> list:
    """``count`` raw connections; None for one the server reset so fast
    that ``connect`` already reports it."""
    socks = []
    for _ in range(count):
        try:
            socks.append(raw_connect(server.address))
        except ConnectionResetError:
            socks.append(None)
    return socks


def close_all(socks: list) -> None:
    for sock in socks:
        if sock is not None:
            sock.close()


def flood(server, count: int, cap: int, batch: int = 25):
    """Open ``count`` connections, the first ``cap`` kept and the others
    expected to be closed by the server at once.  Opened in batches, each
    waited for, so that the listen backlog (50) never overflows.  Returns
    the kept sockets and the longest a batch of refusals took."""
    kept = open_connections(server, cap)
    slowest = 0.0
    for first in range(cap, count, batch):
        socks = open_connections(server, min(batch, count - first))
        start = time.monotonic()
        try:
            for sock in socks:
                if sock is not None:
                    wait_closed(sock, 30)     # a hang guard: the handshake timeout is 60 s
        finally:
            close_all(socks)
        slowest = max(slowest, time.monotonic() - start)
    return kept, slowest


def refusal_lines(log: str) -> list:
    return [line for line in log.splitlines() if "refusing" in line]


def test_connection_cap_closes_excess_connections_at_once(servers):
    # A long handshake timeout: only the cap can close a connection here.
    server = servers("--max-connections", "20", "--handshake-timeout", "60")
    socks, refused_within = flood(server, 40, 20)    # accepted in connect order
    try:
        for sock in socks:                          # the first 20 are served
            register(sock)
        close_all(socks[:5])
        commit_something(server, "capped", 1)       # a normal client gets a slot
    finally:
        close_all(socks)
    report(server, "40 connections, --max-connections 20",
           refused=20, **{"refused within": "%.2f s" % refused_within})
    log = server.log()
    assert 1 <= len(refusal_lines(log)) <= 2, log       # not one per connection
    assert "Traceback" not in log


FD_LIMIT = FD_RESERVE + 30


def low_fd_limit():
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def test_low_fd_limit_caps_connections_below_it(servers):
    # A long handshake timeout: only the descriptor cap can close a connection here.
    server = servers("--handshake-timeout", "60", preexec_fn=low_fd_limit)
    cap = FD_LIMIT - FD_RESERVE                     # 30
    socks, refused_within = flood(server, 300, cap)     # far past the fd limit
    try:
        for sock in socks:
            register(sock)
        close_all(socks)
        commit_something(server, "after the flood", 1)
        report(server, "300 connections, RLIMIT_NOFILE %d" % FD_LIMIT, kept=cap,
               refused=300 - cap, **{"refused within": "%.2f s" % refused_within})
    finally:
        close_all(socks)
    log = server.log()
    assert len(refusal_lines(log)) <= 3, log
    assert "Traceback" not in log and "EMFILE" not in log and "file descriptors" not in log


def test_accept_errors_back_off_and_log_little(servers):
    """The limit drops below what a running server holds: accept fails
    (EMFILE) with no spare descriptor, so the connections wait in the listen
    backlog; the port pauses instead of retrying on every reactor turn."""
    server = servers()
    commit_something(server, "before", 1)
    limits = resource.prlimit(server.pid, resource.RLIMIT_NOFILE)
    socks = []
    try:
        resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (3, limits[1]))
        socks = open_connections(server, 30)        # fewer than the listen backlog
        wait_for(lambda: "EMFILE" in server.log(), 10, "the accept failure")
        cpu = server_cpu_seconds(server.pid)
        watch = time.monotonic()
        while time.monotonic() - watch < 1.0:       # a measuring window, not a wait
            socks.append(raw_connect(server.address))
            time.sleep(0.1)
        busy = server_cpu_seconds(server.pid) - cpu
        assert busy < 0.5, "the server spun for %.2f s of CPU in 1 s" % busy
    finally:
        resource.prlimit(server.pid, resource.RLIMIT_NOFILE, limits)
    try:
        commit_something(server, "after", 2)        # accepting resumes
    finally:
        close_all(socks)
    report(server, "accept failing (EMFILE, limit lowered under a running server)",
           **{"server CPU in 1 s": "%.2f s" % busy})
    log = server.log()
    mine = [line for line in log.splitlines()
            if "file descriptors" in line or "cannot accept" in line]
    assert 1 <= len(mine) <= 3, log
    assert "Could not accept new" not in log and "EMFILE recovery: Closed" not in log, log
    # Twisted logs one traceback when it cannot re-reserve its spare descriptor.
    assert log.count("Traceback") <= log.count("Could not reserve EMFILE") <= 1, log


# -- c'. a client that stops reading the answers to its own requests -----------------------

def load_request(ask: int, oid: bytes) -> bytes:
    box = amp.AmpBox()
    box.update({b"_command": b"LoadBefore", b"_ask": b"%d" % ask, b"oid": oid,
                b"tid": b"\xff" * 8})
    return box.serialize()


RECORD = 60_000            # a record that fits one AMP value (the server's fast path)
REQUESTS = 1000            # 60 MB of answers


def test_client_that_stops_reading_answers_is_throttled(servers):
    server = servers("--max-pending-output", "1MB")
    storage = ClientStorage(server.address, reactor=background_reactor(), wait_timeout=10)
    sock = None
    try:
        oid = storage.new_oid()
        txn = TransactionMetaData()
        storage.tpc_begin(txn)
        storage.store(oid, z64, b"r" * RECORD, "", txn)
        storage.tpc_vote(txn)
        storage.tpc_finish(txn)
        baseline = server.rss()

        def loads():
            return storage.server_status()["loads"]
        sock = raw_connect(server.address)
        register(sock)
        sock.sendall(b"".join(load_request(i, oid) for i in range(2, REQUESTS + 2)))
        # 65 KB of requests asking for 60 MB: the server answers until 1 MB
        # waits unread (and the kernel's socket buffers are full), then stops
        # reading this client.
        wait_for(lambda: loads() >= 16, 10, "the first answers")
        watch = time.monotonic()
        while time.monotonic() - watch < 1.0:       # a measuring window, not a wait
            answered = loads()
            time.sleep(0.1)
        grown = server.rss() - baseline
        assert answered < REQUESTS // 4, "%d answers for a client that reads none" % answered
        # Reading again: reading resumes and every request is answered, in order.
        reader = BoxReader(sock)
        for ask in range(2, REQUESTS + 2):
            answer = reader.box()
            assert answer[b"_answer"] == b"%d" % ask and len(answer[b"data"]) == RECORD
        assert loads() == REQUESTS
    finally:
        if sock is not None:
            sock.close()
        storage.close()
    report(server, "client stops reading answers (--max-pending-output 1MB)",
           **{"answers requested": "%d MiB" % (REQUESTS * RECORD // MiB),
              "answered before it read": answered,
              "RSS growth while it did not read": "%.1f MiB" % (grown / MiB)})
    assert grown < 50 * MiB, "server RSS grew by %.1f MiB" % (grown / MiB)
