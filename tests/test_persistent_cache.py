"""The persistent client cache (``client=``/``var=``) across client processes."""
import os
import subprocess
import sys
import textwrap

import pytest
from ZODB import DB

from zeotwist.errors import CacheLockedError

N = 200

READER = textwrap.dedent("""
    import sys
    from ZODB.utils import p64
    from zeotwist import ClientStorage
    host, port, var, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    cs = ClientStorage((host, port), client="reader", var=var, wait_timeout=10)
    values = [cs.load(p64(i))[0] for i in range(1, n + 1)]
    print(cs.client.cache.stats()["hits"], sum(len(v) for v in values), flush=True)
    cs.close()
""")


def run_reader(server, var, n=N):
    host, port = server.address
    out = subprocess.run([sys.executable, "-c", READER, host, str(port), var, str(n)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    hits, size = out.stdout.split()
    return int(hits), int(size)


def loads(server):
    return server.server.stats["loads"]


def commit_new_objects(make_client, count):
    from persistent.mapping import PersistentMapping
    db = DB(make_client())
    with db.transaction() as conn:
        root = conn.root()
        for i in range(count):
            root["obj%d" % i] = PersistentMapping(v=i)
    db.close()


def test_restarted_process_reuses_its_cache(server, make_client, tmp_path):
    commit_new_objects(make_client, N)          # oids 1..N are the mappings
    var = str(tmp_path / "var")
    os.mkdir(var)
    before = loads(server)
    hits1, size1 = run_reader(server, var)
    first = loads(server) - before
    assert first >= N and hits1 == 0
    assert os.path.exists(os.path.join(var, "reader-1.ztc"))
    before = loads(server)
    hits2, size2 = run_reader(server, var)
    assert loads(server) - before == 0          # nothing fetched again
    assert hits2 == N and size2 == size1


def test_changes_while_away_are_verified(server, make_client, tmp_path):
    commit_new_objects(make_client, N)
    var = str(tmp_path)
    run_reader(server, var)
    db = DB(make_client())
    with db.transaction() as conn:             # change 3 objects while the reader is away
        for i in range(3):
            conn.root()["obj%d" % i]["v"] = "changed"
    db.close()
    before = loads(server)
    hits, _ = run_reader(server, var)
    assert loads(server) - before == 3          # exactly the changed ones came again
    assert hits == N - 3


def test_corrupt_cache_file_is_discarded(server, make_client, tmp_path):
    commit_new_objects(make_client, N)
    var = str(tmp_path)
    _, size = run_reader(server, var)
    path = os.path.join(var, "reader-1.ztc")
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\xffGARBAGE\xff")
    before = loads(server)
    hits, size2 = run_reader(server, var)
    assert hits == 0 and loads(server) - before >= N      # started cold, not trusting it
    assert size2 == size


def test_one_process_per_cache_file(server, make_client, tmp_path):
    from zeotwist import ClientStorage
    from zeotwist.client.reactorthread import background_reactor
    first = ClientStorage(server.address, client="solo", var=str(tmp_path),
                          reactor=background_reactor(), wait_timeout=10)
    try:
        with pytest.raises(CacheLockedError):
            ClientStorage(server.address, client="solo", var=str(tmp_path),
                          reactor=background_reactor(), wait_timeout=10)
    finally:
        first.close()
    again = ClientStorage(server.address, client="solo", var=str(tmp_path),
                          reactor=background_reactor(), wait_timeout=10)
    again.close()


def zeo_cache_file(path: str) -> bytes:
    """A real ZEO cache file at ``path``; its bytes."""
    import ZEO.cache
    cache = ZEO.cache.ClientCache(path, size=200_000)
    cache.setLastTid(b"\0" * 7 + b"\1")
    cache.close()
    with open(path, "rb") as f:
        return f.read()


def test_a_zeo_cache_file_beside_ours_is_left_alone(server, make_client, tmp_path):
    """ZEO names its file <client>-<storage>.zec; ours is .ztc, and a ZEO
    client and a zeotwist client of the same name share a var folder."""
    commit_new_objects(make_client, N)
    var = str(tmp_path)
    zeo_path = os.path.join(var, "reader-1.zec")
    zeo_bytes = zeo_cache_file(zeo_path)
    run_reader(server, var)
    hits, _ = run_reader(server, var)
    assert hits >= N                                   # ours was written and reused
    assert os.path.exists(os.path.join(var, "reader-1.ztc"))
    with open(zeo_path, "rb") as f:
        assert f.read() == zeo_bytes                   # ZEO's, untouched


def test_a_cache_path_naming_a_file_not_ours_is_refused(server, tmp_path):
    from zeotwist import ClientStorage
    from zeotwist.client.reactorthread import background_reactor
    from zeotwist.errors import ForeignCacheFile
    zeo_path = str(tmp_path / "app-1.zec")
    zeo_bytes = zeo_cache_file(zeo_path)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ForeignCacheFile, match="a ZEO cache file"):
        ClientStorage(server.address, cache_path=zeo_path, reactor=background_reactor(),
                      wait_timeout=10)
    with open(zeo_path, "rb") as f:
        assert f.read() == zeo_bytes
    assert sorted(os.listdir(tmp_path)) == before      # nothing made beside it
