"""The ``graph`` case: cold reads of an object graph through ZODB.

The populated database holds ``root["graph"]``, a :class:`Holder` whose
``children`` list references H Holders, each holding a plain list of
``GRAPH_ITEMS`` (100) persistent Items: a Holder's record names its 100
Items, the traversal a ZODB program makes ("load an object, then the
objects it references").  A fresh client process (empty client cache)
opens a DB, activates ``root["graph"]`` untimed, then, timed, activates
every Holder and every Item in it, in order.  Each activation is timed on
its own: p50/p99 are per activated object.  Reported: objects/s, and the
storage loads that went to the server (round trips; zeotwist's reference
prefetch brings a Holder's Items with it).
"""
import time

import persistent

from zeotwist.bench.procstat import latencies

#: Persistent Items per Holder.
GRAPH_ITEMS = 100


class Holder(persistent.Persistent):
    """A persistent object holding a list of references to other persistent objects."""

    def __init__(self, children):
        self.children = children


def populate_graph(conn, tm, holders: int, per: int = GRAPH_ITEMS) -> None:
    """Add ``root["graph"]``: ``holders`` Holders of ``per`` Items each, one
    transaction per Holder."""
    from zeotwist.bench.workload import Item
    top = conn.root()["graph"] = Holder([])
    tm.commit()
    for h in range(holders):
        top.children.append(Holder([Item(h * per + i) for i in range(per)]))
        top._p_changed = True
        tm.commit()


def graph_reads(system: str, host: str, port: int, oids: list, params: dict) -> dict:
    import transaction
    from zeotwist.bench.reads import LoadCounter, open_db
    storage, db = open_db(system, host, port)
    try:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        holders = list(conn.root()["graph"].children)     # untimed: root and the top
        counter = LoadCounter(system, storage) if system != "local" else None
        clock = time.perf_counter
        samples = []
        start = clock()
        for holder in holders:
            t = clock()
            holder._p_activate()
            samples.append(clock() - t)
            for item in holder.children:
                t = clock()
                item._p_activate()
                samples.append(clock() - t)
        elapsed = clock() - start
        if any(item._p_changed is None for h in holders for item in h.children):
            raise AssertionError("an Item stayed a ghost")
        tm.abort()
        conn.close()
    finally:
        db.close()
    extra = latencies(samples)
    if counter is not None:        # storage loads, and those that went to the server
        extra["loads"], extra["fetched"] = counter.snapshot()
    return {"count": len(samples), "seconds": elapsed, "extra": extra}
