"""Client processes that run side by side: ``writers``, ``counter``,
``resolving``, ``oids``, ``tpc``.

The runner (:mod:`zeotwist.bench.groups`) starts ``concurrency`` of them
against one server.  Each connects and prepares, prints ``{"ready": true}``,
waits for a ``go`` line on stdin, runs ``count`` timed iterations, prints
``{"done": true}``, waits for a ``check`` line, then makes one round trip
(``server_status()``: the invalidations of every process's commits arrive
before its answer) and reads the counters in a new transaction; it returns its
result (printed by :mod:`zeotwist.bench.workload`): ``count`` iterations in
``seconds``, the raw per-iteration latencies, conflicts, and the counter
values it saw before ``go`` (``initial``) and after ``check`` (``final``).

* **writers**: process ``index`` increments its own Counter,
  ``root["counters"][index]`` (distinct objects: no conflicts expected).
* **counter**: every process increments ``root["counter"]`` (one object:
  conflicts; a conflicting transaction is aborted and retried, and its
  latency runs from the first attempt to the commit that succeeded).
* **resolving**: every process increments ``root["length"]``, a
  ``BTrees.Length`` (conflicts resolvable), against a server that leaves
  conflict resolution to its clients (the runner starts it so): each
  conflicting commit costs one more round trip (resolve, vote again), which
  a zeotwist server counts (``client_resolutions``, reported as
  ``resolutions``).  The application should see no ConflictError; other
  errors are counted (``errors``) and the increment retried, as ZEO 6.2's
  client-side resolution raises some under concurrent writers.
* **oids**: an iteration allocates 100 oids (``storage.new_oid()``).
* **tpc**: an iteration is an empty two-phase commit on the storage
  (``tpc_begin``, ``tpc_vote``, ``tpc_finish``).
The last two are zodbshootout's "allocate 100 OIDs" and "tpc" figures.
"""
import json
import sys
import time
from functools import partial

import persistent
import transaction
from ZODB.POSException import ConflictError

#: Distinct Counters populated for the writers case (its concurrency limit).
MAX_WRITERS = 8
#: Attempts of one increment before the counter case gives up.
MAX_ATTEMPTS = 1000
#: OIDs allocated per iteration of the oids case.
OIDS_PER_ITERATION = 100


class Counter(persistent.Persistent):
    """An integer without conflict resolution: concurrent increments conflict."""

    def __init__(self):
        self.value = 0


def populate_counters(conn, tm) -> None:
    from persistent.list import PersistentList
    root = conn.root()
    root["counters"] = PersistentList(Counter() for _ in range(MAX_WRITERS))
    root["counter"] = Counter()
    from BTrees.Length import Length
    root["length"] = Length()
    tm.commit()


def _say(**kw) -> None:
    print(json.dumps(kw), flush=True)


def _expect(word: str) -> None:
    line = sys.stdin.readline().strip()
    if line != word:
        raise RuntimeError("expected %r on stdin, got %r" % (word, line))


def _increments(conn, tm, pick, count: int, tolerate=()) -> tuple:
    """``count`` committed increments of ``pick(root)``; ``(samples,
    conflicts, errors)``, errors being the ``tolerate`` exceptions retried."""
    clock, samples, conflicts, errors = time.perf_counter, [], 0, 0
    for _ in range(count):
        t = clock()
        for _attempt in range(MAX_ATTEMPTS):
            tm.begin()
            pick(conn.root()).value += 1
            try:
                tm.commit()
                break
            except ConflictError:
                tm.abort()
                conflicts += 1
            except tolerate:
                tm.abort()
                errors += 1
        else:
            raise RuntimeError("an increment failed %d times" % MAX_ATTEMPTS)
        samples.append(clock() - t)
    return samples, conflicts, errors


def counters(system: str, host: str, port: int, oids: list, params: dict,
             shared: str = "") -> dict:
    """The writers case, or with ``shared`` (a key of the root) the counter
    and resolving cases."""
    import ZODB
    from zeotwist.bench.workload import open_storage
    index, count = params.get("index", 0), params.get("count", 100)
    tolerate = (Exception,) if shared == "length" else ()
    if shared:
        pick = lambda root: root[shared]                         # noqa: E731
    elif index < MAX_WRITERS:
        pick = lambda root: root["counters"][index]               # noqa: E731
    else:
        raise ValueError("the writers case has %d counters" % MAX_WRITERS)
    db = ZODB.DB(open_storage(system, host, port))
    try:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        initial = pick(conn.root()).value
        tm.abort()
        _say(ready=True)
        _expect("go")
        start = time.perf_counter()
        samples, conflicts, errors = _increments(conn, tm, pick, count, tolerate)
        elapsed = time.perf_counter() - start
        _say(done=True)
        _expect("check")
        status = db.storage.server_status()   # a round trip: every commit's invalidation is in
        tm.begin()
        final = pick(conn.root()).value
        tm.abort()
        conn.close()
    finally:
        db.close()
    return {"count": count, "seconds": elapsed,
            "extra": {"samples": samples, "conflicts": conflicts, "errors": errors,
                      "initial": initial, "final": final, "shared": bool(shared),
                      "resolutions": status.get("client_resolutions")}}


def _allocate(storage) -> None:
    for _ in range(OIDS_PER_ITERATION):
        storage.new_oid()


def _empty_tpc(storage) -> None:
    from ZODB.Connection import TransactionMetaData
    txn = TransactionMetaData()
    storage.tpc_begin(txn)
    storage.tpc_vote(txn)
    storage.tpc_finish(txn)


def storage_loop(system: str, host: str, port: int, oids: list, params: dict,
                 op=_allocate) -> dict:
    """The oids case, or with ``op=_empty_tpc`` the tpc case, on a bare ClientStorage."""
    from zeotwist.bench.workload import open_storage
    count = params.get("count", 100)
    storage = open_storage(system, host, port)
    try:
        op(storage)                   # one untimed: first-call costs out of the clock
        _say(ready=True)
        _expect("go")
        clock, samples = time.perf_counter, []
        start = clock()
        for _ in range(count):
            t = clock()
            op(storage)
            samples.append(clock() - t)
        elapsed = clock() - start
        _say(done=True)
        _expect("check")
    finally:
        storage.close()
    return {"count": count, "seconds": elapsed, "extra": {"samples": samples}}


CASES = {"writers": counters, "counter": partial(counters, shared="counter"),
         "resolving": partial(counters, shared="length"),
         "oids": storage_loop, "tpc": partial(storage_loop, op=_empty_tpc)}
