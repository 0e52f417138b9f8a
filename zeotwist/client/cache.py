"""The client cache: revisions of objects as (oid, start_tid, end_tid).

A revision with ``end_tid`` None is *current*: no invalidation after
``start_tid`` has been seen for it.  Non-current revisions serve MVCC reads
of older snapshots and never go stale (history does not change).  The cache
is bounded by ``size`` bytes and evicts least recently used revisions.

Thread-safe: the reactor thread stores results and applies invalidations,
application threads look revisions up (ZEO's rule: "caches need to be
thread safe").  No I/O.

Memory (docs/performance.md, "Issue 10, eighth session"): about 100 bytes
per revision less than a tuple in an ``OrderedDict`` would take.

* The revisions are in a plain ``dict``, least recently used first (a dict
  keeps its keys in insertion order; a use deletes and re-inserts the key).
  A hit re-inserts its revision only while the cache is more than half
  full: below that nothing is near eviction, and re-inserting at every hit
  would leave the dict's table two to three times the size of its keys.
* A current revision of at most :data:`COMPACT_MAX` bytes is one ``bytes``
  object, its start tid then its data; a hit slices it.
* The revisions reference prefetch brought (the records an answer carried
  along, :meth:`ClientCache.store_prefetched`) wait in a second dict until
  their first use, which moves them into the first keyed by the caller's
  oid (ZODB's ghost's ``_p_oid``, which lives anyway), freeing the answer's
  copy; at most ``size_limit // UNUSED_SHARE`` bytes of them, the oldest
  joining the others beyond that.
* Eviction frees a batch (:data:`EVICT_BATCH`) in one pass over the order,
  since every pass over a dict scans the keys deleted at its front.
"""
from threading import Lock

#: Bytes counted per revision besides its data.  What it really takes differs:
#: about 70 bytes for a current revision of up to COMPACT_MAX bytes (its
#: bytes object's header and start tid, its slot in the dict), about 140
#: for an unused prefetched one, about 340 for a non-current one (its tuple,
#: key and place in ``_older``): docs/cache.md.  Counting that would make a
#: cache of the same size hold fewer records than ZEO's of small records.
ENTRY_OVERHEAD = 120
#: Distinct start tids kept for sharing (see ``ClientCache._tids``) before
#: the table is emptied and started again.
TIDS_SHARED = 4096
#: A current revision whose data is at most this many bytes is kept as one
#: ``bytes`` object, start tid + data: a hit slices it (two small copies).
#: A bigger one is a tuple, so that a hit never copies it.
COMPACT_MAX = 2048
#: An eviction frees what the store (or ``make_room``) needs, then goes on
#: while the next revision fits in ``size_limit // EVICT_BATCH`` bytes more.
EVICT_BATCH = 32
#: Prefetched revisions not used yet: at most ``size_limit // UNUSED_SHARE``
#: bytes; beyond that the oldest half of them join the others.
UNUSED_SHARE = 8
#: Their dict is made anew once fewer than ``1 / UNUSED_SHRINK`` of the most
#: it held are left.
UNUSED_SHRINK = 8


def _size(entry) -> int:
    """The data bytes of an ``_entries`` value."""
    return len(entry) - 8 if type(entry) is bytes else len(entry[2])


def _valid(entry, before: bytes):
    """``(data, start, end)`` of the value of an ``oid`` key if it is the
    revision valid just before ``before``, else None."""
    if type(entry) is bytes:
        start = entry[:8]
        return (entry[8:], start, None) if start < before else None
    start, end, data = entry
    return (data, start, end) if start < before and (end is None or before <= end) else None


