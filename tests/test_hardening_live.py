"""Server-wide limits against the real server, attacked with raw AMP boxes.

Each test starts ``twistd -n zeotwist`` on its own FileStorage, attacks it
from outside the way issue 12 did, and checks the bound: peak memory
(``VmHWM``), descriptors, log lines, the time a real client waits.

* memory: non-reading connections with pipelined loads of a 1 MB record;
  open transactions plus unterminated 4 MB boxes (``--memory-budget``);
* descriptors: iterators under a low ``RLIMIT_NOFILE`` (``--max-iterators``);
* disk: a read-only connection streaming stores; ``--max-spool``;
  ``--vote-timeout``; ``--idle-timeout``;
* the log: answered commands without ``_ask``, a vote of bad records,
  many misbehaving connections.

Logins are tests/test_login_throttle.py's.  ``pytest -s`` prints the figures.
"""
import os
import resource
import socket
import time

import pytest
from twisted.protocols import amp
from ZODB.Connection import TransactionMetaData
from ZODB.utils import p64, z64

from zeotwist import ClientStorage
from zeotwist.client.reactorthread import background_reactor
from zeotwist.server.limits import FD_RESERVE
from zeotwist.wire import commands as C

from procutil import child_env, raw_connect, start_twistd, wait_closed, wait_for
from test_limits_live import (  # noqa: F401 (servers: the fixture)
    BoxReader, close_all, commit_something, report, servers)

MiB = 2**20


def make_box(**fields) -> bytes:
    box = amp.AmpBox()
    box.update({k.encode(): v if isinstance(v, bytes) else str(v).encode()
                for k, v in fields.items()})
    return box.serialize()


def register(sock, read_only=False, long_values=False) -> None:
    fields = dict(long_values=True) if long_values else {}
    sock.sendall(make_box(_command="Register", _ask="1", storage="1", read_only=read_only,
                          protocol=C.PROTOCOL_VERSION, **fields))
    answer = BoxReader(sock).box()
    assert answer.get(b"_answer") == b"1", answer


def next_answer(reader: BoxReader) -> dict:
    """The next box that is not an invalidation."""
    while True:
        box = reader.box()
        if box.get(b"_command") != b"Invalidate":
            return box


def store_piece(data: bytes) -> bytes:
    """A StoreData box carrying ``data`` in 65,535-byte values (BigBytes)."""
    box = amp.AmpBox(_command=b"StoreData")
    step = amp.MAX_VALUE_LENGTH
    box[b"data"] = data[:step]
    for i, off in enumerate(range(step, len(data), step), 1):
        box[b"data.%d" % i] = data[off:off + step]
    return box.serialize()


def unterminated_box(values: int) -> bytes:
    """A StoreData box of ``values`` full AMP values, without its terminator."""
    parts = [make_box(_command="StoreData")[:-2]]
    for i in range(values):
        key = b"data.%d" % i if i else b"data"
        parts.append(len(key).to_bytes(2, "big") + key
                     + amp.MAX_VALUE_LENGTH.to_bytes(2, "big") + b"v" * amp.MAX_VALUE_LENGTH)
    return b"".join(parts)


def store_record(server, size: int) -> bytes:
    storage = ClientStorage(server.address, reactor=background_reactor(), wait_timeout=10)
    try:
        oid = storage.new_oid()
        txn = TransactionMetaData()
        storage.tpc_begin(txn)
        storage.store(oid, z64, b"r" * size, "", txn)
        storage.tpc_vote(txn)
        storage.tpc_finish(txn)
        return oid
    finally:
        storage.close()


def load_with_client(server, oid) -> int:
    storage = ClientStorage(server.address, reactor=background_reactor(), wait_timeout=10)
    try:
        return len(storage.loadBefore(oid, p64(2**63 - 1))[0])
    finally:
        storage.close()


def violation_lines(log: str, text: str = "") -> list:
    return [line for line in log.splitlines() if "protocol violation" in line and text in line]


# -- memory: many connections, each within its own limit ----------------------------

BUDGET = 64 * MiB       # --memory-budget of these tests: output 32, boxes 16, spool 16


