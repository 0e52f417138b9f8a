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

#: Bytes counted per revision besides its data.  What it really takes is more:
#: about 140 bytes of structure (its slot in the LRU order, a tuple) and about
#: 130 of object headers (oid, tid, data), so with small records the cache's
#: memory can reach about twice its size; counting that would make a cache
#: of the same size hold half as many records (docs/performance.md, "Memory").
ENTRY_OVERHEAD = 120
#: Distinct start tids kept for sharing (see ``ClientCache._tids``) before
#: the table is emptied and started again.
TIDS_SHARED = 4096


def _oid_of(key) -> bytes:
    """The oid of an ``_entries`` key: ``oid`` or ``(oid, start)``."""
    return key[0] if isinstance(key, tuple) else key


class ClientCache:
    def __init__(self, size: int = 20 * 2**20):
        self.size_limit = size
        self._lock = Lock()
        # Every revision, least recently used first, as (start, end, data).
        # An oid's current revision (end None), or that revision after an
        # invalidation ended it, is at key ``oid``; the others at key
        # ``(oid, start)``, their starts listed in ``_older`` (no tuple key
        # and no second dict for the common case: about 90 bytes less per
        # revision).
        self._entries: OrderedDict = OrderedDict()
        self._older: dict = {}                       # oid -> [start, ...]
        # Start tids seen lately, each kept once: the revisions one transaction
        # wrote share one tid object (48 bytes less per revision; the answers
        # that bring them carry a copy each).
        self._tids: dict = {}
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
            entry = self._entries.get(oid)
            if entry is None or entry[1] is not None:
                self.misses += 1
                return None
            self._entries.move_to_end(oid)
            self.hits += 1
            return entry[2], entry[0]

    def loadBefore(self, oid: bytes, before: bytes):
        """``(data, start, end)`` of the revision valid just before ``before``."""
        with self._lock:
            entries = self._entries
            entry = entries.get(oid)
            if entry is not None and entry[0] < before:
                end = entry[1]
                if end is None or before <= end:
                    entries.move_to_end(oid)
                    self.hits += 1
                    return entry[2], entry[0], end
            for start in self._older.get(oid, ()):
                if start < before:
                    key = (oid, start)
                    found = entries.get(key)
                    if found is None:   # an update cut short (a signal handler's exception)
                        continue
                    _, end, data = found
                    if before <= end:
                        entries.move_to_end(key)
                        self.hits += 1
                        return data, start, end
            self.misses += 1
            return None

    # -- updates (reactor thread) ------------------------------------------------
    def store(self, oid: bytes, start: bytes, end: bytes | None, data: bytes) -> None:
        with self._lock:
            entries = self._entries
            latest = entries.get(oid)
            if latest is not None and latest[0] == start or start in self._older.get(oid, ()):
                return                  # known already
            tids = self._tids
            if len(tids) >= TIDS_SHARED:
                tids.clear()
            start = tids.setdefault(start, start)
            if end is None:
                if latest is not None:
                    if latest[0] > start:
                        return          # we already know a newer revision
                    if latest[1] is None:
                        self._drop(oid)         # its end is unknown: dropped
                    else:                       # ended: one of the older ones now
                        del entries[oid]
                        self._add_older(oid, latest)
                entries[oid] = (start, None, data)
            else:
                self._add_older(oid, (start, end, data))
            self._bytes += len(data) + ENTRY_OVERHEAD
            if self._bytes > self.size_limit:
                self._evict()

    def make_room(self, size: int) -> None:
        """A record of ``size`` bytes is about to arrive: evict what storing
        it would, now, so that the memory of what goes is free before the
        record's own is taken (a big record then reuses it, instead of
        fresh pages that fault one by one: docs/performance.md, "Big
        records")."""
        with self._lock:
            if self._bytes + size + ENTRY_OVERHEAD > self.size_limit:
                self._evict(self.size_limit - size - ENTRY_OVERHEAD)

    def _add_older(self, oid: bytes, entry: tuple) -> None:
        self._older.setdefault(oid, []).append(entry[0])
        self._entries[(oid, entry[0])] = entry

    def invalidate(self, oid: bytes, tid: bytes) -> None:
        """Transaction ``tid`` changed ``oid``: its current revision ends there."""
        with self._lock:
            entry = self._entries.get(oid)
            if entry is None or entry[1] is not None or entry[0] >= tid:
                return      # nothing current cached, or we already have tid's revision
            self._entries[oid] = (entry[0], tid, entry[2])    # its place in the order kept

    def invalidate_after(self, oid: bytes, after: bytes) -> None:
        """Some transaction after ``after`` changed ``oid`` (cache verification).

        A current revision that was current at ``after`` ends at ``after + 1``
        (a lower bound of its real end, so every snapshot it serves is
        right); one written after ``after`` may itself be stale: drop it.
        """
        with self._lock:
            entry = self._entries.get(oid)
            if entry is None or entry[1] is not None:
                return
            if entry[0] > after:
                self._drop(oid)
                return
            end = (int.from_bytes(after, "big") + 1).to_bytes(8, "big")
            self._entries[oid] = (entry[0], end, entry[2])

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._older.clear()
            self._tids.clear()
            self._bytes = 0

    # -- persistence (see zeotwist.client.cachefile) -----------------------------
    def snapshot(self):
        """``(last_tid, [(oid, start, end, data), ...])``, least recently used first.

        Taken atomically under the lock, so it is one consistent state.
        """
        with self._lock:
            return self.last_tid, [(_oid_of(key), start, end, data) for key, (start, end, data)
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
            self._older.clear()
            for oid, start, end, data in reversed(kept):
                if end is None:
                    self._entries[oid] = (start, None, data)
                else:
                    self._add_older(oid, (start, end, data))
            self._bytes = sum(len(e[3]) + ENTRY_OVERHEAD for e in kept)
            self.last_tid = last_tid

    def _evict(self, limit: int | None = None) -> None:
        entries, limit = self._entries, self.size_limit if limit is None else limit
        while self._bytes > limit and entries:
            key = next(iter(entries))
            self._drop(key)
            self.evictions += 1

    def _drop(self, key) -> None:
        start, _, data = self._entries.pop(key)
        self._bytes -= len(data) + ENTRY_OVERHEAD
        if isinstance(key, tuple):
            older = self._older[key[0]]
            older.remove(start)
            if not older:
                del self._older[key[0]]
