"""The recent-invalidations queue of one storage, for quick cache verification.

A reconnecting client names the last transaction it saw; if every later
transaction is still in the queue, the server answers the union of their
oids and the client invalidates just those.  Otherwise the client must drop
its whole cache.  The queue is rebuilt from the storage's recent
transactions at start (``lastInvalidations``), so a server restart does not
force every client to start cold.

Pure logic; runs on the reactor thread.
"""
from collections import deque

from ZODB.utils import p64, u64, z64


class RecentInvalidations:
    def __init__(self, size: int = 100):
        self.size = size
        self._queue: deque = deque()          # (tid, oids), oldest first
        #: Every transaction with a tid > ``complete_after`` is in the queue.
        self.complete_after = z64

    def fill_from(self, storage, last_tid: bytes) -> None:
        """Rebuild from the storage's most recent transactions."""
        self._queue.clear()
        recent = []
        get = getattr(storage, "lastInvalidations", None)
        if get is not None and self.size:
            recent = list(get(self.size + 1))            # oldest first
        if len(recent) > self.size:
            # the extra, oldest transaction only tells where coverage starts
            self.complete_after = recent[0][0]
            recent = recent[1:]
        elif recent or last_tid == z64:
            self.complete_after = z64                  # the whole history is here
        else:
            self.complete_after = last_tid             # unknown history: nothing covered
        for tid, oids in recent:
            self._queue.append((tid, list(oids)))

    def append(self, tid: bytes, oids) -> None:
        if not self.size:
            self.complete_after = tid
            return
        self._queue.append((tid, list(oids)))
        while len(self._queue) > self.size:
            self.complete_after = self._queue.popleft()[0]

    def forget(self, through: bytes) -> None:
        """Others' transactions up to ``through`` went unrecorded: no cache
        at ``through`` or before can be verified any more."""
        self._queue.clear()
        self.complete_after = p64(u64(through) + 1)

    def since(self, tid: bytes):
        """The oids changed by transactions after ``tid``, or None if the
        queue no longer reaches back that far."""
        if tid < self.complete_after:
            return None
        oids: set = set()
        for t, changed in reversed(self._queue):
            if t <= tid:
                break
            oids.update(changed)
        return oids

    def __len__(self) -> int:
        return len(self._queue)
