"""Crash durability: the server is SIGKILLed again and again under a writer.

Every transaction the writer saw acknowledged must be in the file with its
payload and tid; nothing the writer never attempted may be; the file must
pass ZODB's fstest and fsrefs, and the BTree its structural check.
"""
import io
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import redirect_stdout

from BTrees.check import check as check_btree
from ZODB import DB
from ZODB.FileStorage import FileStorage
from ZODB.scripts import fsrefs, fstest

import pytest

from zeotwist.testing import start_twistd

#: kills in the default run; the slow run (``--run-slow``) makes 50
KILLS = 20
SLOW_KILLS = 50

WRITER = textwrap.dedent("""
    import os, sys, transaction
    from BTrees.IOBTree import IOBTree
    from ZODB import DB
    from zeotwist import ClientStorage
    sock, attempted, acked, stop = sys.argv[1:5]

    def payload(i):
        return (b"%08d" % i) * (1 + (i * 7919) % 4000)      # 8 B .. 32 KB

    db = DB(ClientStorage(sock, wait_timeout=60))
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    with tm:
        conn.root().setdefault("tree", IOBTree())
    att, ack = open(attempted, "a"), open(acked, "a")
    i = 0
    while not os.path.exists(stop):
        att.write("%d\\n" % i); att.flush()
        try:
            tm.begin()
            conn.root()["tree"][i] = payload(i)
            tm.get().note("txn %d" % i)
            tm.commit()
        except Exception as e:           # server gone mid-commit: retry the same i
            tm.abort()
            conn.close()
            conn = db.open(tm)
            continue
        ack.write("%d %s\\n" % (i, db.storage.lastTransaction().hex())); ack.flush()
        i += 1
    db.close()
""")


def payload(i):
    return (b"%08d" % i) * (1 + (i * 7919) % 4000)


def count_lines(path):
    try:
        with open(path) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def wait_for_progress(acked, seen, deadline=30.0):
    end = time.monotonic() + deadline
    while count_lines(acked) <= seen:
        if time.monotonic() > end:
            raise AssertionError("writer made no progress in %g s" % deadline)
        time.sleep(0.01)          # polling a file another process appends to


def test_acknowledged_transactions_survive_sigkill(tmp_path):
    crash_run(tmp_path, KILLS)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_acknowledged_transactions_survive_50_sigkills(tmp_path):
    """The figure docs/security.md quotes: ``pytest --run-slow -k 50_sigkills -s``."""
    crash_run(tmp_path, SLOW_KILLS)


def crash_run(tmp_path, kills: int) -> None:
    """SIGKILL the server ``kills`` times under a writer; check every
    acknowledged transaction, byte-exact, and the file with fstest/fsrefs."""
    start = time.monotonic()
    data = str(tmp_path / "data.fs")
    sock = str(tmp_path / "zeo.sock")
    attempted, acked, stop = (str(tmp_path / n) for n in ("attempted", "acked", "stop"))
    rng = random.Random(20261125)
    server = start_twistd(data, listen="unix:" + sock)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, sock, attempted, acked, stop],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for kill in range(kills):
            wait_for_progress(acked, count_lines(acked))
            time.sleep(rng.uniform(0.0, 0.3))     # kill at a random moment of the writes
            os.kill(server.pid, signal.SIGKILL)
            server.process.wait(10)
            if os.path.exists(sock):
                os.remove(sock)
            server = start_twistd(data, listen="unix:" + sock)
        wait_for_progress(acked, count_lines(acked))
    finally:
        open(stop, "w").close()
        try:
            out, _ = writer.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            writer.kill()
            out, _ = writer.communicate()
        server.stop()
    assert writer.returncode == 0, out.decode(errors="replace")

    with open(acked) as f:
        acks = [(int(i), bytes.fromhex(t)) for i, t in (line.split() for line in f)]
    with open(attempted) as f:
        tried = {int(line) for line in f if line.strip()}
    assert len(acks) >= kills

    fstest.check(data)                                    # raises on a damaged file
    refs = io.StringIO()
    with redirect_stdout(refs):
        fsrefs.main(data)
    assert refs.getvalue() == "", refs.getvalue()

    fs = FileStorage(data, read_only=True)
    try:
        descriptions = {t.tid: t.description for t in fs.iterator()}
        db = DB(fs)
        conn = db.open()
        tree = conn.root()["tree"]
        check_btree(tree)
        for i, tid in acks:
            assert descriptions.get(tid) == b"txn %d" % i, (i, tid.hex())
            assert tree[i] == payload(i)
        assert set(tree.keys()) <= tried                  # nothing never attempted
        conn.close()
        db.close()
    finally:
        fs.close()
    print("kills survived: %d, acknowledged transactions checked: %d (of %d attempted), "
          "file %.1f MiB, %.0f s" % (kills, len(acks), len(tried),
                                     os.path.getsize(data) / 2**20, time.monotonic() - start))
