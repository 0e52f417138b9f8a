"""Read cases through ZODB: ``warm``, ``hotset``, and the ``writer`` beside it.

* **warm**: a DB over the client storage (default settings: a 20 MiB client
  cache holds every object).  Untimed: every Item is loaded once (cold
  loads fill the client cache).  Timed, ``passes`` times: the ZODB
  connection cache is emptied (``conn.cacheMinimize()``, untimed), then every
  Item is activated again, so each activation is one storage ``loadBefore``
  answered from the client cache.  Also timed, as an extra: a plain
  ``storage.loadBefore(oid, maxtid)`` for every oid (the client cache alone,
  without ZODB's unpickling).
* **hotset**: a read-mostly mix.  A fixed hot set, 10 % of the Items chosen
  with a seeded RNG, gets 95 % of the reads; the rest go uniformly to the
  other Items.  Every ``READS_PER_COMMIT`` reads the client changes the
  Item it read last and commits; after each transaction the ZODB
  connection cache is emptied, so every read is a storage load.  The client
  cache is ``cache_size`` bytes (the runner sizes it so that the hot set fits
  but the whole database does not).  An untimed warm-up of the same mix comes
  first.  Meanwhile a **writer** process commits one change to a random Item
  at a steady ``rate`` per second, so invalidations arrive throughout.
  Reported: operations (reads + commits) per second, and the share of
  storage loads answered without a server round trip, counted by the bench
  around the storage (the same way for both systems), next to the caches' own
  statistics.

A commit that conflicts with the writer is aborted and counted (the Items
do not resolve conflicts); the run goes on.
"""
import json
import random
import sys
import threading
import time

import transaction
from ZODB.POSException import ConflictError
from ZODB.utils import maxtid

#: Passes of the timed warm loop.
WARM_PASSES = 3
#: Share of the Items in the hot set, and share of the reads that go to it.
HOT_SHARE = 0.10
HOT_READS = 0.95
#: One commit per this many reads in the hotset case.
READS_PER_COMMIT = 100
#: Commits per second of the writer process.
WRITER_RATE = 50.0
#: A writer stops by itself after this many seconds.
WRITER_LIMIT = 900.0


def open_db(system: str, host: str, port: int, **kw):
    import ZODB
    from zeotwist.bench.workload import open_storage
    storage = open_storage(system, host, port, **kw)
    try:
        return storage, ZODB.DB(storage)
    except Exception:
        storage.close()
        raise


def all_items(conn) -> list:
    """Every Item, in key order (= the oid file's order), as ghosts: only the
    BTree's buckets are loaded."""
    return list(conn.root()["items"].values())


def warm_reads(system: str, host: str, port: int, oids: list, params: dict) -> dict:
    passes = params.get("passes", WARM_PASSES)
    storage, db = open_db(system, host, port)
    try:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        items = all_items(conn)
        for item in items:
            item._p_activate()       # cold: fills the client cache (not timed)
        elapsed = 0.0
        for _ in range(passes):
            conn.cacheMinimize()
            if any(item._p_changed is not None for item in items):
                raise AssertionError("cacheMinimize left an Item active")
            start = time.perf_counter()
            for item in items:
                item._p_activate()
            elapsed += time.perf_counter() - start
        load = storage.loadBefore
        start = time.perf_counter()
        for oid in oids:
            load(oid, maxtid)
        direct = time.perf_counter() - start
        tm.abort()
        conn.close()
    finally:
        db.close()
    count = passes * len(items)
    return {"count": count, "seconds": elapsed,
            "extra": {"storage_rate": len(oids) / direct, "passes": passes}}


class LoadCounter:
    """Counts the storage's loads and those that went to the server.

    Wraps, on the instances, ``storage.loadBefore`` (what ZODB calls) and the
    calls each ClientStorage makes only on a cache miss:
    ``storage.client.load_from_thread`` when it sent the request and
    ``storage.client.fetch_before`` (zeotwist; ``load_before`` in versions
    without them) or ``storage._server.load_before`` (ZEO)."""

    def __init__(self, system: str, storage):
        self.loads = self.misses = 0
        load = storage.loadBefore

        def counted_load(oid, tid):
            self.loads += 1
            return load(oid, tid)

        target = storage.client if system == "zeotwist" else storage._server
        name = "fetch_before" if hasattr(target, "fetch_before") else "load_before"
        fetch = getattr(target, name)

        def counted_fetch(oid, tid):
            self.misses += 1
            return fetch(oid, tid)

        storage.loadBefore = counted_load
        setattr(target, name, counted_fetch)
        sent_by_thread = getattr(target, "load_from_thread", None)
        if sent_by_thread is not None:     # zeotwist: the application thread sends it

            def counted_thread_load(oid, tid):
                sent = sent_by_thread(oid, tid)
                self.misses += sent is not None     # else fetch_before, counted above
                return sent

            target.load_from_thread = counted_thread_load

    def snapshot(self) -> tuple:
        return self.loads, self.misses


