"""The client cache: revisions of objects as (oid, start_tid, end_tid).

A revision with ``end_tid`` None is *current*: no invalidation after
``start_tid`` has been seen for it.  Non-current revisions serve MVCC reads
of older snapshots and never go stale (history does not change).  The cache
is bounded by ``size`` bytes and evicts least recently used revisions.

Thread-safe: the reactor thread stores results and applies invalidations,
application threads look revisions up (ZEO's rule: "caches need to be
thread safe").  No I/O.
"""
from collections import OrderedDict
from threading import Lock

#: Accounting overhead per revision (keys, list, dict slots), in bytes.
ENTRY_OVERHEAD = 120


class ClientCache:
    def __init__(self, size: int = 20 * 2**20):
        self.size_limit = size
        self._lock = Lock()
        self._entries: OrderedDict = OrderedDict()   # (oid, start) -> [end, data]
        self._current: dict = {}                     # oid -> start
        self._older: dict = {}                       # oid -> [start, ...]
        self._bytes = 0
        self.last_tid: bytes | None = None
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def getLastTid(self) -> bytes | None:
        """ZEO's name for :attr:`last_tid` (``ClientStorage._cache``)."""
        return self.last_tid

    def stats(self) -> dict:
        return dict(hits=self.hits, misses=self.misses, evictions=self.evictions,
                    bytes=self._bytes, revisions=len(self._entries),
                    limit=self.size_limit)

    # -- lookups (any thread) ----------------------------------------------------
    def load(self, oid: bytes):
        """The current revision as ``(data, start)``, or None."""
        with self._lock:
            start = self._current.get(oid)
            if start is None:
                self.misses += 1
                return None
            key = (oid, start)
            self._entries.move_to_end(key)
            self.hits += 1
            return self._entries[key][1], start

    def loadBefore(self, oid: bytes, before: bytes):
        """``(data, start, end)`` of the revision valid just before ``before``."""
        with self._lock:
            entries = self._entries
            start = self._current.get(oid)
            if start is not None and start < before:
                key = (oid, start)
                entries.move_to_end(key)
                self.hits += 1
                return entries[key][1], start, None
            for start in self._older.get(oid, ()):
                if start < before:
                    key = (oid, start)
                    end, data = entries[key]
                    if before <= end:
                        entries.move_to_end(key)
                        self.hits += 1
                        return data, start, end
            self.misses += 1
            return None

    # -- updates (reactor thread) ------------------------------------------------
    def store(self, oid: bytes, start: bytes, end: bytes | None, data: bytes) -> None:
        with self._lock:
            key = (oid, start)
            if key in self._entries:
                return
            if end is None:
                current = self._current.get(oid)
                if current is not None:
                    if current > start:
                        return          # we already know a newer revision
                    self._drop((oid, current))
                self._current[oid] = start
            else:
                self._older.setdefault(oid, []).append(start)
            self._entries[key] = [end, data]
            self._bytes += len(data) + ENTRY_OVERHEAD
            if self._bytes > self.size_limit:
                self._evict()

    def invalidate(self, oid: bytes, tid: bytes) -> None:
        """Transaction ``tid`` changed ``oid``: its current revision ends there."""
        with self._lock:
            start = self._current.get(oid)
            if start is None or start >= tid:
                return      # nothing cached, or we already have tid's revision
            del self._current[oid]
            self._entries[(oid, start)][0] = tid
            self._older.setdefault(oid, []).append(start)

    def invalidate_after(self, oid: bytes, after: bytes) -> None:
        """Some transaction after ``after`` changed ``oid`` (cache verification).

        A current revision that was current at ``after`` ends at ``after + 1``
        (a lower bound of its real end, so every snapshot it serves is
        right); one written after ``after`` may itself be stale: drop it.
        """
        with self._lock:
            start = self._current.get(oid)
            if start is None:
                return
            if start > after:
                self._drop((oid, start))
                return
            end = (int.from_bytes(after, "big") + 1).to_bytes(8, "big")
            del self._current[oid]
            self._entries[(oid, start)][0] = end
            self._older.setdefault(oid, []).append(start)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._current.clear()
            self._older.clear()
            self._bytes = 0

    # -- persistence (see zeotwist.client.cachefile) -----------------------------
    def snapshot(self):
        """``(last_tid, [(oid, start, end, data), ...])``, least recently used first.

        Taken atomically under the lock, so it is one consistent state.
        """
        with self._lock:
            return self.last_tid, [(oid, start, end, data) for (oid, start), (end, data)
                                   in self._entries.items()]

    def restore(self, last_tid, entries) -> None:
        """Replace the contents with a :meth:`snapshot` (LRU order).

        Keeps the most recently used revisions that fit in ``size_limit``.
        """
        kept, seen, current, total = [], set(), set(), 0
        for oid, start, end, data in reversed(entries):      # most recent first
            if (oid, start) in seen or (end is None and oid in current):
                continue
            total += len(data) + ENTRY_OVERHEAD
            if total > self.size_limit:
                break
            seen.add((oid, start))
            if end is None:
                current.add(oid)
            kept.append((oid, start, end, data))
        with self._lock:
            self._entries.clear()
            self._current.clear()
            self._older.clear()
            for oid, start, end, data in reversed(kept):
                if end is None:
                    self._current[oid] = start
                else:
                    self._older.setdefault(oid, []).append(start)
                self._entries[(oid, start)] = [end, data]
            self._bytes = sum(len(e[3]) + ENTRY_OVERHEAD for e in kept)
            self.last_tid = last_tid

    def _evict(self) -> None:
        entries = self._entries
        while self._bytes > self.size_limit and entries:
            key = next(iter(entries))
            self._drop(key)
            self.evictions += 1

    def _drop(self, key) -> None:
        end, data = self._entries.pop(key)
        self._bytes -= len(data) + ENTRY_OVERHEAD
        oid, start = key
        if end is None:
            if self._current.get(oid) == start:
                del self._current[oid]
        else:
            older = self._older[oid]
            older.remove(start)
            if not older:
                del self._older[oid]
