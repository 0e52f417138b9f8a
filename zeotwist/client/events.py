"""Invalidation events for reactor programs.

Every transaction this client learns about - another client's commit pushed
by the server, or its own commit - is published as an
:class:`Invalidation` after the cache has applied it.  Programs subscribe
with a callback, or ask for a fresh Deferred that fires with the first
transaction after a given tid.

Runs on the reactor thread.  Subscriber exceptions are logged, never
propagated into the protocol.
"""
from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.logger import Logger

_log = Logger()


@dataclass(frozen=True)
class Invalidation:
    """Transaction ``tid`` changed ``oids``; ``local`` if this client made it.

    ``reset`` marks the event sent when, after a reconnection, the client
    could not verify its cache and dropped it: anything may have changed.
    """
    tid: bytes
    oids: tuple
    local: bool = False
    reset: bool = False


class Subscription:
    def __init__(self, events: "InvalidationEvents", callback):
        self._events = events
        self.callback = callback

    def cancel(self) -> None:
        """Stop receiving events (idempotent)."""
        self._events._unsubscribe(self)


class InvalidationEvents:
    def __init__(self):
        self._subscriptions: list[Subscription] = []
        self._waiters: list[tuple[bytes, Deferred]] = []
        self.last: Invalidation | None = None

    def subscribe(self, callback) -> Subscription:
        """``callback(Invalidation)`` for every transaction from now on."""
        sub = Subscription(self, callback)
        self._subscriptions.append(sub)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subscriptions:
            self._subscriptions.remove(sub)

    def next_after(self, tid: bytes) -> Deferred:
        """A fresh Deferred of the first :class:`Invalidation` with a tid > ``tid``.

        Fires at once if the last one seen is already later.
        """
        d = Deferred(lambda d: self._cancel_waiter(d))
        if self.last is not None and self.last.tid > tid:
            d.callback(self.last)
        else:
            self._waiters.append((tid, d))
        return d

    def _cancel_waiter(self, d: Deferred) -> None:
        self._waiters = [(t, w) for t, w in self._waiters if w is not d]

    def publish(self, event: Invalidation) -> None:
        self.last = event
        for sub in list(self._subscriptions):
            try:
                sub.callback(event)
            except Exception:
                _log.failure("invalidation subscriber {cb!r} failed", cb=sub.callback)
        if self._waiters:
            ready = [w for t, w in self._waiters if event.tid > t]
            self._waiters = [(t, w) for t, w in self._waiters if not event.tid > t]
            for d in ready:
                d.callback(event)