def cache_counters(system: str, storage) -> tuple:
    """``(hits, misses)`` from the client cache's own statistics; ZEO's cache
    counts hits only (``getStats()[4]``, accesses), so misses is None."""
    if system == "zeotwist":
        s = storage.client.cache.stats()
        return s["hits"], s["misses"]
    return storage._cache.getStats()[4], None


class HotSet:
    """A fixed hot set of ``HOT_SHARE`` of ``n`` Item indexes, chosen with ``rng``."""

    def __init__(self, n: int, rng: random.Random):
        self.rng = rng
        self.hot = rng.sample(range(n), max(1, int(n * HOT_SHARE)))
        hot = set(self.hot)
        self.cold = [i for i in range(n) if i not in hot] or self.hot

    def picks(self, count: int) -> list:
        """``count`` indexes: HOT_READS of them from the hot set, the rest from the others."""
        rng, hot, cold = self.rng, self.hot, self.cold
        return [rng.choice(hot) if rng.random() < HOT_READS else rng.choice(cold)
                for _ in range(count)]


def mix(conn, tm, items: list, picks: list) -> tuple:
    """Reads ``picks``, committing one change every READS_PER_COMMIT reads;
    ``(reads, commits, conflicts)``."""
    commits = conflicts = 0
    for i, k in enumerate(picks, 1):
        items[k].value              # a ghost: one storage load
        if i % READS_PER_COMMIT == 0 or i == len(picks):
            items[k].value = i      # the Item just read: a pick of the same mix
            try:
                tm.commit()
                commits += 1
            except ConflictError:
                tm.abort()
                conflicts += 1
            conn.cacheMinimize()
    return len(picks), commits, conflicts


def hotset(system: str, host: str, port: int, oids: list, params: dict) -> dict:
    rng = random.Random(params.get("seed", 1))
    storage, db = open_db(system, host, port, cache_size=params["cache_size"])
    try:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        items = all_items(conn)
        reads = params.get("reads", 50_000)
        mixer = HotSet(len(items), rng)
        warmup = mixer.picks(10 * len(mixer.hot))
        timed = mixer.picks(reads)
        tm.abort()
        conn.cacheMinimize()
        mix(conn, tm, items, warmup)
        counter = LoadCounter(system, storage)
        hits0, misses0 = cache_counters(system, storage)
        start = time.perf_counter()
        n, commits, conflicts = mix(conn, tm, items, timed)
        elapsed = time.perf_counter() - start
        hits1, misses1 = cache_counters(system, storage)
        loads, fetched = counter.snapshot()
        tm.abort()
        conn.close()
    finally:
        db.close()
    extra = {"reads": n, "commits": commits, "conflicts": conflicts, "loads": loads,
             "fetched": fetched, "hit_ratio": 1 - fetched / loads if loads else None,
             "cache_hits": hits1 - hits0,
             "cache_misses": None if misses0 is None else misses1 - misses0}
    return {"count": n + commits, "seconds": elapsed, "extra": extra}


def writer(system: str, host: str, port: int, oids: list, params: dict) -> dict:
    """Commit a change to a random Item ``rate`` times a second until stdin
    closes (or WRITER_LIMIT seconds pass); print ``{"ready": true}`` first."""
    rate = float(params.get("rate", WRITER_RATE))
    rng = random.Random(params.get("seed", 2))
    stop = threading.Event()

    def watch_stdin():
        sys.stdin.read()
        stop.set()

    storage, db = open_db(system, host, port)
    try:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        items = all_items(conn)
        threading.Thread(target=watch_stdin, daemon=True).start()
        print(json.dumps({"ready": True}), flush=True)
        commits = conflicts = 0
        start = next_at = time.perf_counter()
        while not stop.is_set() and next_at - start < WRITER_LIMIT:
            rng.choice(items).value = commits
            try:
                tm.commit()
                commits += 1
            except ConflictError:
                tm.abort()
                conflicts += 1
            next_at += 1.0 / rate
            stop.wait(max(0.0, next_at - time.perf_counter()))
        elapsed = time.perf_counter() - start
        tm.abort()
        conn.close()
    finally:
        db.close()
    return {"count": commits, "seconds": elapsed, "extra": {"conflicts": conflicts}}


CASES = {"warm": warm_reads, "hotset": hotset, "writer": writer}
