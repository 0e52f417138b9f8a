"""The client cache: MVCC revisions, invalidation, eviction (pure logic)."""
import sys
import threading

from ZODB.utils import p64

from tests.test_interrupted_invalidations import _Interrupt
from zeotwist.client.cache import COMPACT_MAX, ENTRY_OVERHEAD, EVICT_BATCH, UNUSED_SHARE, ClientCache

OID = p64(1)


def test_current_revision_serves_later_snapshots():
    c = ClientCache()
    c.store(OID, p64(5), None, b"v5")
    assert c.loadBefore(OID, p64(6)) == (b"v5", p64(5), None)
    assert c.loadBefore(OID, p64(100)) == (b"v5", p64(5), None)
    assert c.loadBefore(OID, p64(5)) is None       # snapshot before it was written
    assert c.load(OID) == (b"v5", p64(5))


def test_invalidation_ends_the_current_revision():
    c = ClientCache()
    c.store(OID, p64(5), None, b"v5")
    c.invalidate(OID, p64(9))
    assert c.load(OID) is None
    assert c.loadBefore(OID, p64(9)) == (b"v5", p64(5), p64(9))
    assert c.loadBefore(OID, p64(10)) is None      # the new revision is unknown
    c.store(OID, p64(9), None, b"v9")
    assert c.loadBefore(OID, p64(10)) == (b"v9", p64(9), None)
    assert c.loadBefore(OID, p64(7)) == (b"v5", p64(5), p64(9))


def test_invalidation_older_than_current_is_ignored():
    # A load answered after a commit's data was durable, but before its
    # invalidation arrived: the cached revision already is that commit's.
    c = ClientCache()
    c.store(OID, p64(9), None, b"v9")
    c.invalidate(OID, p64(9))
    assert c.load(OID) == (b"v9", p64(9))


def test_older_current_store_does_not_replace_newer():
    c = ClientCache()
    c.store(OID, p64(9), None, b"v9")
    c.store(OID, p64(5), None, b"v5")
    assert c.load(OID) == (b"v9", p64(9))


def test_eviction_is_lru_and_bounded():
    size = 10 * (100 + ENTRY_OVERHEAD)
    c = ClientCache(size)
    for i in range(10):
        c.store(p64(i), p64(1), None, b"x" * 100)
    c.load(p64(0))                      # 0 becomes most recently used
    c.store(p64(10), p64(1), None, b"x" * 100)
    assert c.load(p64(1)) is None       # the least recently used went
    assert c.load(p64(0)) is not None
    stats = c.stats()
    assert stats["bytes"] <= size and stats["evictions"] == 1


def test_clear_and_stats():
    c = ClientCache()
    c.store(OID, p64(1), None, b"a")
    c.store(OID, p64(0), p64(1), b"b")
    assert len(c) == 2
    c.load(OID)
    c.load(p64(2))
    assert c.stats()["hits"] == 1 and c.stats()["misses"] == 1
    c.clear()
    assert len(c) == 0 and c.stats()["bytes"] == 0 and c.load(OID) is None


def test_concurrent_readers_and_writer():
    c = ClientCache(50_000)
    errors = []

    def writer():
        for i in range(2000):
            c.store(p64(i % 300), p64(i + 1), None, b"y" * 50)
            c.invalidate(p64((i + 7) % 300), p64(i + 2))

    def reader():
        try:
            for i in range(4000):
                r = c.loadBefore(p64(i % 300), p64(10**6))
                assert r is None or r[0] == b"y" * 50
        except Exception as e:     # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert c.stats()["bytes"] <= 50_000


def test_invalidate_after_for_verification():
    c = ClientCache()
    c.store(OID, p64(5), None, b"v5")          # current since before tid 7
    c.store(p64(2), p64(9), None, b"w9")       # written after tid 7: may be stale
    c.invalidate_after(OID, p64(7))
    c.invalidate_after(p64(2), p64(7))
    assert c.load(OID) is None
    assert c.loadBefore(OID, p64(8)) == (b"v5", p64(5), p64(8))   # right for snapshots <= 7
    assert c.loadBefore(OID, p64(9)) is None
    assert c.load(p64(2)) is None and c.loadBefore(p64(2), p64(100)) is None


def test_an_invalidated_revision_keeps_its_place_in_the_lru_order():
    size = 3 * (100 + ENTRY_OVERHEAD)
    c = ClientCache(size)
    for i in range(3):
        c.store(p64(i), p64(1), None, b"x" * 100)
    c.invalidate(p64(0), p64(5))            # the least recently used, now ended
    c.store(p64(3), p64(1), None, b"x" * 100)
    assert c.loadBefore(p64(0), p64(2)) is None      # it went first
    assert c.loadBefore(p64(1), p64(2)) == (b"x" * 100, p64(1), None)


