"""The ``pack`` case: the time a server takes to pack a database with history.

:func:`build` writes the database once, without a server, with a local
FileStorage (a few big transactions, so it takes seconds even for 100,000
objects):

1. ``root["items"]``, an OOBTree of ``objects`` Items, written
   ``BUILD_BATCH`` per transaction;
2. a seeded ``REWRITTEN`` share of the Items changed once (new revisions;
   the old ones are history that the pack drops);
3. a seeded ``DROPPED`` share of the keys deleted from the BTree, so those
   Items become garbage that the pack's garbage collection removes.

The runner copies that file for every server run.  :func:`pack` (in the
client process) connects with SYSTEM's ``ClientStorage`` and times
``storage.pack(time.time(), referencesf)`` until it returns: zeotwist's
ClientStorage asks the server to pack and waits for it to finish; ZEO's
calls the server's ``pack`` with ``wait=1``, which also returns once the pack
is done.  Both servers run FileStorage's packer (with garbage collection) in
a thread beside their event loop.
"""
import random
import time

import transaction

#: Items written per transaction while building.
BUILD_BATCH = 25_000
#: Share of the Items changed once after the first write (history).
REWRITTEN = 0.30
#: Share of the keys deleted from the BTree (garbage for the pack's GC).
DROPPED = 0.10


def build(filename: str, objects: int, seed: int = 5) -> dict:
    """Write the pack case's database into a new FileStorage ``filename``;
    ``{"objects", "rewritten", "dropped", "transactions"}``."""
    import ZODB
    from BTrees.OOBTree import OOBTree
    from ZODB.FileStorage import FileStorage

    from zeotwist.bench.workload import Item

    rng = random.Random(seed)
    db = ZODB.DB(FileStorage(filename, create=True))
    txns = 1                                  # DB() wrote the root
    try:
        tm = transaction.TransactionManager()
        conn = db.open(tm)

        def commit():
            nonlocal txns
            tm.commit()
            conn.cacheGC()
            txns += 1

        items = conn.root()["items"] = OOBTree()
        for i in range(objects):
            items[i] = Item(i)
            if (i + 1) % BUILD_BATCH == 0 and i + 1 < objects:
                commit()
        commit()
        rewritten = rng.sample(range(objects), int(objects * REWRITTEN))
        for j, k in enumerate(rewritten, 1):
            items[k].value = -k
            if j % BUILD_BATCH == 0 and j < len(rewritten):
                commit()
        if rewritten:
            commit()
        dropped = rng.sample(range(objects), int(objects * DROPPED))
        for k in dropped:
            del items[k]
        if dropped:
            commit()
        conn.close()
    finally:
        db.close()
    return {"objects": objects, "rewritten": len(rewritten), "dropped": len(dropped),
            "transactions": txns}


def pack(system: str, host: str, port: int, oids: list, params: dict) -> dict:
    """Time one ``storage.pack(time.time(), referencesf)`` (as of now: every
    revision but the current ones, and every unreachable object, goes)."""
    from ZODB.serialize import referencesf

    from zeotwist.bench.workload import open_storage
    storage = open_storage(system, host, port)
    try:
        storage.lastTransaction()
        start = time.perf_counter()
        storage.pack(time.time(), referencesf)
        elapsed = time.perf_counter() - start
    finally:
        storage.close()
    return {"count": 1, "seconds": elapsed, "extra": {}}
