"""A 200 MB blob stored and loaded back with client and server in separate
processes (twistd, a client script), their peak memory (``VmHWM``)
measured: each grows by less than 100 MB, the blob comes back whole, and
nothing is left in the server's blob ``tmp`` directory.
"""
import json
import os
import subprocess
import sys
import textwrap

from zeotwist.testing import start_twistd


BIG_MB = 200

_BIG_CLIENT = textwrap.dedent('''
    import hashlib, json, os, sys, time
    import transaction, ZODB
    from ZODB.blob import Blob
    from zeotwist import ClientStorage

    def peak():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024

    host, port = sys.argv[1].rsplit(":", 1)
    work, megabytes = sys.argv[2], int(sys.argv[3])
    source = os.path.join(work, "big.bin")
    digest = hashlib.sha256()
    block = bytearray(os.urandom(2**20))
    with open(source, "wb") as f:
        for i in range(megabytes):
            block[:8] = i.to_bytes(8, "big")
            f.write(block)
            digest.update(block)
    del block

    def database(cache):
        return ZODB.DB(ClientStorage((host, int(port)), blob_dir=os.path.join(work, cache),
                                     wait_timeout=30))

    db = database("cache-store")
    conn = db.open()
    base = peak()
    t0 = time.monotonic()
    blob = Blob()
    blob.consumeFile(source)
    conn.root.big = blob
    transaction.commit()
    store = time.monotonic() - t0
    db.close()

    db = database("cache-load")           # an empty cache: the blob is downloaded
    conn = db.open()
    t0 = time.monotonic()
    check = hashlib.sha256()
    with conn.root.big.open() as f:
        for piece in iter(lambda: f.read(2**20), b""):
            check.update(piece)
    load = time.monotonic() - t0
    db.close()
    print(json.dumps(dict(base=base, peak=peak(), store_s=store, load_s=load,
                          same=check.hexdigest() == digest.hexdigest())))
''')


def _peak(pid) -> int:
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM for %d" % pid)


def test_200mb_blob_with_bounded_memory_on_both_sides(tmp_path):
    server = start_twistd(str(tmp_path / "data.fs"), "--blob-dir", str(tmp_path / "blobs"))
    try:
        server_base = _peak(server.pid)
        script = tmp_path / "big_client.py"
        script.write_text(_BIG_CLIENT)
        host, port = server.address
        out = subprocess.run(
            [sys.executable, str(script), "%s:%d" % (host, port), str(tmp_path), str(BIG_MB)],
            capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr + server.log()
        server_peak = _peak(server.pid)
    finally:
        server.stop()
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["same"]
    client_growth = figures["peak"] - figures["base"]
    server_growth = server_peak - server_base
    mb = 2**20
    print("\n200 MB blob: store %.2f s (%.0f MB/s), load %.2f s (%.0f MB/s); peak RSS growth: "
          "client %.1f MB (peak %.1f MB), server %.1f MB (peak %.1f MB)" % (
              figures["store_s"], BIG_MB / figures["store_s"], figures["load_s"],
              BIG_MB / figures["load_s"], client_growth / mb, figures["peak"] / mb,
              server_growth / mb, server_peak / mb))
    assert client_growth < 100 * mb
    assert server_growth < 100 * mb
    # the committed blob is in the server's blob directory, nothing left in its tmp
    assert os.listdir(str(tmp_path / "blobs" / "tmp")) == []
