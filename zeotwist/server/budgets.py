"""Server-wide byte budgets: what all connections together may hold.

Each connection's own limits (``--max-pending-output``, the 4 MiB box, the
in-memory part of a transaction's spool) multiplied by the connection cap is
no limit on a real machine.  :class:`MemoryBudget` gives the server one
figure, ``--memory-budget``, split into three shared budgets:

* ``output`` (half): answers and invalidations written but not yet taken by
  the clients' sockets.  A connection may start answering a burst of
  requests only within what is left (else its reading pauses, as for its
  own cap); while the budget is spent, the connection holding the most
  unread output is dropped, so readers go on being served.
* ``boxes`` (a quarter): the bytes of AMP boxes received but not yet
  complete.  Past it, the connection with the largest unfinished box is
  dropped.
* ``spool`` (a quarter): transactions' stores kept in memory before the
  vote.  Past it a transaction's spool moves to its temporary file on
  disk (slower, not refused).

:class:`SharedBudget` is the bookkeeping of one of them: holders (sessions,
transaction buffers) report what they hold; the budget knows the total and
the greediest holder.  Output held in a transport shrinks without telling
anyone, so the output budget is re-measured (:meth:`SharedBudget.refresh`)
whenever its total looks spent, at most once per ``REFRESH_INTERVAL``.

Pure logic, the clock injected; runs on the reactor thread (transaction
buffers report from the storage thread only by closing, see txnbuffer).
"""
import threading

DEFAULT_MEMORY_BUDGET = 256 * 2**20
#: Total bytes of spooled (not yet voted) transactions, memory and disk.
DEFAULT_MAX_SPOOL = 4 * 2**30


class SharedBudget:
    """``cap`` bytes shared by many holders.

    A budget set from more than one thread (the spool's: transaction
    buffers close from the storage thread) takes a lock; one kept by the
    reactor thread alone (output, boxes: set at every burst of input, the
    hot path of every load) does not need one.
    """

    def __init__(self, cap: int, thread_safe: bool = True):
        self.cap = cap
        self.total = 0
        self._held: dict = {}
        self._lock = threading.Lock() if thread_safe else None

    def set(self, holder, nbytes: int) -> None:
        """``holder`` now holds ``nbytes`` (0 forgets it); O(1)."""
        held = self._held
        if held.get(holder, 0) == nbytes:
            return                          # the common case: nothing changed
        if self._lock is None:
            self._set(held, holder, nbytes)
            return
        with self._lock:
            self._set(held, holder, nbytes)

    def _set(self, held: dict, holder, nbytes: int) -> None:
        self.total += nbytes - held.pop(holder, 0)
        if nbytes > 0:
            held[holder] = nbytes

    def release(self, holder) -> None:
        self.set(holder, 0)

    def held(self, holder) -> int:
        return self._held.get(holder, 0)

    def room(self) -> int:
        return self.cap - self.total

    def over(self) -> bool:
        return self.total > self.cap

    def greediest(self):
        """The holder holding the most (None if nobody holds anything)."""
        held = self._held if self._lock is None else self._locked_copy()
        if not held:
            return None
        return max(held.items(), key=lambda item: item[1])[0]

    def _locked_copy(self) -> dict:
        with self._lock:
            return self._held.copy()

    def refresh(self, measure) -> None:
        """Re-measure every holder with ``measure(holder) -> bytes``."""
        for holder in list(self._held):
            self.set(holder, measure(holder))


class MemoryBudget:
    """The three shared budgets of ``--memory-budget`` and the spool's total."""

    REFRESH_INTERVAL = 0.05

    def __init__(self, clock, total: int = DEFAULT_MEMORY_BUDGET,
                 max_spool: int = DEFAULT_MAX_SPOOL):
        self.clock = clock
        # output and boxes: the reactor thread's alone (no lock)
        self.output = SharedBudget(total // 2, thread_safe=False)
        self.boxes = SharedBudget(total // 4, thread_safe=False)
        self.spool_memory = SharedBudget(total // 4)
        #: spooled transactions, in memory and on disk (``--max-spool``)
        self.spool = SharedBudget(max_spool)
        self._refreshed = None

    def output_room(self, measure) -> int:
        """What the output budget has left, re-measured if it looks spent."""
        if self.output.room() <= 0:
            now = self.clock.seconds()
            if self._refreshed is None or now - self._refreshed >= self.REFRESH_INTERVAL:
                self._refreshed = now
                self.output.refresh(measure)
        return self.output.room()
