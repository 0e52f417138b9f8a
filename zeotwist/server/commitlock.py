"""The commit lock of one served storage: a queue of Deferreds.

No thread ever blocks on it.  ``acquire(owner)`` returns a Deferred that
fires when ``owner`` holds the lock; waiters are served in arrival order,
except that a client whose vote was refused for conflicts goes first (below).
A holder that keeps the lock longer than ``timeout`` seconds is reported to
``on_timeout(owner)`` (the session then aborts and drops that client, which
releases the lock through the same path as any other disconnect).

**A refused client's turn, once it has waited.**  A holder whose vote the
storage refused for conflicts releases with ``refused``, the conflicting
oids: it takes a ticket (kept over its next refusals, dropped when it
releases otherwise: commits or aborts) and is *expected* back for
``retry_wait`` seconds (``--conflict-retry-wait``), the time its client
takes to retry from the commit that beat it.  A ticket first counts
``turn_after`` seconds after its first refusal (``--conflict-turn-after``).
From then on the lock goes to the waiter with the oldest counting ticket,
waiters without one after, in arrival order; and no waiter is served ahead
of an expected owner with an older counting ticket whose conflicting oids
it may store (``acquire``'s ``oids``: unknown means it may): the lock waits
for that owner's vote, at most until its time runs out or it leaves
(:meth:`CommitLock.forget`).

**Parked until then.**  While its ticket is young, a vote that may store
the oids of its owner's last refusal is *parked* while another owner is
active on them: a waiter without a ticket stores one of them (it goes
first), or the last commit, less than ``grace`` (``PARK_GRACE``, 5 ms)
ago, stored one (its committer may come back for its next one: the lock
stays free meanwhile; a commit whose oids were not read, no one being
refused when it voted, counts as one that did).  Granted then it would be
refused again (the committer has moved the object on), or win, ending the
committer's run with a switch.  A waiter storing other objects is not
parked; nobody coming back within the grace (or the committer leaving, or
the waiter it let go first) means nobody else wants those objects, and the
parked vote goes.  When the ticket comes of age, the turn above is kept:
its stale vote is refused once more and its retry commits.  Waiters and
commits whose oids are unknown (an undo, a stream of more records than
``txnbuffer.OIDS_SCAN_RECORDS``) park nothing: counted as storing the
objects, a run of them (an undo every few ms) held a refused client up to
``turn_after``; if one does store them, the vote that was not parked is
refused once more.  A kept turn still counts them (unknown: it may).

Why.  In arrival order alone, a client that has just committed starts its
next transaction from an up-to-date cache, votes before the clients it
refused have retried, and wins again: on one hot object one writer commits
for seconds while the others wait (ZEO 6.2 behaves so too, unbounded).
Keeping the turn from the first refusal makes the writers alternate, but
the lock idles while each turn's owner handles its ConflictError and
retries: 4 writers on one counter make about ZEO's commits/s
(docs/performance.md, "Cheaper refusals, strict turns").  Kept after a
while without parking, the losers retried in the meantime, each refused
10-130 times, and now and then won between two of the committer's votes:
every switch of writer is an increment that waited, 7 % of them at 0.05 s
("A refused client's turn, after 0.1 s").  Parked, the losers wait once,
without burning CPU, and the writers switch only when a ticket comes of
age: with 0.4 s (the default) about 5 of 1,000 increments wait, each at
most about 0.4 s, at 2.5x ZEO's commits/s ("Parked until their turn").
``retry_wait=0``: first come, first served (no tickets, nothing parked);
``turn_after=0``: the turn is kept from the first refusal (no young
ticket, nothing parked).

Pure logic: no I/O; the clock is injected.  Runs on the reactor thread.
"""
from collections import deque
from typing import Callable, Hashable, Iterable

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime

from zeotwist.errors import WrongStateError
from zeotwist.server.stats import Timings

#: Seconds the lock keeps the turn of a client whose vote was refused for
#: conflicts, for its retry (a few ms in a retry loop, more for a retried
#: request); 0: first come, first served (see the docstring).
DEFAULT_RETRY_WAIT = 0.05
#: Seconds after a client's first refusal before the lock keeps its turn;
#: until then its votes on the refused objects are parked (see the docstring).
DEFAULT_TURN_AFTER = 0.4
#: Seconds the lock stays free for the last committer to come back before it
#: grants a parked vote: a few of that client's commit-to-next-vote (about
#: 0.7 ms); no one coming in that time means no one else wants the objects.
PARK_GRACE = 0.005
_LAST = float("inf")            # the rank of a waiter without a ticket


