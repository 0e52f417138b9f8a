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
    assert os.path.exists(os.path.join(var, "reader-1.zec"))
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
    path = os.path.join(var, "reader-1.zec")
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