def test_revisions_after_invalidation_and_reload_survive_a_snapshot():
    c = ClientCache()
    c.store(OID, p64(5), None, b"v5")
    c.invalidate(OID, p64(9))
    c.store(OID, p64(9), None, b"v9")
    c.store(OID, p64(2), p64(5), b"v2")
    c.store(OID, p64(3), None, b"v3")           # a late, stale answer: ignored
    c.store(OID, p64(5), p64(9), b"v5")         # known already
    assert len(c) == 3
    restored = ClientCache()
    restored.restore(*c.snapshot())
    for cache in (c, restored):
        assert cache.load(OID) == (b"v9", p64(9))
        assert cache.loadBefore(OID, p64(9)) == (b"v5", p64(5), p64(9))
        assert cache.loadBefore(OID, p64(4)) == (b"v2", p64(2), p64(5))
        assert cache.loadBefore(OID, p64(2)) is None
    assert restored.stats()["bytes"] == c.stats()["bytes"]


def test_a_small_revision_takes_its_data_and_a_few_dozen_bytes():
    """A current revision of 57 bytes: one bytes object (start + data, 98
    bytes) and its slot in the dict, the oid being the caller's: about 128
    bytes on CPython 3.11, against 228 as a tuple in an OrderedDict beside
    its data object (docs/performance.md, "Issue 10, eighth session")."""
    import tracemalloc
    n = 5000
    oids = [p64(i) for i in range(n)]
    tids = [p64(10**6 + i) for i in range(n)]
    c = ClientCache()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i, (oid, tid) in enumerate(zip(oids, tids)):
            c.store(oid, tid, None, b"%57d" % i)        # the data: only the cache keeps it
        per_revision = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
    assert per_revision < 150, per_revision
    assert c.load(oids[7]) == (b"%57d" % 7, tids[7])


def test_the_revisions_of_one_transaction_share_its_tid():
    """Each answer brings its own copy of the tid; the revisions kept as
    tuples (ended, non-current, big) share one (48 bytes less per revision;
    docs/performance.md, "Memory")."""
    c = ClientCache()
    for i in range(3):
        c.store(p64(i), bytes(p64(7)), p64(9), b"data")         # equal, not the same object
    c.store(p64(3), bytes(p64(7)), None, b"x" * (COMPACT_MAX + 1))
    c.store(p64(4), bytes(p64(7)), None, b"small")
    c.invalidate(p64(4), p64(9))                                # ended: a tuple from now on
    starts = [c.loadBefore(p64(i), p64(8))[1] for i in range(5)]
    assert starts == [p64(7)] * 5
    assert all(start is starts[0] for start in starts)


# -- the representation: compact current revisions, big ones, ended ones ------------------

def test_a_big_current_revision_is_handed_out_without_a_copy():
    big, small = b"b" * (COMPACT_MAX + 1), b"s" * COMPACT_MAX
    c = ClientCache()
    c.store(p64(1), p64(5), None, big)
    c.store(p64(2), p64(5), None, small)
    assert c.loadBefore(p64(1), p64(6))[0] is big
    assert c.loadBefore(p64(2), p64(6)) == (small, p64(5), None)
    assert c.stats()["bytes"] == len(big) + len(small) + 2 * ENTRY_OVERHEAD
    c.invalidate(p64(1), p64(8))
    c.invalidate(p64(2), p64(8))
    assert c.loadBefore(p64(1), p64(8))[0] is big
    assert c.loadBefore(p64(2), p64(8)) == (small, p64(5), p64(8))
    assert c.load(p64(1)) is None and c.load(p64(2)) is None
    assert c.stats()["bytes"] == len(big) + len(small) + 2 * ENTRY_OVERHEAD


def test_an_ended_compact_revision_serves_its_snapshots_and_makes_way_for_the_next():
    c = ClientCache()
    c.store(OID, p64(5), None, b"v5")
    c.invalidate(OID, p64(4))                   # older than it: nothing
    assert c.load(OID) == (b"v5", p64(5))
    c.invalidate(OID, p64(9))
    assert c.loadBefore(OID, p64(9)) == (b"v5", p64(5), p64(9))
    assert c.loadBefore(OID, p64(5)) is None
    c.store(OID, p64(9), None, b"v9")           # the ended one joins the older ones
    assert c.loadBefore(OID, p64(7)) == (b"v5", p64(5), p64(9))
    assert c.load(OID) == (b"v9", p64(9))
    assert len(c) == 2 and c.stats()["bytes"] == 4 + 2 * ENTRY_OVERHEAD


