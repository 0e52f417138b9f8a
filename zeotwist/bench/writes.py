"""The ``add1000`` and ``invalidation`` cases.

* **add1000**: one client process, through ZODB's DB: ``transactions``
  commits, each adding a :class:`~zeotwist.bench.graph.Holder` of
  ``ADDED`` (1,000) new Items (1,001 new objects, oids allocated by the
  commit).  Timed: the commits; objects/s, p50/p99 per commit.
* **invalidation**: one client process, two clients of the server: a
  writer (a DB) commits one changed Item at a time; a reader (a bare
  storage, as a second application would hold) is registered with a
  listener in place of a DB and notes when the storage calls its
  ``invalidate(tid, oids)`` (what ZODB's DB gets).  Per commit, p50/p99:
  the milliseconds from the start of the writer's commit to the reader's
  ``invalidate`` for that transaction (when another client can see the
  change; the reader often hears before the writer's commit returns), and
  in the notes the p50 of the writer's commit itself and of the time from
  its return to the reader hearing (0 when the reader heard first).  The
  writer waits for each before the next; the rate is commits/s of that loop.
"""
import threading
import time

import transaction

from zeotwist.bench.procstat import latencies

#: New Items per transaction of the add1000 case.
ADDED = 1000
#: Seconds the reader may take to hear of one transaction.
HEAR_TIMEOUT = 30.0


def add_objects(system: str, host: str, port: int, oids: list, params: dict) -> dict:
    import ZODB
    from zeotwist.bench.graph import Holder
    from zeotwist.bench.workload import Item, open_storage
    count, clock, samples = params.get("count", 20), time.perf_counter, []
    db = ZODB.DB(open_storage(system, host, port))
    try:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        for i in range(count):
            conn.add(Holder([Item(i * ADDED + j) for j in range(ADDED)]))
            t = clock()
            tm.commit()
            samples.append(clock() - t)
            conn.cacheMinimize()          # every transaction's objects are new
        conn.close()
    finally:
        db.close()
    return {"count": count * (ADDED + 1), "seconds": sum(samples), "extra": latencies(samples)}


class Listener:
    """Stands for the reader's DB: notes when each transaction's
    invalidation reaches it (on the client's network thread)."""

    def __init__(self):
        self.heard = {}
        self.arrived = threading.Condition()

    def invalidate(self, tid, oids, *args) -> None:
        with self.arrived:
            self.heard[tid] = time.perf_counter()
            self.arrived.notify_all()

    def invalidateCache(self) -> None:
        """Asked after a reconnection; nothing cached here."""

    def transform_record_data(self, data: bytes) -> bytes:
        """As a plain DB (ZODB's conflict resolution asks for both)."""
        return data

    untransform_record_data = transform_record_data

    def wait(self, tid: bytes) -> float:
        with self.arrived:
            if not self.arrived.wait_for(lambda: tid in self.heard, HEAR_TIMEOUT):
                raise RuntimeError("the reader never heard of %s" % tid.hex())
            return self.heard[tid]


def invalidation_latency(system: str, host: str, port: int, oids: list, params: dict) -> dict:
    import ZODB
    from zeotwist.bench.workload import open_storage
    count, clock = params.get("count", 200), time.perf_counter
    reader, listener = open_storage(system, host, port), Listener()
    reader.registerDB(listener)
    db = ZODB.DB(open_storage(system, host, port))
    try:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        item = conn.root()["items"][0]
        item._p_activate()
        visible, commits, after = [], [], []
        start = clock()
        for i in range(count):
            t = clock()
            item.value = i
            tm.commit()
            done = clock()
            heard = listener.wait(db.storage.lastTransaction())
            visible.append(heard - t)
            commits.append(done - t)
            after.append(max(0.0, heard - done))
        elapsed = clock() - start
        conn.close()
    finally:
        db.close()
        reader.close()
    extra = latencies(visible)
    extra.update(commit_p50=latencies(commits)["p50"], after_p50=latencies(after)["p50"])
    return {"count": count, "seconds": elapsed, "extra": extra}


CASES = {"add1000": add_objects, "invalidation": invalidation_latency}
