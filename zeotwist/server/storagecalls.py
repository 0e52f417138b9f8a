"""How storage calls leave the reactor thread: the one seam for threads.

A served storage is called in two ways, chosen once, when the
:class:`~zeotwist.server.storageserver.StorageServer` is made:

* :meth:`StorageThreads.in_order`: the storage's own worker thread, one call
  after the other in submission order.  The commit (``tpc_begin`` ...
  ``tpc_finish``/``tpc_abort``) and blob reads run there, so an abort queued
  behind a vote runs after it.
* :meth:`StorageThreads.in_pool`: the reactor's thread pool, concurrently
  with the worker, for calls that may take long and must not hold up
  commits (pack, history, the undo log, iterator batches), in the manner of
  ``adbapi.runInteraction``.

:meth:`StorageThreads.inline_or_in_order` is ``in_order`` for a call the
caller knows to be short (a small commit's vote, finish or abort on a local
storage: :meth:`StorageServer.commit_call
<zeotwist.server.storageserver.StorageServer.commit_call>`): when no other
call is queued for or running in the worker or the pool, it runs right here
on the reactor thread, which saves two thread hand-offs (a queue put that
wakes the worker, a ``callFromThread`` that wakes the reactor).  Every such
call is timed: one that took longer than :data:`INLINE_SLOW` seconds sends
the next :data:`INLINE_COOLING` calls back to the worker, so a storage that
turns slow (a disk whose fsync stalls) stalls the reactor once, not at every
commit.

:class:`SynchronousCalls` runs both inline, for in-memory tests driven by a
``Clock`` (no threads, deterministic).  Both return Deferreds.

``in_order``/``in_pool`` are called on the reactor thread; the functions
they are given run in the thread named above; results come back to the
reactor thread.
"""
import queue
import threading
from time import perf_counter

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

#: Seconds an inline call may take before inline calls pause (an fsync of a
#: healthy local disk takes 0.1-2 ms).
INLINE_SLOW = 0.005
#: Calls sent to the worker after an inline call was slow, before trying again.
INLINE_COOLING = 100


class StorageThreads:
    def __init__(self, reactor, name: str):
        self._reactor = reactor
        self._worker = StorageWorker(reactor, name)
        self._pooled = 0            # in_pool calls not yet answered
        self._cooling = 0           # calls left to the worker after a slow inline one
        #: calls run on the reactor thread, and how many of them were slow
        self.inline_calls = self.slow_inline_calls = 0

    def in_order(self, f, *args) -> Deferred:
        """Run ``f(*args)`` in the storage's worker thread, after every call
        submitted before; a Deferred of the result."""
        return self._worker.call(f, *args)

    def inline_or_in_order(self, f, *args) -> Deferred:
        """``f(*args)``, known to be short, run here on the reactor thread
        (an already-fired Deferred) when nothing else is queued for or
        running in the worker or the pool; else as :meth:`in_order`."""
        if self._worker.pending or self._pooled:
            return self._worker.call(f, *args)
        if self._cooling:
            self._cooling -= 1
            return self._worker.call(f, *args)
        self.inline_calls += 1
        start = perf_counter()
        try:
            d = succeed(f(*args))
        except Exception:
            d = fail(Failure())
        if perf_counter() - start > INLINE_SLOW:
            self.slow_inline_calls += 1
            self._cooling = INLINE_COOLING
        return d

    def in_pool(self, f, *args) -> Deferred:
        """Run ``f(*args)`` in the reactor's thread pool; a Deferred of the result."""
        self._pooled += 1
        d = deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f, *args)
        return d.addBoth(self._pool_done)

    def _pool_done(self, result):
        self._pooled -= 1
        return result

    def stop(self) -> None:
        """Finish the calls queued for the worker, then end its thread."""
        self._worker.stop()


class SynchronousCalls:
    """Runs every storage call inline (in-memory tests with a Clock)."""

    def in_order(self, f, *args) -> Deferred:
        return maybeDeferred(f, *args)

    in_pool = in_order

    def inline_or_in_order(self, f, *args) -> Deferred:
        return self.in_order(f, *args)

    def stop(self) -> None:
        pass


class StorageWorker:
    """One thread that runs storage calls in submission order.

    Cheaper than a ThreadPool hop (no worker bookkeeping or context
    copying); results come back to the reactor thread with callFromThread.
    """

    def __init__(self, reactor, name: str):
        self._reactor = reactor
        #: calls submitted and not yet delivered (reactor thread only)
        self.pending = 0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call(self, f, *args) -> Deferred:
        """Run ``f(*args)`` in the worker thread; a Deferred of the result."""
        d = Deferred()
        self.pending += 1
        self._queue.put((d, f, args))
        return d

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            d, f, args = item
            try:
                result = f(*args)
            except BaseException:
                result = Failure()
            self._reactor.callFromThread(self._deliver, d, result)

    def _deliver(self, d: Deferred, result) -> None:
        self.pending -= 1
        if isinstance(result, Failure):
            d.errback(result)
        else:
            d.callback(result)

    def stop(self, timeout: float = 60) -> None:
        """Finish the queued calls, then end the thread."""
        self._queue.put(None)
        self._thread.join(timeout)