def test_a_hit_reorders_only_when_the_cache_is_more_than_half_full():
    """Below half full nothing is near eviction: the revisions keep the
    order they were stored in (their dict's table stays the size of its
    keys); above, a hit makes its revision the most recently used."""
    c = ClientCache(size=10 * (100 + ENTRY_OVERHEAD))
    for i in range(4):
        c.store(p64(i), p64(1), None, b"x" * 100)
    c.load(p64(0))
    assert [e[0] for e in c.snapshot()[1]] == [p64(0), p64(1), p64(2), p64(3)]
    c.store(p64(4), p64(1), None, b"x" * 100)
    c.store(p64(5), p64(1), None, b"x" * 100)   # 6 of 10: more than half
    c.load(p64(0))
    c.loadBefore(p64(1), p64(2))
    assert [e[0] for e in c.snapshot()[1]] == [p64(i) for i in (2, 3, 4, 5, 0, 1)]


def test_eviction_goes_in_batches_one_pass_each():
    """A cache that evicts at every store scans its order once per batch of
    size_limit // EVICT_BATCH bytes, not once per store (the keys deleted
    at the front of a dict are scanned by every pass)."""
    cost = 100 + ENTRY_OVERHEAD
    c = ClientCache(size=1000 * cost)
    stores = 20_000
    for i in range(stores):
        c.store(p64(i), p64(1), None, b"x" * 100)
        assert c.stats()["bytes"] <= c.size_limit
    evicted = stores - len(c)
    assert c.stats()["evictions"] == evicted > 15_000
    per_batch = c.size_limit // EVICT_BATCH // cost + 1
    assert c._evict_passes <= evicted // per_batch + 1
    assert len(c) >= 1000 - per_batch                   # never below the batch
    assert c.load(p64(stores - 1)) is not None and c.load(p64(0)) is None


# -- prefetched revisions: kept apart until their first use -------------------------------

def _wire_oid(n: int) -> bytes:
    return bytes(bytearray(p64(n)))          # equal to p64(n), another object


def test_a_prefetched_revision_is_keyed_by_the_callers_oid_from_its_first_use():
    c = ClientCache()
    wire = _wire_oid(1)
    c.store_prefetched([(wire, b"data", p64(5), None), (_wire_oid(2), b"two", p64(3), p64(6))])
    mine = p64(1)
    assert mine is not wire
    assert c.loadBefore(mine, p64(9)) == (b"data", p64(5), None)
    key = next(k for k in c._entries if k == mine)
    assert key is mine and not c._unused
    assert c.loadBefore(p64(2), p64(4)) == (b"two", p64(3), p64(6))   # non-current: stored as ever
    assert c.stats()["revisions"] == 2 and c.stats()["hits"] == 2


def test_unused_prefetched_revisions_are_invalidated_and_evicted_like_the_others():
    c = ClientCache(size=10 * (100 + ENTRY_OVERHEAD))
    c.store(p64(0), p64(1), None, b"x" * 100)
    c.store_prefetched([(_wire_oid(i), b"p" * 100, p64(2), None) for i in (1, 2, 3)])
    c.invalidate(p64(1), p64(7))
    assert c.load(p64(1)) is None
    assert c.loadBefore(p64(1), p64(7)) == (b"p" * 100, p64(2), p64(7))
    c.invalidate_after(p64(2), p64(1))          # written after 1: may be stale, dropped
    c.invalidate_after(p64(3), p64(4))          # current at 4: ends at 5
    assert c.loadBefore(p64(2), p64(9)) is None
    assert c.loadBefore(p64(3), p64(5)) == (b"p" * 100, p64(2), p64(5))
    c.store(p64(3), p64(8), None, b"new")       # the ended one becomes an older revision
    assert c.loadBefore(p64(3), p64(5)) == (b"p" * 100, p64(2), p64(5))
    assert c.load(p64(3)) == (b"new", p64(8))
    c.store_prefetched([(_wire_oid(4), b"q" * 100, p64(2), None)])
    for i in range(10, 20):     # the unused ones count as the most recent: evicted last
        c.store(p64(i), p64(1), None, b"x" * 100)
    assert c.stats()["bytes"] <= c.size_limit and len(c) == 10
    assert c.load(p64(0)) is None and c.load(p64(10)) is None
    assert c.load(p64(4)) == (b"q" * 100, p64(2)) and c.load(p64(19)) is not None


