"""Run ZODB work from a reactor program: the ``runInteraction`` shape.

:class:`DatabasePool` owns a thread pool.  ``run_in_transaction(fn, *args)``
runs ``fn(root, *args)`` in a worker thread with its own transaction manager
and ZODB connection, commits, and returns a Deferred of ``fn``'s result.  A
``ConflictError`` or any other ``TransientError`` (``ClientDisconnected``,
``ReadConflictError``) aborts and retries, up to ``retries`` more times,
after a randomised exponential backoff scheduled on the reactor (no worker
sleeps); the last error is the Deferred's failure.  ``run_read_only`` never
commits and never retries a committed write (it aborts).

The public methods run on the reactor thread; ``_interaction`` runs in a
worker thread and may block (it talks to the server through the blocking
ClientStorage, which is safe there).
"""
import random

import transaction
from transaction.interfaces import TransientError
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

_log = Logger()


class DatabasePool:
    """Worker threads that run functions against a ZODB ``DB``.

    :param db: a ``ZODB.DB`` (typically over a zeotwist ClientStorage).
    :param reactor: the reactor whose Deferreds the results come back on;
        the pool starts when it runs and stops when it shuts down.
    :param min_threads: / :param max_threads: the pool's size.
    :param retries: how many times a transient failure is retried.
    :param backoff: first retry delay in seconds (doubled each retry, capped
        at ``max_backoff``, randomised by up to ±50 %).
    """

    def __init__(self, db, reactor, *, min_threads: int = 1, max_threads: int = 4,
                 retries: int = 5, backoff: float = 0.02, max_backoff: float = 1.0):
        self.db = db
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._reactor = reactor
        self.threadpool = ThreadPool(min_threads, max_threads, name="zeotwist-interaction")
        self._trigger = reactor.addSystemEventTrigger("during", "shutdown", self._shutdown)
        self.threadpool.start()

    def _shutdown(self) -> None:
        self._trigger = None      # firing now: it is no longer registered
        self.close()

    def close(self) -> None:
        """Stop the worker threads (waits for running interactions)."""
        if self._trigger is not None:
            self._reactor.removeSystemEventTrigger(self._trigger)
            self._trigger = None
        if self.threadpool.started:
            self.threadpool.stop()

    def run_in_transaction(self, fn, *args, **kw) -> Deferred:
        """Run ``fn(root, *args, **kw)`` in a transaction that commits; retried
        on transient errors.  A Deferred of ``fn``'s result."""
        return self._attempt(True, fn, args, kw, 0)

    def run_read_only(self, fn, *args, **kw) -> Deferred:
        """Run ``fn(root, *args, **kw)`` and abort: nothing is ever committed."""
        return self._attempt(False, fn, args, kw, 0)

    def _attempt(self, commit, fn, args, kw, attempt) -> Deferred:
        d = deferToThreadPool(self._reactor, self.threadpool,
                              self._interaction, commit, fn, args, kw)

        def failed(failure):
            if failure.check(TransientError) and attempt < self.retries:
                delay = min(self.max_backoff, self.backoff * 2 ** attempt)
                delay *= 0.5 + random.random()
                _log.debug("retrying {fn!r} after {err} in {delay:.3f}s",
                           fn=fn, err=failure.getErrorMessage(), delay=delay)
                return deferLater(self._reactor, delay, self._attempt,
                                  commit, fn, args, kw, attempt + 1)
            return failure

        return d.addErrback(failed)

    def _interaction(self, commit, fn, args, kw):
        tm = transaction.TransactionManager(explicit=True)
        conn = self.db.open(tm)
        try:
            tm.begin()
            try:
                result = fn(conn.root(), *args, **kw)
                if commit:
                    tm.commit()
                else:
                    tm.abort()
            except BaseException:
                tm.abort()
                raise
            return result
        finally:
            conn.close()
