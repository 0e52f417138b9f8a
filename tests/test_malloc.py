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
