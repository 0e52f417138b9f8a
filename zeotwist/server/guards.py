"""The session's side of the server-wide limits: budgets, idle and open
transactions, small boxes before registration.

A mixin of :class:`~zeotwist.server.session.ServerSession`, which calls
these hooks from its input and output paths:

* :meth:`ResourceGuards.burst_budget` / :meth:`ResourceGuards.after_input` /
  :meth:`ResourceGuards.after_output` / :meth:`ResourceGuards.may_resume`
  keep the session's unread output and unfinished box inside the server's
  :class:`~zeotwist.server.budgets.MemoryBudget`; when a budget is spent,
  the greediest connection is dropped (one log line);
* before ``Register`` a box may be at most ``UNREGISTERED_MAX_BOX_BYTES``
  (a Login or Register box is a few hundred bytes), so a connection that
  has not registered holds at most that much;
* ``--idle-timeout``: a registered connection that sends nothing and takes
  none of its output (invalidations) for that long is closed;
* ``--vote-timeout``: a transaction must vote within that many seconds of
  its ``TpcBegin``, else it is aborted (its spool dropped) and its
  connection closed (``ServerSession.vote_timed_out``: one log line, and
  the client told first if it asked to be).

Runs on the reactor thread.
"""
from zeotwist.server.limits import pending_output
from zeotwist.server.txnstate import Event
from zeotwist.transportcompat import discard_output
from zeotwist.wire.framing import SERVER_MAX_BOX_BYTES

#: The largest box a connection may send before it has registered.
UNREGISTERED_MAX_BOX_BYTES = 64 * 1024
DEFAULT_VOTE_TIMEOUT = 300.0


def _unread(session) -> int:
    """What ``session`` holds for its client: unread output, and answers
    still being computed elsewhere (``ServerSession.reserve_output``)."""
    transport = session.transport
    unread = pending_output(transport) if transport is not None else 0
    return unread + getattr(session, "_reserved", 0)


class ResourceGuards:
    #: the factory's MemoryBudget (None: per-connection limits only)
    budgets = None
    #: seconds a registered connection may do nothing (None: forever)
    idle_timeout = None
    #: seconds from TpcBegin to Vote (None: no limit)
    vote_timeout = DEFAULT_VOTE_TIMEOUT
    maxBoxBytes = UNREGISTERED_MAX_BOX_BYTES

    _idle_timer = None
    _last_active = 0.0
    _last_unread = 0
    _vote_timer = None
    _vote_due = None        # (deadline, transaction) until it votes

    # -- memory budgets -------------------------------------------------------
    def burst_budget(self, pending: int) -> int:
        """Bytes a burst of input may make this session emit.

        The allowance is claimed from the server's output budget at once, so
        that sessions answering in the same reactor turn cannot each spend
        the same room; :meth:`output_settled` gives back what was not used.
        """
        own = self.max_pending_output - pending
        budgets = self.budgets
        if budgets is None:
            return own
        budgets.output.set(self, pending)
        # At most a quarter of the budget each: Twisted joins a connection's
        # queued output into one string when it writes, briefly doubling it.
        share = budgets.output.cap // 4 - pending
        allowance = min(own, share, budgets.output_room(_unread))
        budgets.output.set(self, pending + max(0, allowance))
        return allowance

    def output_settled(self) -> None:
        """The burst is over: the session holds what its transport holds."""
        if self.budgets is not None:
            self.budgets.output.set(self, _unread(self))

    def after_input(self) -> None:
        self._last_active = self._clock.seconds()
        budgets = self.budgets
        if budgets is None or self.transport is None or self._violated:
            return
        self.output_settled()
        budgets.boxes.set(self, self._boxBytes + len(self._buf))
        if budgets.boxes.over():
            self._drop_greediest(budgets.boxes, "of unfinished boxes")

    def after_output(self, pending: int) -> None:
        """An invalidation was written; ``pending`` bytes wait for the client."""
        if pending == 0:
            self._last_active = self._clock.seconds()   # it takes its output
        budgets = self.budgets
        if budgets is None:
            return
        budgets.output.set(self, pending)
        if budgets.output.over() and budgets.output_room(_unread) < 0:
            self._drop_greediest(budgets.output, "of unread output")

    def may_resume(self) -> bool:
        """Whether a session paused for its output may read again; while the
        server's output budget is spent, the greediest reader is dropped."""
        budgets = self.budgets
        if budgets is None:
            return True
        budgets.output.set(self, _unread(self))
        if budgets.output_room(_unread) > 0:
            return True
        self._drop_greediest(budgets.output, "of unread output")
        return budgets.output.room() > 0

    def _drop_greediest(self, budget, what: str) -> None:
        victim = budget.greediest()
        if victim is None:
            return
        held = budget.held(victim)
        budget.release(victim)
        victim.protocolViolation("holds %d bytes %s while the server's budget of %d "
                                 "is spent" % (held, what, budget.cap))
        if victim.transport is not None:
            discard_output(victim.transport)    # freed now, not a turn later

    def release_budgets(self) -> None:
        budgets = self.budgets
        if budgets is not None:
            budgets.output.release(self)
            budgets.boxes.release(self)
        for name in ("_idle_timer", "_vote_timer"):
            timer = getattr(self, name)
            if timer is not None and timer.active():
                timer.cancel()
            setattr(self, name, None)

    # -- idle connections --------------------------------------------------------
    def registered(self) -> None:
        """Register succeeded: full-size boxes, and the idle clock starts."""
        self.maxBoxBytes = SERVER_MAX_BOX_BYTES
        self._last_active = self._clock.seconds()
        if self.idle_timeout:
            self._idle_timer = self._clock.callLater(self.idle_timeout, self._idle_check)

    def _idle_check(self) -> None:
        self._idle_timer = None
        if self.transport is None or self._violated:
            return
        now, unread = self._clock.seconds(), _unread(self)
        if unread < self._last_unread:          # it took some of its output
            self._last_active = now
        self._last_unread = unread
        left = self._last_active + self.idle_timeout - now
        if left <= 0:
            self.protocolViolation("idle for %g s" % self.idle_timeout)
            return
        self._idle_timer = self._clock.callLater(left, self._idle_check)

    # -- transactions that do not vote ----------------------------------------------
    def transaction_opened(self, txn) -> None:
        """``txn`` began: it must vote within ``vote_timeout``.  One timer
        per connection, not one per transaction: the deadline is noted,
        and the timer, when it fires, looks at the transaction of the time
        (a small commit votes within a millisecond; the limit is minutes)."""
        if not self.vote_timeout:
            return
        self._vote_due = (self._clock.seconds() + self.vote_timeout, txn)
        if self._vote_timer is None:
            self._vote_timer = self._clock.callLater(self.vote_timeout, self._vote_overdue)

    def transaction_voting(self) -> None:
        self._vote_due = None

    def _vote_overdue(self) -> None:
        self._vote_timer, due = None, self._vote_due
        if due is None or self.transport is None:
            return                      # the next transaction sets a timer again
        deadline, txn = due
        left = deadline - self._clock.seconds()
        if left > 0:                    # a later transaction than the timer's
            self._vote_timer = self._clock.callLater(left, self._vote_overdue)
            return
        self._vote_due = None
        if self._txn is txn and txn.state.can(Event.VOTE):     # still not voted
            self.vote_timed_out()