def within_budget(server, scenario: str, baseline: int, peak: int) -> None:
    """The peak stays within the budget's half (each scenario fills two
    quarters, or the output half) plus Twisted's copy of one connection's
    output and the server's own churn.  The churn is mostly the scenario's
    timing (how much is queued before the greediest reader is dropped), not
    the malloc thresholds (server/malloc.py): 8 non-reading loaders of 1 MB
    peaked 45.8-58.1 MiB over the baseline with 32/64 MiB, 46.7-53.1 with
    the old 4/16 and 45.0-53.2 with one arena (three runs each), so the
    churn allowance is 32 MiB (24 before e56c3f7, when one run measured
    47.5); without the budget the same scenario took 573 MB."""
    report(server, scenario + ", --memory-budget 64MB",
           **{"RSS before": "%.1f MiB" % (baseline / MiB)})
    assert peak - baseline < BUDGET // 2 + 32 * MiB, "peak %.1f MiB over a %.1f MiB baseline" \
        % (peak / MiB, baseline / MiB)
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("size, long_values", [(1_000_000, False), (3_000_000, True)])
def test_non_reading_loaders_share_one_output_budget(servers, size, long_values):
    """8 read-only connections x 200 pipelined loads of a 1 MB record, none
    reading (issue 12: 573 MB, 64 MB each): the output budget (half of
    --memory-budget) holds them all; the greediest are dropped and a normal
    client's load is answered meanwhile.  Also with a 3 MB record in long
    entries, which the server hands to the socket without copying it into
    a frame (BoundedAMP.emit_parts): still counted, still bounded."""
    server = servers("--memory-budget", "64MB")
    oid = store_record(server, size)
    baseline = server.rss()
    socks = []
    try:
        requests = b"".join(make_box(_command="LoadBefore", _ask=i, oid=oid,
                                     tid=b"\xff" * 8) for i in range(2, 202))
        for _ in range(8):
            sock = raw_connect(server.address)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            register(sock, read_only=True, long_values=long_values)
            sock.sendall(requests)              # 98 KB of requests, 200-600 MB of answers
            socks.append(sock)
        wait_for(lambda: len(violation_lines(server.log(), "unread output")) >= 1, 20,
                 "the greediest reader dropped")
        assert load_with_client(server, oid) == size          # readers still served
        peak = server.peak_rss()
    finally:
        close_all(socks)
    within_budget(server, "8 non-reading connections x 200 loads of %g MB%s" % (
        size / 1e6, " (long entries)" if long_values else ""), baseline, peak)


def test_open_transactions_and_unfinished_boxes_share_budgets(servers):
    """30 writers, each with an open transaction of 8 MiB of stores and an
    unterminated 4 MB box (issue 12: 424 MB): in-memory spools go to disk
    past a quarter of the budget, the largest unfinished boxes are dropped
    past another quarter."""
    server = servers("--memory-budget", "64MB", "--handshake-timeout", "30")
    commit_something(server, "x", 1)
    baseline = server.rss()
    piece = store_piece(b"s" * (MiB - 64))
    unfinished = unterminated_box(63)               # 4.1 MB, just under the box limit
    socks = []
    try:
        for _ in range(30):
            sock = raw_connect(server.address)
            register(sock)
            sock.sendall(make_box(_command="TpcBegin", user=b"", description=b"",
                                  extension=b""))
            for _ in range(8):
                sock.sendall(piece)
            try:
                sock.sendall(unfinished)
            except (BrokenPipeError, ConnectionResetError):
                pass                                # dropped already
            socks.append(sock)
        wait_for(lambda: len(violation_lines(server.log(), "unfinished boxes")) >= 10, 20,
                 "the largest unfinished boxes dropped")
        commit_something(server, "y", 2)            # a normal writer still commits
        peak = server.peak_rss()
    finally:
        close_all(socks)
    within_budget(server, "30 open 8 MiB transactions + unterminated 4 MB boxes",
                  baseline, peak)


def test_unregistered_connection_may_not_send_big_boxes(servers):
    server = servers()
    sock = raw_connect(server.address)
    try:
        sock.sendall(make_box(_command="Register", _ask="1", storage="x" * 60000,
                              junk="j" * 60000)[:-2])
        wait_closed(sock, 10)
    finally:
        sock.close()
    assert len(violation_lines(server.log(), "box larger than 65536")) == 1, server.log()