class ClientCache:
    def __init__(self, size: int = 20 * 2**20):
        self.size_limit = size
        self._lock = Lock()
        # Every revision but the unused prefetched ones, least recently used
        # first.  An oid's current revision (end None), or that revision
        # after an invalidation ended it, is at key ``oid``; the others at
        # key ``(oid, start)``, their starts listed in ``_older``.  A current
        # revision of at most COMPACT_MAX bytes is ``start + data`` (bytes);
        # any other revision a tuple ``(start, end, data)``.
        self._entries: dict = {}
        self._older: dict = {}                       # oid -> [start, ...]
        # Prefetched revisions at key ``oid`` not used since they came,
        # oldest first, keyed by the answer's oid objects; their bytes.
        self._unused: dict = {}
        self._unused_bytes = 0
        self._unused_most = 0       # the most of them since their dict was made
        # Start tids seen lately, each kept once: the tuples of the revisions
        # one transaction wrote share one tid object (the answers that bring
        # them carry a copy each).
        self._tids: dict = {}
        self._bytes = 0
        self._evict_passes = 0                       # passes over the order (tests)
        self.last_tid: bytes | None = None
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries) + len(self._unused)

    def getLastTid(self) -> bytes | None:
        """ZEO's name for :attr:`last_tid` (``ClientStorage._cache``)."""
        return self.last_tid

    def stats(self) -> dict:
        return dict(hits=self.hits, misses=self.misses, evictions=self.evictions,
                    bytes=self._bytes, revisions=len(self), limit=self.size_limit)

    # -- lookups (any thread) ----------------------------------------------------
    def load(self, oid: bytes):
        """The current revision as ``(data, start)``, or None."""
        r = self.loadBefore(oid, _NEVER)
        return None if r is None or r[2] is not None else r[:2]

    def loadBefore(self, oid: bytes, before: bytes):
        """``(data, start, end)`` of the revision valid just before ``before``."""
        with self._lock:
            entries = self._entries
            entry = entries.get(oid)
            if type(entry) is bytes:                    # current, compact
                start = entry[:8]
                if start < before:
                    if self._bytes * 2 > self.size_limit:   # used: to the end
                        del entries[oid]
                        entries[oid] = entry
                    self.hits += 1
                    return entry[8:], start, None
            elif entry is not None:
                if entry[0] < before:
                    end = entry[1]
                    if end is None or before <= end:
                        if self._bytes * 2 > self.size_limit:
                            del entries[oid]
                            entries[oid] = entry
                        self.hits += 1
                        return entry[2], entry[0], end
            else:
                entry = self._unused.get(oid)
                found = None if entry is None else _valid(entry, before)
                if found is not None:
                    self._first_use(oid, entry)
                    self.hits += 1
                    return found
            for start in self._older.get(oid, ()):
                if start < before:
                    key = (oid, start)
                    found = entries.get(key)
                    if found is None:   # an update cut short (a signal handler's exception)
                        continue
                    end = found[1]
                    if before <= end:
                        if self._bytes * 2 > self.size_limit:
                            del entries[key]
                            entries[key] = found
                        self.hits += 1
                        return found[2], start, end
            self.misses += 1
            return None

    def _first_use(self, oid: bytes, entry) -> None:
        """A prefetched revision's first use: it joins the others, keyed by
        the caller's ``oid`` from now on."""
        unused = self._unused
        del unused[oid]
        self._unused_bytes -= _size(entry) + ENTRY_OVERHEAD
        self._entries[oid] = entry
        if len(unused) * UNUSED_SHRINK < self._unused_most:
            self._shrink_unused()

    def _shrink_unused(self) -> None:
        """A new dict for the unused prefetched revisions, its table the size
        of what is left (a dict's table never shrinks as keys go)."""
        self._unused = dict(self._unused)
        self._unused_most = len(self._unused)

    # -- updates (reactor thread) ------------------------------------------------
    def store(self, oid: bytes, start: bytes, end: bytes | None, data: bytes) -> None:
        with self._lock:
            self._store(oid, start, end, data, self._entries)
            if self._bytes > self.size_limit:
                self._evict(self.size_limit)

    def store_prefetched(self, records) -> None:
        """Store the records reference prefetch brought with an answer,
        ``[(oid, data, start, end)]``: a current one waits for its first
        use with the unused ones (see the module's docstring)."""
        with self._lock:
            unused = self._unused
            for oid, data, start, end in records:
                self._store(oid, start, end, data, unused)
            if self._unused_bytes > self.size_limit // UNUSED_SHARE:
                self._promote(self.size_limit // UNUSED_SHARE // 2)
            if self._bytes > self.size_limit:
                self._evict(self.size_limit)

    def _store(self, oid: bytes, start: bytes, end, data: bytes, into: dict) -> None:
        """``store``, under the lock, without the eviction: a current
        revision goes ``into`` ``_entries`` or ``_unused``."""
        entries = self._entries
        latest = entries.get(oid)
        if latest is None:
            latest = self._unused.get(oid)
        if latest is not None:
            latest_start = latest[:8] if type(latest) is bytes else latest[0]
            if latest_start == start:
                return                  # known already
        older = self._older.get(oid)
        if older is not None and start in older:
            if (oid, start) in entries:
                return                  # known already
            self._forget_older(oid, start)       # lost by an update cut short
        if end is None:
            if latest is not None:
                if latest_start > start:
                    return              # we already know a newer revision
                if type(latest) is bytes or latest[1] is None:
                    self._drop(oid)             # its end is unknown: dropped
                else:                           # ended: one of the older ones now
                    self._pop_current(oid)
                    self._add_older(oid, latest)
            into[oid] = start + data if len(data) <= COMPACT_MAX \
                else (self._shared(start), None, data)
            if into is self._unused:
                self._unused_bytes += len(data) + ENTRY_OVERHEAD
                self._unused_most = max(self._unused_most, len(into))
        else:
            self._add_older(oid, (self._shared(start), end, data))
        self._bytes += len(data) + ENTRY_OVERHEAD

    def make_room(self, size: int) -> None:
        """A record of ``size`` bytes is about to arrive: evict what storing
        it would, now, so that the memory of what goes is free before the
        record's own is taken (a big record then reuses it, instead of
        fresh pages that fault one by one: docs/performance.md, "Big
        records")."""
        with self._lock:
            if self._bytes + size + ENTRY_OVERHEAD > self.size_limit:
                self._evict(self.size_limit - size - ENTRY_OVERHEAD)

    def _shared(self, tid: bytes) -> bytes:
        tids = self._tids
        if len(tids) >= TIDS_SHARED:
            tids.clear()
        return tids.setdefault(tid, tid)

    def _add_older(self, oid: bytes, entry: tuple) -> None:
        self._older.setdefault(oid, []).append(entry[0])
        self._entries[(oid, entry[0])] = entry

    def _forget_older(self, oid: bytes, start: bytes) -> None:
        older = self._older[oid]
        older.remove(start)
        if not older:
            del self._older[oid]

    def invalidate(self, oid: bytes, tid: bytes) -> None:
        """Transaction ``tid`` changed ``oid``: its current revision ends there."""
        with self._lock:
            where = self._entries
            entry = where.get(oid)
            if entry is None:
                where = self._unused
                entry = where.get(oid)
            if type(entry) is bytes:
                start = entry[:8]
                if start < tid:                 # its place in the order kept
                    where[oid] = (self._shared(start), tid, entry[8:])
            elif entry is not None and entry[1] is None and entry[0] < tid:
                where[oid] = (entry[0], tid, entry[2])
            # else nothing current cached, or we already have tid's revision

    def invalidate_after(self, oid: bytes, after: bytes) -> None:
        """Some transaction after ``after`` changed ``oid`` (cache verification).

        A current revision that was current at ``after`` ends at ``after + 1``
        (a lower bound of its real end, so every snapshot it serves is
        right); one written after ``after`` may itself be stale: drop it.
        """
        with self._lock:
            where = self._entries
            entry = where.get(oid)
            if entry is None:
                where = self._unused
                entry = where.get(oid)
            if entry is None:
                return
            if type(entry) is bytes:
                start, data = self._shared(entry[:8]), entry[8:]
            elif entry[1] is None:
                start, _, data = entry
            else:
                return
            if start > after:
                self._drop(oid)
                return
            end = (int.from_bytes(after, "big") + 1).to_bytes(8, "big")
            where[oid] = (start, end, data)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._older.clear()
            self._unused.clear()
            self._tids.clear()
            self._bytes = self._unused_bytes = self._unused_most = 0

    # -- persistence (see zeotwist.client.cachefile) -----------------------------
    def snapshot(self):
        """``(last_tid, [(oid, start, end, data), ...])``, least recently used first.

        Taken atomically under the lock, so it is one consistent state.
        """
        with self._lock:
            out = []
            for entries in (self._entries, self._unused):
                out += [(key, entry[:8], None, entry[8:]) if type(entry) is bytes
                        else (key[0] if type(key) is tuple else key, *entry)
                        for key, entry in entries.items()]
            return self.last_tid, out

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
            self._unused.clear()
            self._tids.clear()
            for oid, start, end, data in reversed(kept):
                if end is None:
                    self._entries[oid] = start + data if len(data) <= COMPACT_MAX \
                        else (self._shared(start), None, data)
                else:
                    self._add_older(oid, (self._shared(start), end, data))
            self._bytes = sum(len(e[3]) + ENTRY_OVERHEAD for e in kept)
            self._unused_bytes = self._unused_most = 0
            self.last_tid = last_tid

    # -- eviction ----------------------------------------------------------------
    def _evict(self, limit: int) -> None:
        """Evict the least recently used revisions (the unused prefetched
        ones last, as the most recent) until at most ``limit`` bytes are
        left, then go on while the next one fits in ``size_limit //
        EVICT_BATCH`` bytes more: one pass over the order for them all."""
        must = self._bytes - limit                          # bytes that must go
        may = must + self.size_limit // EVICT_BATCH         # bytes that may go
        victims = []
        for entries in (self._entries, self._unused):
            for key, entry in entries.items():
                cost = _size(entry) + ENTRY_OVERHEAD
                if must <= 0 and cost > may:
                    break
                victims.append(key)
                must -= cost
                may -= cost
            if must <= 0:
                break
        self._evict_passes += 1
        for key in victims:
            self._drop(key)
            self.evictions += 1

    def _promote(self, limit: int) -> None:
        """The oldest unused prefetched revisions join the others (keeping
        the answer's oid objects) until at most ``limit`` bytes of them are left."""
        unused, entries, moved = self._unused, self._entries, []
        excess = self._unused_bytes - limit
        for oid, entry in unused.items():
            if excess <= 0:
                break
            moved.append(oid)
            excess -= _size(entry) + ENTRY_OVERHEAD
        for oid in moved:
            entry = unused.pop(oid)
            self._unused_bytes -= _size(entry) + ENTRY_OVERHEAD
            entries[oid] = entry
        if len(unused) * UNUSED_SHRINK < self._unused_most:
            self._shrink_unused()

    def _drop(self, key) -> None:
        if type(key) is tuple:
            entry = self._entries.pop(key)
            self._forget_older(key[0], key[1])
        else:
            entry = self._pop_current(key)
        self._bytes -= _size(entry) + ENTRY_OVERHEAD

    def _pop_current(self, oid: bytes):
        """Take the revision at key ``oid`` out, wherever it is."""
        entry = self._entries.pop(oid, None)
        if entry is None:
            entry = self._unused.pop(oid)
            self._unused_bytes -= _size(entry) + ENTRY_OVERHEAD
        return entry


#: ``before`` of a lookup of the current revision: after every tid.
_NEVER = b"\xff" * 9
