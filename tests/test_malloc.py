"""The server process's malloc (zeotwist/server/malloc.py): what a big
record's store and loads freed goes back to the system within seconds, the
worker thread's share too (one arena, trimmed every TRIM_INTERVAL seconds),
while the thresholds keep it for reuse in between (tests/test_startup.py)."""
import platform

import pytest

from zeotwist.server.malloc import TRIM_INTERVAL

from procutil import child_env, start_twistd, wait_for
from test_hardening_live import load_with_client, store_record

MiB = 2**20


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc_trim")
def test_a_running_server_gives_back_what_a_big_record_freed(tmp_path):
    server = start_twistd(str(tmp_path / "data.fs"), env=child_env())
    try:
        idle = server.rss()
        oid = store_record(server, 10_000_000)       # voted in a storage thread
        assert load_with_client(server, oid) == 10_000_000
        assert server.peak_rss() > idle + 8 * MiB    # the record passed through
        # before: 10 MB stayed with the storage thread's arena for good
        wait_for(lambda: server.rss() < idle + 4 * MiB, 6 * TRIM_INTERVAL,
                 "the server's resident memory back near %.1f MiB (%.1f now)"
                 % (idle / MiB, server.rss() / MiB))
    finally:
        server.stop()


def test_blob_pieces_freed_go_back_once_they_stop_coming(monkeypatch):
    """trim_after_burst: a trim BURST_QUIET seconds after the last blob
    piece, not at every piece (a transfer keeps its buffers for reuse), and
    not only at the next periodic trim: a blob load right after a store
    then starts from the memory before it (docs/performance.md, "Memory")."""
    from twisted.internet.task import Clock
    from zeotwist.server import malloc
    trims = []
    monkeypatch.setattr(malloc, "release_free_memory", lambda: trims.append(1) or True)
    monkeypatch.setattr(malloc, "_burst", None)
    clock = Clock()
    malloc.trim_periodically(clock)
    assert len(trims) == 1                          # at start
    for _ in range(10):                             # a transfer's pieces
        malloc.trim_after_burst()
        clock.advance(malloc.BURST_QUIET / 2)
    assert len(trims) == 1
    clock.advance(malloc.BURST_QUIET)               # the pieces stopped
    assert len(trims) == 2
    clock.advance(malloc.TRIM_INTERVAL - clock.seconds())
    assert len(trims) == 3                          # the periodic one, as before
