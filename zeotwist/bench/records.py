"""The ``bigrecord`` case: storing and cold-loading records of several MB.

One client process: through ZODB's DB, ``records`` transactions each add one
Item whose value is ``mb`` MB of random bytes (the record is that pickle,
a few bytes more) — timed is the commit; then a second ClientStorage in
the same process, its cache empty, loads each record with
``loadBefore(oid, maxtid)`` — timed is the loads.  Reported, as two rows:
MB/s of record data stored and loaded; p50/p99 per commit and per load.
"""
import os
import time

import transaction
from ZODB.utils import maxtid

from zeotwist.bench.procstat import latencies

MB = 10**6


def big_records(system: str, host: str, port: int, oids: list, params: dict) -> dict:
    import ZODB
    from zeotwist.bench.workload import Item, open_storage
    count, size = params.get("records", 3), int(params.get("mb", 10) * MB)
    payload = os.urandom(size)
    clock = time.perf_counter
    db = ZODB.DB(open_storage(system, host, port))
    try:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        stored, made = [], []
        for i in range(count):
            item = Item(payload[:8] + i.to_bytes(8, "big") + payload[16:])
            conn.add(item)
            t = clock()
            tm.commit()
            stored.append(clock() - t)
            made.append(item._p_oid)
        conn.close()
    finally:
        db.close()
    storage = open_storage(system, host, port)
    try:
        loaded = []
        for oid in made:
            t = clock()
            record = storage.loadBefore(oid, maxtid)
            loaded.append(clock() - t)
            if record is None or len(record[0]) < size:
                raise AssertionError("record %s came back short" % oid.hex())
    finally:
        storage.close()
    mb = count * size / MB
    return {"rows": {
        "bigstore": {"count": mb, "seconds": sum(stored), "extra": latencies(stored)},
        "bigload": {"count": mb, "seconds": sum(loaded), "extra": latencies(loaded)}}}