def test_unused_prefetched_revisions_beyond_their_share_join_the_others():
    cost = 100 + ENTRY_OVERHEAD
    c = ClientCache(size=UNUSED_SHARE * 100 * cost)      # room for 100 unused ones
    c.store_prefetched([(_wire_oid(i), b"p" * 100, p64(2), None) for i in range(150)])
    assert c._unused_bytes <= c.size_limit // UNUSED_SHARE
    assert len(c._unused) + len(c._entries) == 150 and len(c._entries) >= 50
    assert [e[0] for e in c.snapshot()[1]] == [p64(i) for i in range(150)]   # oldest first
    assert all(c.load(p64(i)) == (b"p" * 100, p64(2)) for i in range(150))
    assert not c._unused and c.stats()["bytes"] == 150 * cost


def test_the_unused_prefetched_revisions_dict_is_made_anew_as_they_are_used():
    c = ClientCache()
    c.store_prefetched([(_wire_oid(i), b"p", p64(2), None) for i in range(1000)])
    table = sys.getsizeof(c._unused)
    for i in range(990):
        assert c.load(p64(i)) == (b"p", p64(2))
    assert len(c._unused) == 10 and sys.getsizeof(c._unused) * 8 < table
    assert all(c.load(p64(i)) == (b"p", p64(2)) for i in range(990, 1000))


def test_every_form_survives_a_snapshot_and_restore():
    big = b"B" * (COMPACT_MAX + 1)
    c = ClientCache()
    c.store(p64(1), p64(5), None, b"compact")
    c.store(p64(2), p64(5), None, big)
    c.store(p64(3), p64(2), None, b"ended")
    c.invalidate(p64(3), p64(6))
    c.store(p64(3), p64(1), p64(2), b"older")
    c.store_prefetched([(_wire_oid(4), b"unused", p64(4), None)])
    last, entries = c.snapshot()
    assert [e[0] for e in entries] == [p64(1), p64(2), p64(3), p64(3), p64(4)]
    restored = ClientCache()
    restored.restore(p64(9), entries)
    for cache in (c, restored):
        assert cache.load(p64(1)) == (b"compact", p64(5))
        assert cache.load(p64(2)) == (big, p64(5))
        assert cache.loadBefore(p64(3), p64(6)) == (b"ended", p64(2), p64(6))
        assert cache.loadBefore(p64(3), p64(2)) == (b"older", p64(1), p64(2))
        assert cache.load(p64(3)) is None
        assert cache.load(p64(4)) == (b"unused", p64(4))
    assert restored.stats()["bytes"] == c.stats()["bytes"]
    assert restored.snapshot()[1] == c.snapshot()[1]


# -- a store cut short by a signal handler's exception (KeyboardInterrupt) ---------------
# An application thread stores what it reads (threadreads: a load's record,
# a commit's own records): the exception may land anywhere in ClientCache.store
# (test_interrupted_invalidations' trace, at every check point in turn).  The
# cache may lose what that store was adding, but must neither serve a wrong
# revision nor fail every later lookup of the object (a KeyError before).

_OID1 = p64(1)


def _filled():
    """A cache with an ended revision of _OID1 (1-2) and its current one (2-)."""
    cache = ClientCache(2**20)
    cache.store(_OID1, p64(1), None, b"one")
    cache.invalidate(_OID1, p64(2))
    cache.store(_OID1, p64(2), None, b"two")     # "one" becomes an older revision
    cache.invalidate(_OID1, p64(3))
    return cache


def test_an_interrupt_anywhere_in_a_store_leaves_the_cache_usable():
    n = 0
    while True:
        n += 1
        cache = _filled()
        interrupt = _Interrupt(ClientCache.store.__code__, n)
        sys.settrace(interrupt)
        try:
            cache.store(_OID1, p64(3), None, b"three")    # "two" moves to the older ones
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        where = "interrupted at %d: %s" % (n, interrupt.fired)
        for before, data in ((p64(2), b"one"), (p64(3), b"two"), (p64(4), b"three")):
            found = cache.loadBefore(_OID1, before)
            assert found is None or found[0] == data, where
        cache.store(_OID1, p64(9), p64(10), b"other")     # more revisions, then all evicted
        cache.size_limit = 0
        cache.make_room(0)
        assert cache.loadBefore(_OID1, p64(4)) is None, where
        if interrupt.fired is None:
            break
    assert n > 5
