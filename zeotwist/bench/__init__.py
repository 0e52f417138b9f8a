"""``python -m zeotwist.bench``: zeotwist against ZEO 6, in the same run.

Cases (docs/performance.md says more; ``--cases`` picks some):

* **cold**: a fresh client process with empty caches loads each of the
  populated objects once, ``storage.loadBefore(oid, maxtid)``; loads/s.
* **pipelined**: cold loads with many in flight: zeotwist's Deferred API
  with a window of 64 ``load_before`` (ZEO: ``prefetch``); loads/s, and
  the ratio to the sequential cold loads of the same run.
* **warm**: every object loaded again through ZODB with the ZODB cache
  emptied, answered from the client cache; loads/s.
* **hotset**: a read-mostly mix on a hot set with a small client cache and
  a second writer process; ops/s and the client cache's hit ratio.
* **graph**: through ZODB with an empty client cache, every Holder (a
  record referencing 100 persistent Items) and every Item in it activated;
  objects/s, p50/p99 per activation.
* **commits**: one client process commits one changed object per
  transaction through ZODB's ``DB``; commits/s, p50/p99, server CPU.
* **add1000**: one client process commits transactions of 1,000 new
  Items (and the Holder listing them) through ZODB; objects/s, p50/p99
  per commit.
* **invalidation**: a writer commits one change at a time; a second
  client in the same process notes its storage's ``invalidate(tid,
  oids)``; p50/p99 from the start of the commit to that call.
* **writers** / **counter**: 4 client processes started together, each
  incrementing its own Counter / all one Counter (conflicts retried);
  commits/s, p50/p99, the longest and the p99 over time, conflicts, lost
  updates (must be 0).
* **resolving**: the same 4 processes all incrementing one
  ``BTrees.Length``, against a server of each system in client-side
  conflict resolution mode; commits/s, p50/p99, the ConflictErrors and
  other errors the application saw, lost updates, and (zeotwist) the
  re-votes: conflicting commits resolved by a client, one more round trip each.
* **oids** / **tpc**: zodbshootout's "allocate 100 OIDs" and empty
  two-phase commit, at concurrency 1 and 2.
* **bigrecord**: records of 10 MB stored through ZODB, then cold-loaded;
  MB/s both ways.
* **pack**: a database of its own, 100,000 Items with history (30 %
  rewritten once) and garbage (10 % dropped from the BTree), written once
  with a local FileStorage; the time of ``storage.pack(time.time(),
  referencesf)`` from a client; seconds, lower is better.
* **blobs**: ``python -m zeotwist.bench.blobs --json`` once per round for
  both systems, alternated run by run (blob store and load throughput,
  large and small blobs; each run a fresh client process with a server of
  its own); MB/s.

Every row also gets the peak RSS of the client process(es) and of the
server during that case, and with both systems their ratios zeotwist/ZEO.

Server and client always run as separate processes, and the systems
alternate in interleaved rounds; the summary shows medians and the ratio
zeotwist/ZEO.  Modules: :mod:`~zeotwist.bench.runner` (rounds),
:mod:`~zeotwist.bench.report` (the summary),
:mod:`~zeotwist.bench.servers` (server subprocesses),
:mod:`~zeotwist.bench.workload` (client processes, the populated data, the
cold and commits cases), :mod:`~zeotwist.bench.pipelined`,
:mod:`~zeotwist.bench.reads`, :mod:`~zeotwist.bench.graph`,
:mod:`~zeotwist.bench.writes` (add1000, invalidation),
:mod:`~zeotwist.bench.parallel` (with :mod:`~zeotwist.bench.groups`, its
runner side), :mod:`~zeotwist.bench.records` and
:mod:`~zeotwist.bench.packing` (the other cases),
:mod:`~zeotwist.bench.blobs` (blob throughput),
:mod:`~zeotwist.bench.procstat` (peak RSS, CPU, percentiles).
"""
