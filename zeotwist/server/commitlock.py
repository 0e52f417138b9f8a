"""The commit lock of one served storage: a FIFO queue of Deferreds.

No thread ever blocks on it.  ``acquire(owner)`` returns a Deferred that
fires when ``owner`` holds the lock; waiters are served in arrival order.
A holder that keeps the lock longer than ``timeout`` seconds is reported to
``on_timeout(owner)`` (the session then aborts and drops that client, which
releases the lock through the same path as any other disconnect).

Pure logic: no I/O; the clock is injected.  Runs on the reactor thread.
"""
from collections import deque
from typing import Callable, Hashable

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime

from zeotwist.errors import WrongStateError
from zeotwist.server.stats import Timings


class CommitLock:
    def __init__(self, clock: IReactorTime, timeout: float | None = None,
                 on_timeout: Callable[[Hashable], None] | None = None):
        self._clock = clock
        self._timeout = timeout
        self._on_timeout = on_timeout
        self._holder = None
        self._timer = None
        self._waiters: deque = deque()
        #: how long owners waited for the lock, and held it (for --metrics)
        self.wait_times, self.hold_times = Timings(), Timings()
        self._asked: dict = {}          # owner -> when it asked (clock seconds)
        self._granted_at = 0.0

    @property
    def timeout(self) -> float | None:
        return self._timeout

    @property
    def holder(self):
        return self._holder

    def waiting(self) -> int:
        return len(self._waiters)

    def acquire(self, owner) -> Deferred:
        """A fresh Deferred that fires (with None) when ``owner`` holds the lock.

        Cancelling it withdraws ``owner`` from the queue.
        """
        if owner is self._holder or any(o is owner for o, _ in self._waiters):
            raise WrongStateError("%r already holds or awaits the commit lock" % (owner,))

        def cancel(d):
            self._withdraw(owner)

        d = Deferred(cancel)
        self._asked[owner] = self._clock.seconds()
        if self._holder is None:
            self._grant(owner, d)
        else:
            self._waiters.append((owner, d))
        return d

    def release(self, owner) -> None:
        """``owner`` gives the lock up, or leaves the queue; no-op otherwise."""
        if owner is self._holder:
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
            self._holder = None
            self.hold_times.observe(self._clock.seconds() - self._granted_at)
            self._grant_next()
        else:
            self._withdraw(owner)

    def _withdraw(self, owner) -> None:
        self._asked.pop(owner, None)
        for entry in self._waiters:
            if entry[0] is owner:
                self._waiters.remove(entry)
                return

    def _grant_next(self) -> None:
        while self._holder is None and self._waiters:
            owner, d = self._waiters.popleft()
            self._grant(owner, d)

    def _grant(self, owner, d: Deferred) -> None:
        self._holder = owner
        self._granted_at = now = self._clock.seconds()
        self.wait_times.observe(now - self._asked.pop(owner, now))
        if self._timeout is not None:
            self._timer = self._clock.callLater(self._timeout, self._expired, owner)
        d.callback(None)

    def _expired(self, owner) -> None:
        self._timer = None
        if owner is self._holder and self._on_timeout is not None:
            self._on_timeout(owner)


__all__ = ["CommitLock", "CancelledError"]
