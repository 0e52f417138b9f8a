"""Every open storage iterator of the server, in one table.

A FileStorage iterator (``IteratorStart``) holds an open file.  Each
session may hold ``MAX_ITERATORS`` (storageapi), but sessions add up: 60
read-only connections once held all 1,024 descriptors of a server.  The
:class:`IteratorTable` bounds them server-wide:

* at most ``cap`` iterators are open (``--max-iterators``); opening one
  more closes the least recently used, whoever holds it (its next
  ``IteratorNext`` fails with StorageError, as for a per-session eviction);
* an iterator unused for ``timeout`` seconds is closed
  (``--iterator-timeout``);
* each open iterator takes a slot of the :class:`ConnectionLimiter`, so
  connections plus iterators stay ``FD_RESERVE`` descriptors below the
  process's limit: accepting, logging and the storage files always have
  descriptors left.  When no slot is free and no iterator can be closed,
  ``IteratorStart`` is refused.

Runs on the reactor thread; the clock is injected.
"""
from collections import OrderedDict

from ZODB.POSException import StorageError

DEFAULT_MAX_ITERATORS = 64
DEFAULT_ITERATOR_TIMEOUT = 300.0


class IteratorTable:
    def __init__(self, clock, limiter, cap: int = DEFAULT_MAX_ITERATORS,
                 timeout: float | None = DEFAULT_ITERATOR_TIMEOUT):
        self.clock = clock
        self.limiter = limiter
        self.cap = cap
        self.timeout = timeout or None
        #: (session, iid) -> last use (seconds), least recently used first;
        #: an entry exists from reserve() (opening) until discard()
        self._open: OrderedDict = OrderedDict()
        self._sweep = None

    def __len__(self) -> int:
        return len(self._open)

    def reserve(self, session, iid) -> None:
        """Take a slot for iterator ``iid`` of ``session`` before it is
        opened; closes the least recently used one if needed.  Raises
        StorageError when no descriptor can be spared."""
        if len(self._open) >= self.cap and not self._evict():
            raise StorageError("%d iterators are open on the server, all busy; "
                               "try again later" % len(self._open))
        if not self.limiter.take() and not (self._evict() and self.limiter.take()):
            raise StorageError("the server has no file descriptor to spare for "
                               "another iterator; try again later")
        self._open[(session, iid)] = self.clock.seconds()
        self._arm()

    def touch(self, session, iid) -> None:
        key = (session, iid)
        if key in self._open:
            self._open[key] = self.clock.seconds()
            self._open.move_to_end(key)

    def discard(self, session, iid) -> None:
        """The iterator is closed (or was never opened): free its slot."""
        if self._open.pop((session, iid), None) is not None:
            self.limiter.release()

    def _evict(self) -> bool:
        for session, iid in self._open:
            if session.iterator_idle(iid):      # not reading a batch right now
                session.close_iterator(iid)     # calls discard()
                return True
        return False

    def _arm(self) -> None:
        if self.timeout is not None and (self._sweep is None or not self._sweep.active()):
            self._sweep = self.clock.callLater(self.timeout / 4, self.expire)

    def expire(self) -> None:
        """Close the iterators unused for ``timeout`` seconds."""
        self._sweep = None
        deadline = self.clock.seconds() - self.timeout
        for (session, iid), used in list(self._open.items()):
            if used > deadline:
                break                           # the rest were used later
            if session.iterator_idle(iid):
                session.close_iterator(iid)
        if self._open:
            self._arm()

    def stop(self) -> None:
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