# -- descriptors: iterators ------------------------------------------------------------

FD_LIMIT = FD_RESERVE + 40


def low_fd_limit():
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def open_fds(pid: int) -> int:
    return len(os.listdir("/proc/%d/fd" % pid))


def test_iterators_cannot_take_the_descriptors(servers):
    """12 read-only connections open 16 iterators each (issue 12: 60 such
    connections took all 1,024 descriptors and new clients were reset) at
    RLIMIT_NOFILE 104: connections plus iterators stay FD_RESERVE below the
    limit; the oldest idle iterators are closed; a normal client registers
    and commits meanwhile."""
    server = servers("--max-iterators", "20", preexec_fn=low_fd_limit)
    commit_something(server, "x", 1)
    socks, answers = [], []
    try:
        for _ in range(12):
            sock = raw_connect(server.address)
            register(sock, read_only=True)
            sock.sendall(b"".join(make_box(_command="IteratorStart", _ask=i)
                                  for i in range(2, 18)))
            reader = BoxReader(sock)
            answers += [reader.box() for _ in range(16)]
            socks.append(sock)
        most = open_fds(server.pid)
        commit_something(server, "y", 2)        # accept, register, commit: still fine
        # the first connection's iterators were closed for the newer ones
        socks[0].sendall(make_box(_command="IteratorNext", _ask=99, iid=1))
        expired = next_answer(BoxReader(socks[0]))
    finally:
        for sock in socks:
            sock.close()
    opened = sum(1 for a in answers if b"_answer" in a)
    report(server, "12 connections x 16 iterators, RLIMIT_NOFILE %d, --max-iterators 20"
           % FD_LIMIT, **{"iterators opened": opened, "most descriptors": most})
    assert opened == 12 * 16                    # each opened, older ones closed for it
    assert most <= FD_LIMIT - FD_RESERVE + 16, most
    assert expired.get(b"_error_code") and b"no iterator 1" in expired[b"_error_description"]
    log = server.log()
    assert "Traceback" not in log and "EMFILE" not in log and "file descriptors" not in log


# -- disk: spools, open transactions -----------------------------------------------------

def spool_files(pid: int) -> int:
    """Deleted temporary files the process holds open (its spools on disk)."""
    count = 0
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            target = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        count += target.endswith("(deleted)")
    return count


def test_read_only_connection_spools_nothing(servers):
    """Issue 12: a read-only connection streamed 100 MiB of stores into a
    spool file and never voted.  Now its stores are dropped on arrival and
    its vote fails with ReadOnlyError."""
    server = servers()
    sock = raw_connect(server.address)
    try:
        register(sock, read_only=True)
        sock.sendall(make_box(_command="TpcBegin", user=b"", description=b"", extension=b""))
        piece = store_piece(b"s" * (MiB - 64))
        for _ in range(40):
            sock.sendall(piece)
        sock.sendall(make_box(_command="Vote", _ask=2))
        answer = BoxReader(sock).box()
        held = spool_files(server.pid)
        peak = server.peak_rss()
    finally:
        sock.close()
    assert answer.get(b"_error_code") == b"READ_ONLY", answer
    assert held == 0
    assert peak < 100 * MiB, peak


def stream_transaction(server, mib: int):
    sock = raw_connect(server.address)
    register(sock)
    sock.sendall(make_box(_command="TpcBegin", user=b"", description=b"", extension=b""))
    piece = store_piece(b"s" * (MiB - 64))
    for _ in range(mib):
        sock.sendall(piece)
    sock.sendall(make_box(_command="LastTransaction", _ask=99))
    assert next_answer(BoxReader(sock)).get(b"_answer") == b"99"   # all of it arrived
    return sock


def test_total_spool_is_bounded(servers):
    server = servers("--max-spool", "20MB")
    first = stream_transaction(server, 15)
    second = stream_transaction(server, 15)
    try:
        second.sendall(make_box(_command="Vote", _ask=2))
        answer = BoxReader(second).box()
    finally:
        first.close()
        second.close()
    assert answer.get(b"_error_code") == b"TOO_LARGE", answer
    assert b"spool is full" in answer[b"_error_description"]
    commit_something(server, "after", 1)        # the first one's spool was released


