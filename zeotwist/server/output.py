"""What a session writes, counted, and the pause of a client that does not read.

A mixin of :class:`~zeotwist.server.session.ServerSession`.  Every byte
written goes through :meth:`OutputBudget.emit` or
:meth:`OutputBudget.emit_parts`, which count it (the burst's unread output
and the storage's ``bytes_out``).  A client that sends requests but does
not read the answers: once more than the burst's budget (from
:meth:`~zeotwist.server.guards.ResourceGuards.burst_budget`) waits for it,
the session stops reading it and holds the boxes already read, until the
client has taken half of ``max_pending_output``; answers are never
dropped, and the client only waits.  A client that leaves more than
``max_pending_output`` of invalidations unread is dropped
(:meth:`OutputBudget.send_frame`).

Runs on the reactor thread.
"""
from collections import deque

from twisted.internet.defer import Deferred

from zeotwist.server.limits import DEFAULT_MAX_PENDING_OUTPUT, pending_output
from zeotwist.transportcompat import unjoined_writes


class OutputBudget:
    """Output counting, reservations and the paused reading (see the module)."""

    #: a client that leaves more than this unread is dropped
    max_pending_output = DEFAULT_MAX_PENDING_OUTPUT

    _held = None            # a deque of boxes while reading is paused
    _output_check = None    # the timer that looks at the output again meanwhile
    _unread = 0             # bytes emitted since this burst of input began
    _budget = 2**62         # bytes the burst may emit before reading pauses
    OUTPUT_CHECK_INTERVAL = 0.05
    _closing = False        # the transaction-timeout notice is out: nothing more is written
    #: bytes of answers still being computed in another thread (a blob
    #: chunk read by the storage's worker), counted as output meanwhile
    _reserved = 0

    #: invalidations kept back while the client waits for the commit lock
    #: (a list of frames), and their bytes
    _later = None
    _later_bytes = 0
    #: bytes of invalidations kept back at most (more: all are sent)
    LATER_MAX = 64 * 1024

    def send_frame(self, frame: bytes) -> None:
        """An invalidation.  While this client's vote waits for the commit
        lock (``awaits_lock``), it is kept back and goes out with whatever
        is written next - the vote's answer, as a rule, in the same
        ``send()`` - instead of waking the client now: nothing reaches
        the client before it (:meth:`emit`), so the order is the same.
        At the latest it goes when the committer lets the lock go, before
        the committer's answer (``StorageServer.send_kept_back``): a vote
        that still waits then (another was granted first) must not hold
        back a commit that the committer may already tell others about."""
        if self.transport is None or self._violated:
            return
        if self.awaits_lock() and self._later_bytes + len(frame) <= self.LATER_MAX:
            if self._later is None:
                self._later = []
                self.server.kept_back.append(self)      # sent by then at the latest
            self._later.append(frame)
            self._later_bytes += len(frame)
            return
        self.emit(frame)
        if self.transport is not None:
            pending = pending_output(self.transport)
            if pending > self.max_pending_output:
                self.protocolViolation(
                    "client is not reading: %d bytes of invalidations pending" % pending)
            else:
                self.after_output(pending)          # guards: the server's budget

    def _begin_burst(self) -> None:
        """Input arrived: the budget of the answers this burst may write."""
        self._unread = 0
        self._budget = self.burst_budget(pending_output(self.transport) + self._reserved)
        if self._budget <= 0 and self._held is None and self.server is not None:
            # No room: this burst waits, its boxes held, rather than
            # having its first answer (a 10 MB record?) written anyway:
            # else N connections each hold one, whatever the budget.
            self._pause_reading()

    def emit(self, frame: bytes) -> None:
        if not self._closing:
            if self._later is not None:         # the invalidations kept back, first
                frame = self._take_later(frame)
            self._count_out(len(frame))
            super().emit(frame)

    def emit_parts(self, head: bytes, value: bytes, tail: bytes) -> None:
        if not self._closing:   # as emit: a blob chunk the worker read after the notice
            if self._later is not None:
                head = self._take_later(head)
            self._count_out(len(head) + len(value) + len(tail))
            unjoined_writes(self.transport)     # big values queued are not copied together
            super().emit_parts(head, value, tail)

    def _take_later(self, frame: bytes) -> bytes:
        later, self._later, self._later_bytes = self._later, None, 0
        later.append(frame)
        return b"".join(later)

    def send_later(self) -> None:
        """Write the invalidations kept back now (the client's vote no
        longer waits for the lock, and no answer follows at once)."""
        if self._later is not None and self.transport is not None and not self._violated:
            self.emit(b"")

    def _count_out(self, size: int) -> None:
        self._unread += size
        if self.server is not None:
            self.server.traffic["bytes_out"] += size

    def reserve_output(self, nbytes: int, answer: Deferred) -> None:
        """``answer`` will write about ``nbytes`` once it fires, after this
        burst: count them now, so that requests pipelined behind it pause
        within the budget instead of all queueing their answers."""
        self._reserved += nbytes
        self._unread += nbytes
        answer.addBoth(self._reserved_done, nbytes)

    def _reserved_done(self, result, nbytes: int):
        self._reserved -= nbytes
        return result

    def _pause_if_over_budget(self) -> None:
        if self._unread > self._budget and self.transport is not None \
                and not self._violated:
            self._pause_reading()

    def _pause_reading(self) -> None:
        self._held = deque()
        self.transport.pauseProducing()
        self._output_check = self._clock.callLater(
            self.OUTPUT_CHECK_INTERVAL, self._check_output)

    def _check_output(self) -> None:
        self._output_check = None
        if self.transport is None or self._violated:
            return
        pending = pending_output(self.transport) + self._reserved
        if pending > self.max_pending_output // 2 or not self.may_resume():
            self._output_check = self._clock.callLater(
                self.OUTPUT_CHECK_INTERVAL, self._check_output)
            return
        held, self._held = self._held, None
        self._unread, self._budget = 0, self.burst_budget(pending)
        while held and self._held is None and self.transport is not None \
                and not self._violated:
            self.ampBoxReceived(held.popleft())
        if self._held is not None:          # paused again: keep the order
            held.extend(self._held)
            self._held = held
        elif self.transport is not None and not self._violated:
            self.transport.resumeProducing()
        self.output_settled()               # guards: the server's budget

    def _stop_output_check(self) -> None:
        """The connection is gone: no more looks at its output."""
        if self._output_check is not None and self._output_check.active():
            self._output_check.cancel()
        self._output_check = self._held = None
