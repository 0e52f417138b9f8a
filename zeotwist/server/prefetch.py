"""Reference prefetch, the server's side: which records ride along with a LoadBefore answer.

One :class:`Prefetcher` per session whose client registered with
``prefetch=True`` (and only when the storage server's ``prefetch_count``
is above 0).  For an answered record it finds the oids the record
references with ``ZODB.serialize.referencesf`` (which reads the pickle's
persistent references without building objects or importing classes),
and loads each with ``storage.loadBefore(ref, tid)`` — the snapshot the
client asked for — skipping oids this client was already sent a current
revision of since their last invalidation, until ``count`` records or
``max_bytes`` bytes.  The answer and its prefetched records are computed
and written in one go on the reactor thread, so every Invalidate written
before them was applied by the storage first, and every later one reaches
the client after them (docs/performance.md, "Reference prefetch", gives
the whole consistency argument).

Runs on the reactor thread, like the session that owns it.
"""
from ZODB.serialize import referencesf

from zeotwist.wire import prefetch as wire

#: Oids remembered as sent to one client (under 1 MB of memory); past it the
#: memory is dropped (the cost: records sent again, never a wrong one).
MAX_REMEMBERED = 10_000
#: The pickle opcodes of a persistent reference (PERSID, BINPERSID).
_PERSID, _BINPERSID = b"P", b"Q"


def may_reference(data: bytes) -> bool:
    """False when the record ``data`` holds no persistent reference for
    sure: neither opcode byte occurs in it.  A scan in C, so a leaf record
    (most of them) costs no Unpickler (``referencesf``: about 3 us); True
    says only that ``referencesf`` must look."""
    return _BINPERSID in data or _PERSID in data


#: A record longer than this is not read for references: ``referencesf``
#: walks the whole pickle (a 10 MB record took 14 ms of the server's time, a
#: third of its load), more than the round trips a prefetch could save.
MAX_SCANNED = 2**20


class Prefetcher:
    def __init__(self, count: int, max_bytes: int):
        self.count = count
        self.max_bytes = min(max_bytes, wire.MAX_BYTES)
        #: oids whose current revision this client was sent, not invalidated since
        self.sent: set = set()
        self.records = 0          # records prefetched on this connection

    def answered(self, oid: bytes, end) -> None:
        """The client was sent a revision of ``oid`` (current if ``end`` is None)."""
        if end is None:
            self._remember(oid)

    def forget(self, oids) -> None:
        """Transactions changed ``oids``: the client's copies are no longer current."""
        discard = self.sent.discard
        for oid in oids:
            discard(oid)

    def _remember(self, oid: bytes) -> None:
        if len(self.sent) >= MAX_REMEMBERED:
            self.sent.clear()
        self.sent.add(oid)

    def collect(self, load_before, oid: bytes, data: bytes, tid: bytes) -> bytes | None:
        """The ``prefetch`` value for the answer ``data`` of ``oid`` at ``tid``, or None."""
        if len(data) > MAX_SCANNED or not may_reference(data):
            return None
        try:
            refs = referencesf(data)
        except Exception:
            return None               # not a pickle we can read: no prefetch
        picked, used, seen, tries = [], 0, {oid}, 2 * self.count
        for ref in refs:
            if len(picked) >= self.count or tries <= 0:
                break
            if ref in seen or ref in self.sent or len(ref) != 8:
                continue
            seen.add(ref)
            tries -= 1                # storage loads per answer: at most 2 * count
            try:
                r = load_before(ref, tid)
            except Exception:
                continue              # e.g. a dangling reference: POSKeyError
            if r is None:
                continue
            size = wire.record_size(r[0])
            if used + size > self.max_bytes:
                continue              # a smaller one may still fit
            used += size
            picked.append((ref,) + tuple(r))
            if r[2] is None:
                self._remember(ref)
        if not picked:
            return None
        self.records += len(picked)
        return wire.encode(picked)
