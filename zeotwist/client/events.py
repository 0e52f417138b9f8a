"""Invalidation events for reactor programs.

Every transaction this client learns about - another client's commit pushed
by the server, its own commit, or the catch-up of a verification - is one
:class:`Invalidation`, delivered in two stages:

* ``subscribe(callback, before_visible=True)``: called under the client's
  visibility lock, after the cache has applied the event and *before* its
  tid becomes ``last_transaction()`` (ZODB's ``DB.invalidate`` must run
  here, or a connection could start a snapshot at that tid with stale
  objects);
* ``subscribe(callback)`` and :meth:`InvalidationEvents.next_after`: after
  the tid is visible, for reactor programs.

This is the client's only subscription mechanism.  Subscribers run on the
reactor thread (zeotwist's own ``any_thread`` ones also on an application
thread: :meth:`InvalidationEvents.subscribe`).  Subscriber exceptions are
logged, never propagated into the protocol.
"""
from dataclasses import dataclass
from functools import partial

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
    def __init__(self, events: "InvalidationEvents", callback, before_visible: bool = False,
                 idempotent: bool = False, any_thread: bool = False):
        self._events = events
        self.callback = callback
        self.before_visible = before_visible
        self.idempotent = idempotent
        self.any_thread = any_thread

    def cancel(self) -> None:
        """Stop receiving events (idempotent)."""
        self._events._unsubscribe(self)


class InvalidationEvents:
    def __init__(self):
        self._subscriptions: list[Subscription] = []
        self._early: list[Subscription] = []
        self._waiters: list[tuple[bytes, Deferred]] = []
        self.last: Invalidation | None = None
        #: the event stage one delivers, its subscribers, how many were called
        self._round: list = [None, (), 0]
        #: every ``before_visible`` subscriber may run on another thread than the reactor's
        self.on_threads = True

    def subscribe(self, callback, *, before_visible: bool = False,
                  idempotent: bool = False, any_thread: bool = False) -> Subscription:
        """``callback(Invalidation)`` for every transaction from now on;
        with ``before_visible``, under the visibility lock (see above).
        ``idempotent``: a ``before_visible`` callback that an exception cut
        short (a signal handler's) is called again with the same event,
        rather than never again (ZODB's ``DB.invalidate``).

        ``any_thread`` (zeotwist's own: ClientStorage's ZODB DB): the
        ``before_visible`` callback may also run on an application thread
        that reads its own answer and holds the connection's send lock
        (zeotwist.client.commitreads), so it must never call the client or
        the storage.  While any other ``before_visible`` callback is
        subscribed, every event is delivered on the reactor thread."""
        sub = Subscription(self, callback, before_visible, idempotent, any_thread)
        (self._early if before_visible else self._subscriptions).append(sub)
        self.on_threads = all(s.any_thread for s in self._early)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        for group in (self._early, self._subscriptions):
            if sub in group:
                group.remove(sub)
        self.on_threads = all(s.any_thread for s in self._early)

    def publish_before_visible(self, event: Invalidation) -> None:
        """Stage one: the ``before_visible`` subscribers (the caller holds
        the visibility lock), each called once per event.  Called again
        with the same event (an exception a signal handler raised in the
        application thread cut the first call short:
        commitreads.take_invalidations), it calls only those not called yet."""
        round_ = self._round
        last = round_[0]
        if last is None or last.tid != event.tid or last != event:
            round_ = self._round = [event, list(self._early), 0]
        subscriptions = round_[1]
        while round_[2] < len(subscriptions):
            at = round_[2]
            sub = subscriptions[at]
            round_[2] = at + (not sub.idempotent)   # else counted before the call: once
            try:
                sub.callback(event)
            except Exception:
                _log.failure("invalidation subscriber {cb!r} failed", cb=sub.callback)
            round_[2] = at + 1

    def listened(self) -> bool:
        """Anyone to tell at stage two (a subscriber, a waiter)."""
        return bool(self._subscriptions or self._waiters)

    def stage_two(self, event: Invalidation) -> partial:
        """Stage two of ``event``, made visible now by a thread other than
        the reactor's, to call on the reactor thread later: to the
        subscribers of now (one who subscribes meanwhile gets the events
        after this one, as if it had run now), the waiters of then.
        ``args[0]`` is the event."""
        return partial(self.publish, event, list(self._subscriptions))

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

    def publish(self, event: Invalidation, subscriptions=None) -> None:
        """Stage two: ``event``'s tid is visible now."""
        self.last = event
        _call_each(self._subscriptions if subscriptions is None else subscriptions, event)
        if self._waiters:
            ready = [w for t, w in self._waiters if event.tid > t]
            self._waiters = [(t, w) for t, w in self._waiters if not event.tid > t]
            for d in ready:
                d.callback(event)


def _call_each(subscriptions: list, event: Invalidation) -> None:
    for sub in list(subscriptions):
        try:
            sub.callback(event)
        except Exception:
            _log.failure("invalidation subscriber {cb!r} failed", cb=sub.callback)
