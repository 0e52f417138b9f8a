"""Scale-out figures: ``python -m zeotwist.bench.scaleout``.

Two ``twistd zeotwist -C`` processes serve one RelStorage database on a
PostgreSQL cluster this module starts (initdb in a temporary directory, as
the ``postgres`` user when run as root; :mod:`zeotwist.pgtesting`), or on
``--dsn``.  Clients are ClientStorages in this process.  Two figures:

* **fan-out latency**: a client of server 1 commits, one at a time; a client
  of server 2 notes when it hears of each transaction.  Milliseconds from
  the commit's return to that moment (0 when it heard first), median and
  p99.
* **commits/s through 1 and through 2 servers**: ``--writers`` threads each
  commit ``--commits`` small transactions on objects of their own, all
  through server 1, then half through each server; aggregate commits/s.

Exit status 3 (and one line) when there is no PostgreSQL here.  ``--json``
prints one JSON line (how ``python -m zeotwist.bench`` runs it).  Timings
are only meaningful on a quiet machine.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time

NO_POSTGRES = 3

CONF = """\
%%import relstorage
<zeotwist>
  listen tcp:0:interface=127.0.0.1
</zeotwist>
<relstorage>
  <postgresql>
    dsn %s
  </postgresql>
</relstorage>
"""


def start_servers(dsn: str, directory: str, n: int = 2) -> list:
    from zeotwist.testing import start_twistd
    servers = []
    for i in range(n):
        d = os.path.join(directory, "s%d" % i)
        os.makedirs(d)
        conf = os.path.join(d, "server.conf")
        with open(conf, "w") as f:
            f.write(CONF % dsn)
        servers.append(start_twistd(
            os.path.join(d, "unused.fs"), directory=d,
            server_command=["zeotwist", "-C", conf, "--address-file",
                            os.path.join(d, "zeotwist.address")]))
    return servers


def commit(db, name: str, value) -> None:
    """root[name]['v'] = value (root[name] made beforehand, see ``prepare``),
    retrying conflicts."""
    import transaction
    from ZODB.POSException import ConflictError
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    try:
        for _ in range(100):
            try:
                with tm:
                    conn.root()[name]["v"] = value
                return
            except ConflictError:
                continue
        raise RuntimeError("100 conflicts in a row on %s" % name)
    finally:
        conn.close()


def prepare(db, names) -> None:
    """A PersistentMapping per name in the root, so writers touch only their own."""
    import transaction
    from persistent.mapping import PersistentMapping
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    with tm:
        for name in names:
            conn.root()[name] = PersistentMapping(v=0)
    conn.close()


def fan_out_latency(a, b, db_a, commits: int) -> list:
    """Milliseconds from each commit through ``a`` returning to ``b`` hearing of it."""
    heard: dict = {}
    arrived = threading.Condition()

    def note(event):
        with arrived:
            heard[event.tid] = time.monotonic()
            arrived.notify_all()
    b.client.events.subscribe(note, before_visible=True, any_thread=True)
    latencies = []
    for i in range(commits):
        commit(db_a, "latency", i)
        done, tid = time.monotonic(), a.lastTransaction()
        with arrived:
            if not arrived.wait_for(lambda: tid in heard, 10):
                raise RuntimeError("server 2's client never heard of %s" % tid.hex())
        latencies.append(max(0.0, heard[tid] - done) * 1000)
    return latencies


def commits_per_second(dbs: list, writers: int, commits: int) -> float:
    """Aggregate commits/s of ``writers`` threads, writer i on ``dbs[i % len]``."""
    def write(i):
        db = dbs[i % len(dbs)]
        for n in range(commits):
            commit(db, "writer%d" % i, n)
    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return writers * commits / (time.monotonic() - start)


def measure(dsn: str, directory: str, commits: int, writers: int,
            latency_commits: int) -> dict:
    from ZODB import DB
    from zeotwist import ClientStorage
    servers = start_servers(dsn, directory)
    clients, dbs = [], []
    try:
        for s in servers:
            clients.append(ClientStorage(s.address, wait_timeout=30))
        dbs.append(DB(clients[0]))
        prepare(dbs[0], ["latency"] + ["writer%d" % i for i in range(writers)])
        while clients[1].lastTransaction() < clients[0].lastTransaction():
            time.sleep(0.01)      # polling a real condition: server 2 hears of them
        dbs.append(DB(clients[1]))
        latencies = sorted(fan_out_latency(clients[0], clients[1], dbs[0], latency_commits))
        one = commits_per_second(dbs[:1], writers, commits)
        two = commits_per_second(dbs, writers, commits)
        p99 = latencies[min(len(latencies) - 1, int(round(0.99 * (len(latencies) - 1))))]
        return dict(latency_ms=dict(median=statistics.median(latencies), p99=p99,
                                    count=len(latencies)),
                    commits_per_s={"1 server": one, "2 servers": two},
                    writers=writers, commits=commits)
    finally:
        for db in dbs:
            db.close()
        for cs in clients:
            cs.close()
        for s in servers:
            s.stop()


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m zeotwist.bench.scaleout",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--dsn", help="a PostgreSQL database to use (default: start a cluster)")
    p.add_argument("--commits", type=int, default=200, help="commits per writer (200)")
    p.add_argument("--writers", type=int, default=4, help="writer threads (4)")
    p.add_argument("--latency-commits", type=int, default=200,
                   help="commits timed for the fan-out latency (200)")
    p.add_argument("--quick", action="store_true", help="20 commits per writer, 20 timed")
    p.add_argument("--json", action="store_true", help="one JSON line")
    args = p.parse_args(argv)
    if args.quick:
        args.commits, args.latency_commits = 20, 20
    return args


def report(result: dict) -> str:
    lat, rate = result["latency_ms"], result["commits_per_s"]
    return "\n".join([
        "scale-out (RelStorage on PostgreSQL, 2 zeotwist servers):",
        "  fan-out latency  median %.1f ms, p99 %.1f ms (%d commits)"
        % (lat["median"], lat["p99"], lat["count"]),
        "  commits/s        %.0f through 1 server, %.0f through 2 (%d writers x %d commits)"
        % (rate["1 server"], rate["2 servers"], result["writers"], result["commits"])])


def main(argv=None) -> int:
    args = parse(argv)
    cluster = None
    with tempfile.TemporaryDirectory(prefix="zeotwist-scaleout-") as directory:
        try:
            dsn = args.dsn
            if dsn is None:
                from zeotwist.pgtesting import PostgresCluster, PostgresUnavailable
                try:
                    import psycopg2  # noqa: F401
                    import relstorage  # noqa: F401
                    cluster = PostgresCluster().start()
                except (ImportError, PostgresUnavailable) as e:
                    print("scale-out: skipped: no PostgreSQL here (%s)" % e)
                    return NO_POSTGRES
                dsn = cluster.dsn(cluster.create_database())
            result = measure(dsn, directory, args.commits, args.writers,
                             args.latency_commits)
        finally:
            if cluster is not None:
                cluster.stop()
    print(json.dumps(result) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
