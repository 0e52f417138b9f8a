"""``python -m zeotwist.bench``: zeotwist against ZEO 6, in the same run.

Cases (docs/performance.md says more):

* **cold reads**: a fresh client process with empty caches loads each of the
  populated objects once, ``storage.loadBefore(oid, maxtid)``; loads/s.
* **small commits**: one client process commits one changed object per
  transaction through ZODB's ``DB``; commits/s.

Server and client always run as separate processes, and the systems
alternate in interleaved rounds; the summary shows medians and the ratio
zeotwist/ZEO.  Modules: :mod:`~zeotwist.bench.runner` (rounds and summary),
:mod:`~zeotwist.bench.servers` (server subprocesses),
:mod:`~zeotwist.bench.workload` (the client processes and the populated data).
"""