def test_transaction_must_vote_in_time(servers):
    server = servers("--vote-timeout", "1")
    sock = stream_transaction(server, 2)        # (a raw client: no notice asked for)
    try:
        wait_closed(sock, 30)
    finally:
        sock.close()
    said = [line for line in server.log().splitlines() if "without voting" in line]
    assert len(said) == 1 and "vote timeout: 127.0.0.1:" in said[0], server.log()
    assert not violation_lines(server.log()), server.log()
    assert spool_files(server.pid) == 0


def test_idle_connection_is_closed_reader_is_not(servers):
    """--idle-timeout: a registered connection that does nothing is closed;
    one that takes the invalidations a writer causes stays."""
    server = servers("--idle-timeout", "1.5")
    idle = raw_connect(server.address)
    try:
        register(idle)
        wait_closed(idle, 30)                   # a hang guard
    finally:
        idle.close()
    reader = raw_connect(server.address)
    writer = ClientStorage(server.address, reactor=background_reactor(), wait_timeout=10)
    try:
        register(reader)
        boxes = BoxReader(reader)
        start = time.monotonic()
        oid, serial = writer.new_oid(), z64
        while time.monotonic() - start < 3:     # twice the timeout
            txn = TransactionMetaData()
            writer.tpc_begin(txn)
            writer.store(oid, serial, b"x", "", txn)
            writer.tpc_vote(txn)
            serial = writer.tpc_finish(txn)
            assert boxes.box()[b"_command"] == b"Invalidate"
            time.sleep(0.2)                     # a pace, not a wait for anything
        assert writer.server_status()["connections"] == 2   # the writer and the reader
    finally:
        reader.close()
        writer.close()
    # the idle timeout was the cause (when it fires: test_budgets, on a Clock)
    assert len(violation_lines(server.log(), "idle for 1.5 s")) == 1, server.log()


# -- the log -----------------------------------------------------------------------

def test_client_mistakes_cost_a_line_not_a_traceback(servers):
    """Issue 12: 2,000 answered commands without _ask made 2,000 tracebacks;
    a vote of 1,000 bad records 1,000; 200 KB sent made 6 MB of log."""
    server = servers()
    size_before = len(server.log())
    sent = 0
    # answered commands without _ask, on a read-only connection
    sock = raw_connect(server.address)
    try:
        register(sock, read_only=True)
        flood = make_box(_command="NewOids", count=1) * 2000
        sent += len(flood)
        sock.sendall(flood)
        wait_closed(sock, 10)
    finally:
        sock.close()
    # a vote of 1,000 records that conflict and cannot be resolved (garbage data)
    oid = store_record(server, 10)
    sock = raw_connect(server.address)
    try:
        register(sock)
        sock.sendall(make_box(_command="TpcBegin", user=b"", description=b"", extension=b""))
        record = b"s" + oid + z64 + (7).to_bytes(4, "big") + b"garbage"
        stream = record * 1000
        sent += len(stream)
        sock.sendall(store_piece(stream))
        sock.sendall(make_box(_command="Vote", _ask=2))
        answer = BoxReader(sock).box()
    finally:
        sock.close()
    # 100 connections that each break the protocol
    for _ in range(100):
        sock = raw_connect(server.address)
        sock.sendall(b"\x00\x05hello\x00\x05world\x00\x00")
        sent += 16
        wait_closed(sock, 10)
        sock.close()
    commit_something(server, "after", 1)
    log = server.log()[size_before:]
    lines = log.splitlines()
    report(server, "client mistakes", **{"bytes sent": sent, "log lines": len(lines),
                                         "log bytes": len(log)})
    assert answer.get(b"conflicts") and len(answer[b"conflicts"]) == 1000 * 24, answer.keys()
    assert "Traceback" not in log, log
    assert len(violation_lines(log, "NewOids without _ask")) == 1, log
    assert len([line for line in lines if "conflict resolution failed" in line]) <= 3, log
    assert len(violation_lines(log)) <= 25, log       # 20 per 10 s, then a count
    # Twisted's AMP logs each connection's start and end (info); beyond
    # those, the log grows by little: less than what was sent, not 30 times it.
    assert len(log) < sent, len(log)
