"""The ``pipelined`` case: cold loads with many requests outstanding at once.

* **zeotwist**: a Twisted reactor in the client process and the Deferred
  API, ``client = await zeotwist.connect(reactor,
  "tcp:host=127.0.0.1:port=P")``, keeping ``window`` (default 64)
  ``client.load_before(oid, maxtid)`` outstanding: start ``window``, then a
  new one as each finishes, until every oid has been loaded once.
* **ZEO**: ZEO's ClientStorage has no Deferred or future API for loads; its
  pipelined path is ``storage.prefetch(oids, tid)``, which sends a
  ``loadBefore`` for every oid not cached without waiting.  Measured:
  ``prefetch(all oids, maxtid)``, then a blocking ``loadBefore(oid, maxtid)``
  for each (answered from the cache, or joined with the request in flight),
  so the clock stops when every object has arrived.  All requests are in
  flight at once there, not a window.

Both start with empty caches (a fresh process) and time only the loads.
"""
import time

from ZODB.utils import maxtid

#: Loads kept outstanding by the zeotwist client.
DEFAULT_WINDOW = 64


class Window:
    """Load every oid with at most ``width`` loads outstanding.

    ``load(oid, tid)`` returns a Deferred.  :meth:`run` returns a Deferred
    firing with the number loaded once all are done; it fails on the first
    error or missing object.  Starting loads is a loop, not a recursion, so
    loads that complete synchronously (cache hits) do not nest.
    """

    def __init__(self, load, oids, width: int):
        from twisted.internet.defer import Deferred
        self.load = load
        self.oids = iter(oids)
        self.width = width
        self.outstanding = self.loaded = 0
        self.done = Deferred()
        self._filling = self._exhausted = False

    def run(self):
        self._fill()
        return self.done

    def _fill(self) -> None:
        if self._filling or self.done.called:
            return
        self._filling = True
        try:
            while self.outstanding < self.width and not self._exhausted:
                oid = next(self.oids, None)
                if oid is None:
                    self._exhausted = True
                    break
                self.outstanding += 1
                self.load(oid, maxtid).addCallbacks(self._loaded, self._failed, (oid,))
        finally:
            self._filling = False
        if self._exhausted and self.outstanding == 0 and not self.done.called:
            self.done.callback(self.loaded)

    def _loaded(self, result, oid) -> None:
        self.outstanding -= 1
        if result is None:
            return self._failed(AssertionError("object %s is missing" % oid.hex()))
        self.loaded += 1
        self._fill()

    def _failed(self, failure) -> None:
        if not self.done.called:
            self.done.errback(failure)


async def zeotwist_pipelined(reactor, host: str, port: int, oids: list, width: int) -> tuple:
    import zeotwist
    client = await zeotwist.connect(reactor, "tcp:host=%s:port=%d" % (host, port))
    try:
        start = time.perf_counter()
        loaded = await Window(client.load_before, oids, width).run()
        elapsed = time.perf_counter() - start
    finally:
        await client.stop()
    return loaded, elapsed


def run_reactor(async_fn, *args):
    """Run ``async_fn(reactor, *args)`` on the global reactor; its result."""
    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred
    from twisted.python.failure import Failure

    outcome = []

    def start():
        d = ensureDeferred(async_fn(reactor, *args))
        d.addBoth(outcome.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    if not outcome:
        raise RuntimeError("the reactor stopped before the workload finished")
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


def zeo_prefetch(host: str, port: int, oids: list) -> tuple:
    from zeotwist.bench.workload import open_storage
    storage = open_storage("zeo", host, port)
    try:
        load = storage.loadBefore
        start = time.perf_counter()
        storage.prefetch(oids, maxtid)
        for oid in oids:
            if load(oid, maxtid) is None:
                raise AssertionError("object %s is missing" % oid.hex())
        elapsed = time.perf_counter() - start
    finally:
        storage.close()
    return len(oids), elapsed


def run(system: str, host: str, port: int, oids: list, params: dict) -> dict:
    if system == "zeotwist":
        width = params.get("window", DEFAULT_WINDOW)
        n, seconds = run_reactor(zeotwist_pipelined, host, port, oids, width)
        extra = {"window": width}
    else:
        n, seconds = zeo_prefetch(host, port, oids)
        extra = {"window": len(oids)}
    return {"count": n, "seconds": seconds, "extra": extra}
