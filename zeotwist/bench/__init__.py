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
* **commits**: one client process commits one changed object per
  transaction through ZODB's ``DB``; commits/s.
* **pack**: a database of its own, 100,000 Items with history (30 %
  rewritten once) and garbage (10 % dropped from the BTree), written once
  with a local FileStorage; the time of ``storage.pack(time.time(),
  referencesf)`` from a client; seconds, lower is better.
* **blobs**: not part of the rounds: ``python -m zeotwist.bench.blobs``
  (blob store and load throughput) once, after them; MB/s.

Server and client always run as separate processes, and the systems
alternate in interleaved rounds; the summary shows medians and the ratio
zeotwist/ZEO.  Modules: :mod:`~zeotwist.bench.runner` (rounds),
:mod:`~zeotwist.bench.report` (the summary),
:mod:`~zeotwist.bench.servers` (server subprocesses),
:mod:`~zeotwist.bench.workload` (client processes, the populated data, the
cold and commits cases), :mod:`~zeotwist.bench.pipelined`,
:mod:`~zeotwist.bench.reads` and :mod:`~zeotwist.bench.packing` (the other
cases), :mod:`~zeotwist.bench.blobs` (blob throughput).
"""
