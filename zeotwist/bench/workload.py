"""The client side of the benchmark: one workload in one fresh process.

``python -m zeotwist.bench.workload CASE SYSTEM HOST:PORT OIDFILE [KEY=N ...]``
connects to the server with SYSTEM's client (``zeotwist`` or ``zeo``), runs
CASE and prints one JSON line, ``{"count": n, "seconds": s, "extra": {...}}``,
where only the measured loop is timed (not the interpreter start-up, the
imports, the connection or a warm-up).  The runner
(:mod:`zeotwist.bench.runner`) starts one process per case and round, so
every case starts with empty caches.  ``KEY=N`` parameters: ``count`` (the
commits case), and those of :mod:`~zeotwist.bench.pipelined` and
:mod:`~zeotwist.bench.reads` (``window``, ``passes``, ``reads``,
``cache_size``, ``rate``, ``seed``); the ``pack`` case
(:mod:`~zeotwist.bench.packing`) has none.  The ``writer`` case prints a
``{"ready": true}`` line once connected and commits until its stdin closes.

Also :func:`populate`, which builds the database file both servers serve.
"""
import json
import sys
import time

import persistent
import transaction
from ZODB.utils import maxtid

from zeotwist.bench.procstat import cpu_seconds, latencies, own_peak_rss_mb

#: Objects written per transaction while populating.
POPULATE_BATCH = 1000
#: The commits case cycles over this many (pre-loaded) objects.
COMMIT_WORKING_SET = 100


class Item(persistent.Persistent):
    """One small object (a pickle of a few dozen bytes)."""

    def __init__(self, value):
        self.value = value


def populate(filename: str, objects: int, holders: int = 0) -> list:
    """Write ``root["items"]``, an OOBTree of ``objects`` Items, the
    counters of :mod:`~zeotwist.bench.parallel` and ``holders`` Holders of
    :mod:`~zeotwist.bench.graph` into a new FileStorage; return the Items'
    oids in key order."""
    import ZODB
    from BTrees.OOBTree import OOBTree
    from ZODB.FileStorage import FileStorage

    from zeotwist.bench.graph import populate_graph
    from zeotwist.bench.parallel import populate_counters

    db = ZODB.DB(FileStorage(filename, create=True))
    try:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        items = conn.root()["items"] = OOBTree()
        made = []
        for i in range(objects):
            item = items[i] = Item(i)
            made.append(item)
            if (i + 1) % POPULATE_BATCH == 0:
                tm.commit()
        tm.commit()
        populate_counters(conn, tm)
        populate_graph(conn, tm, holders)
        oids = [item._p_oid for item in made]
        conn.close()
    finally:
        db.close()
    return oids


def open_storage(system: str, host: str, port: int, **kw):
    """SYSTEM's blocking ``ClientStorage``; ``kw`` (e.g. ``cache_size``) goes to it."""
    if system == "zeotwist":
        import zeotwist
        return zeotwist.ClientStorage((host, port), wait_timeout=30, **kw)
    if system == "zeo":
        from ZEO.ClientStorage import ClientStorage
        return ClientStorage((host, port), wait_timeout=30, **kw)
    if system == "local":           # host is a FileStorage path (zeotwist.bench.local)
        from ZODB.FileStorage import FileStorage
        return FileStorage(host)
    raise ValueError("unknown system %r" % (system,))


def cold_reads(storage, oids: list, params: dict) -> dict:
    """Load each oid once with ``loadBefore(oid, maxtid)`` (what a ZODB
    connection does on a cache miss); the caches start empty.  p50/p99 per load."""
    load, clock, samples = storage.loadBefore, time.perf_counter, []
    start = clock()
    for oid in oids:
        t = clock()
        if load(oid, maxtid) is None:
            raise AssertionError("object %s is missing" % oid.hex())
        samples.append(clock() - t)
    return {"count": len(oids), "seconds": clock() - start, "extra": latencies(samples)}


def small_commits(storage, oids: list, params: dict) -> dict:
    """``count`` transactions through ZODB's DB, each changing one Item;
    p50/p99 per commit, and the server's CPU seconds over the timed loop
    (``server_cpu``) when ``server_pid`` is given (Linux)."""
    import ZODB
    count, pid = params.get("count", 0), params.get("server_pid")
    cpu = lambda: cpu_seconds(pid) if pid else None               # noqa: E731
    db = ZODB.DB(storage)
    try:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        items = conn.root()["items"]
        working = [items[i] for i in range(min(COMMIT_WORKING_SET, len(oids)))]
        for item in working:
            item._p_activate()           # loaded before the clock starts
        clock, samples = time.perf_counter, []
        cpu0, start = cpu(), clock()
        for i in range(count):
            t = clock()
            working[i % len(working)].value = i
            tm.commit()
            samples.append(clock() - t)
        elapsed, cpu1 = clock() - start, cpu()
        conn.close()
    finally:
        db.close()
    extra = latencies(samples)
    extra["server_cpu"] = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    return {"count": count, "seconds": elapsed, "extra": extra}


#: Cases that run over a blocking ClientStorage with default settings.
STORAGE_CASES = {"cold": cold_reads, "commits": small_commits}


def run_case(case: str, system: str, host: str, port: int, oids: list, params: dict) -> dict:
    """Run one case; ``{"count": n, "seconds": s, "extra": {...}}``."""
    if case in STORAGE_CASES:
        storage = open_storage(system, host, port)
        try:
            return STORAGE_CASES[case](storage, oids, params)
        finally:
            storage.close()
    if case == "pipelined":
        from zeotwist.bench import pipelined
        return pipelined.run(system, host, port, oids, params)
    if case == "pack":
        from zeotwist.bench import packing
        return packing.pack(system, host, port, oids, params)
    from zeotwist.bench import graph, parallel, reads, records, writes
    cases = dict(reads.CASES, graph=graph.graph_reads, bigrecord=records.big_records,
                 **parallel.CASES, **writes.CASES)
    if case in cases:
        return cases[case](system, host, port, oids, params)
    raise ValueError("unknown case %r" % (case,))


def parse_params(args: list) -> dict:
    """``["count=5", "rate=2.5"]`` -> ``{"count": 5, "rate": 2.5}``."""
    params = {}
    for arg in args:
        key, _, value = arg.partition("=")
        params[key] = float(value) if "." in value else int(value)
    return params


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    case, system, address, oidfile = argv[:4]
    params = parse_params(argv[4:])
    with open(oidfile, "rb") as f:
        raw = f.read()
    oids = [raw[i:i + 8] for i in range(0, len(raw), 8)]
    host, port = (address, "0") if system == "local" else address.rsplit(":", 1)
    result = run_case(case, system, host, int(port), oids, params)
    for one in result.get("rows", {"": result}).values():
        one.setdefault("extra", {})["rss_mb"] = own_peak_rss_mb()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    # Run the module's own copy, so Item pickles as zeotwist.bench.workload.Item.
    from zeotwist.bench.workload import main as _main
    _main()
