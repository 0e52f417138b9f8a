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

:class:`SynchronousCalls` runs both inline, for in-memory tests driven by a
``Clock`` (no threads, deterministic).  Both return Deferreds.

``in_order``/``in_pool`` are called on the reactor thread; the functions
they are given run in the thread named above; results come back to the
reactor thread.
"""
import queue
import threading

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure


class StorageThreads:
    def __init__(self, reactor, name: str):
        self._reactor = reactor
        self._worker = StorageWorker(reactor, name)

    def in_order(self, f, *args) -> Deferred:
        """Run ``f(*args)`` in the storage's worker thread, after every call
        submitted before; a Deferred of the result."""
        return self._worker.call(f, *args)

    def in_pool(self, f, *args) -> Deferred:
        """Run ``f(*args)`` in the reactor's thread pool; a Deferred of the result."""
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f, *args)

    def stop(self) -> None:
        """Finish the calls queued for the worker, then end its thread."""
        self._worker.stop()


class SynchronousCalls:
    """Runs every storage call inline (in-memory tests with a Clock)."""

    def in_order(self, f, *args) -> Deferred:
        return maybeDeferred(f, *args)

    in_pool = in_order

    def stop(self) -> None:
        pass


class StorageWorker:
    """One thread that runs storage calls in submission order.

    Cheaper than a ThreadPool hop (no worker bookkeeping or context
    copying); results come back to the reactor thread with callFromThread.
    """

    def __init__(self, reactor, name: str):
        self._reactor = reactor
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call(self, f, *args) -> Deferred:
        """Run ``f(*args)`` in the worker thread; a Deferred of the result."""
        d = Deferred()
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

    @staticmethod
    def _deliver(d: Deferred, result) -> None:
        if isinstance(result, Failure):
            d.errback(result)
        else:
            d.callback(result)

    def stop(self, timeout: float = 60) -> None:
        """Finish the queued calls, then end the thread."""
        self._queue.put(None)
        self._thread.join(timeout)