class _Waiter:
    __slots__ = ("owner", "d", "_oids", "_known")

    def __init__(self, owner, d: Deferred, oids):
        self.owner, self.d, self._oids, self._known = owner, d, oids, oids is None

    def read_oids(self) -> None:
        """Computes its oids (once: now, or when first needed)."""
        if not self._known:
            self._oids, self._known = self._oids(), True

    def may_store(self, oids: frozenset) -> bool:
        """Whether this waiter's transaction may store one of ``oids``
        (unknown: it may; a kept turn goes first)."""
        self.read_oids()
        return self._oids is None or not self._oids.isdisjoint(oids)

    def stores(self, oids: frozenset) -> bool:
        """Whether it is known to store one of ``oids`` (unknown: no; a
        parked vote waits only for those, see ``CommitLock._parked``)."""
        self.read_oids()
        return self._oids is not None and not self._oids.isdisjoint(oids)

    def stored(self, oids: frozenset) -> bool:
        """After its commit: whether it stored one of ``oids``, or may have
        when they were not read before its vote (see ``CommitLock._grant``):
        a commit that followed a refusal."""
        return not self._known or self.stores(oids)


class CommitLock:
    def __init__(self, clock: IReactorTime, timeout: float | None = None,
                 on_timeout: Callable[[Hashable], None] | None = None,
                 retry_wait: float = DEFAULT_RETRY_WAIT,
                 turn_after: float = DEFAULT_TURN_AFTER, grace: float = PARK_GRACE):
        self._clock = clock
        self._timeout = timeout
        self._on_timeout = on_timeout
        self._retry_wait = retry_wait
        self._turn_after = turn_after
        self._grace = grace
        self._holder = None
        self._held_by: _Waiter | None = None    # the holder's request
        self._committed = (float("-inf"), None)     # the last commit: when, whose
        self._timer = None              # the holder's timeout (see _grant)
        self._deadline = 0.0
        self._waiters: deque = deque()
        self._tickets: dict = {}        # owner -> ticket (refused; lower: older)
        self._since: dict = {}          # owner -> when its first refusal was
        self._refused: dict = {}        # owner -> the oids of its last refusal
        self._next_ticket = 0
        self._expected: dict = {}       # owner -> (deadline, its conflicting oids)
        self._hold = None               # the call that ends a wait for the expected
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

    def acquire(self, owner, oids: Callable[[], frozenset | None] | None = None) -> Deferred:
        """A fresh Deferred that fires (with None) when ``owner`` holds the lock.

        ``oids()``, called at most once and only while some refused owner
        holds a ticket (a turn, a parked vote): the oids ``owner``'s transaction may store, or
        None if unknown (then it waits behind every older ticket, and parks
        no vote).
        Cancelling the Deferred withdraws ``owner`` from the queue.
        """
        if self._holder is None and not self._waiters and not self._tickets \
                and not self._expected:
            # The lock is free and no turn is kept, nothing parked, nobody
            # expected (a lone writer's every commit): granted as
            # _grant_next would, without the queue's bookkeeping.
            d = Deferred()
            self._grant(_Waiter(owner, d, oids))
            return d
        if owner is self._holder or any(w.owner is owner for w in self._waiters):
            raise WrongStateError("%r already holds or awaits the commit lock" % (owner,))

        def cancel(d):
            self._withdraw(owner)
            self._grant_next()          # a vote parked behind it may go

        d = Deferred(cancel)
        self._asked[owner] = self._clock.seconds()
        self._expected.pop(owner, None)
        self._waiters.append(_Waiter(owner, d, oids))
        self._grant_next()
        return d

    def release(self, owner, refused: Iterable[bytes] = (), committed: bool = True) -> None:
        """``owner`` gives the lock up, or leaves the queue; no-op otherwise.
        ``refused``: the oids its vote was refused for (conflicts): it is
        expected to vote again (see the module's docstring).  ``committed``
        False: its transaction was aborted (it stored nothing, so parks no
        vote while it may come back)."""
        if owner is not self._holder:
            self.forget(owner)
            return
        self._holder = None             # (its timer stays: see _grant)
        now = self._clock.seconds()
        self.hold_times.observe(now - self._granted_at)
        refused = frozenset(refused)
        if refused and self._retry_wait > 0:
            if owner not in self._tickets:
                self._tickets[owner] = self._next_ticket
                self._since[owner] = now
                self._next_ticket += 1
            self._expected[owner] = (now + self._retry_wait, refused)
            self._refused[owner] = refused
        else:
            self._drop_ticket(owner)
            if committed:
                self._committed = (now, self._held_by)
        self._held_by = None
        self._grant_next()

    def forget(self, owner) -> None:
        """``owner`` leaves the queue, and its turn if it was expected (its
        transaction ended otherwise, or its client went away)."""
        self._withdraw(owner)
        self._drop_ticket(owner)
        last = self._committed[1]
        if last is not None and last.owner is owner:
            self._committed = (float("-inf"), None)     # it will not come back
        self._expected.pop(owner, None)
        # Whatever waited for it goes now: a vote parked for it (the last
        # committer, or a waiter on the refused objects that goes first),
        # a waiter held for its turn.
        self._grant_next()

    def _drop_ticket(self, owner) -> None:
        self._tickets.pop(owner, None)
        self._since.pop(owner, None)
        self._refused.pop(owner, None)

    def _withdraw(self, owner) -> None:
        self._asked.pop(owner, None)
        for waiter in self._waiters:
            if waiter.owner is owner:
                self._waiters.remove(waiter)
                return

    def _grant_next(self) -> None:
        if self._holder is not None or not self._waiters:
            return
        expected = self._expected_now()
        rank = self._turns()
        parked, until = self._parked(rank)
        if not rank:                    # nobody's turn is kept: arrival order
            for waiter in self._waiters:
                if waiter not in parked:
                    self._waiters.remove(waiter)
                    self._grant(waiter)
                    return
            self._hold_until(until)
            return
        rank = rank.get
        for waiter in sorted(self._waiters, key=lambda w: rank(w.owner, _LAST)):
            if waiter in parked:
                continue
            mine = rank(waiter.owner, _LAST)
            blocking = [deadline for owner, (deadline, oids) in expected.items()
                        if rank(owner, _LAST) < mine and waiter.may_store(oids)]
            if not blocking:
                self._waiters.remove(waiter)
                self._grant(waiter)
                return
            until = min(blocking + ([until] if until is not None else []))
        self._hold_until(until)

    def _parked(self, turns: dict) -> tuple[list, float | None]:
        """The waiters not granted now, and until when at most: those of
        owners with a young ticket (not in ``turns``) whose transaction
        may store the oids of their refusal while another owner is active
        on them: a waiter without a ticket stores one of them, or the last
        commit, less than ``grace`` ago, did (its committer may come back);
        unknown oids do not count here.  Such a vote would be refused again, or win the turn
        of the owner that keeps committing, ending its run early (see the
        module's docstring)."""
        young = [w for w in self._waiters
                 if w.owner in self._tickets and w.owner not in turns]
        if not young:
            return [], None
        refused, since = self._refused, self._since
        at, last = self._committed
        recent = self._clock.seconds() < at + self._grace and last is not None
        others = [w for w in self._waiters if w.owner not in self._tickets]
        parked, until = [], None
        for waiter in young:
            oids = refused.get(waiter.owner)
            if not oids or not waiter.may_store(oids):
                continue
            if any(w.stores(oids) for w in others):
                parked.append(waiter)   # one of them goes: no wait of its own
            elif recent and last.owner is not waiter.owner and last.stored(oids):
                parked.append(waiter)
                end = min(at + self._grace, since[waiter.owner] + self._turn_after)
                until = end if until is None else min(until, end)
        return parked, until

    def _expected_now(self) -> dict:
        """The owners still expected (those whose time ran out lose their ticket)."""
        now = self._clock.seconds()
        for owner, (deadline, _) in list(self._expected.items()):
            if deadline <= now:
                del self._expected[owner]
                self._drop_ticket(owner)
        return self._expected

    def _turns(self) -> dict:
        """owner -> ticket, for the tickets old enough to keep their turn
        (first refused ``turn_after`` seconds ago or more).  A younger one
        needs no timer of its own: every grant looks again, and a lock
        left free for parked votes has the grace's timer (``_parked``)."""
        if not self._tickets:
            return {}
        now, after, since = self._clock.seconds(), self._turn_after, self._since
        return {o: t for o, t in self._tickets.items() if now >= since[o] + after}

    def _hold_until(self, deadline: float | None) -> None:
        self._cancel_hold()
        if deadline is None:
            return
        self._hold = self._clock.callLater(max(0.0, deadline - self._clock.seconds()),
                                           self._grant_next)

    def _cancel_hold(self) -> None:
        if self._hold is not None and self._hold.active():
            self._hold.cancel()
        self._hold = None

    def _grant(self, waiter: _Waiter) -> None:
        self._cancel_hold()
        owner = waiter.owner
        self._holder, self._held_by = owner, waiter
        if self._refused:               # its oids, for the votes it may park,
            waiter.read_oids()          # while its records are there (before its vote)
        self._granted_at = now = self._clock.seconds()
        self.wait_times.observe(now - self._asked.pop(owner, now))
        if self._timeout is not None:
            # One timer, not one per holder: a holder's deadline is noted,
            # and the timer, when it fires, looks at the holder of the
            # time (a commit holds the lock a millisecond; the timeout is
            # a minute).
            self._deadline = now + self._timeout
            if self._timer is None:
                self._timer = self._clock.callLater(self._timeout, self._expired)
        waiter.d.callback(None)

    def _expired(self) -> None:
        self._timer, owner = None, self._holder
        if owner is None:
            return                      # the next grant sets a timer again
        left = self._deadline - self._clock.seconds()
        if left > 0:                    # another holder since the timer was set
            self._timer = self._clock.callLater(left, self._expired)
        elif self._on_timeout is not None:
            self._on_timeout(owner)


__all__ = ["CommitLock", "CancelledError"]
