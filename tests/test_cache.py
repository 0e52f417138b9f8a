"""The client cache: MVCC revisions, invalidation, eviction (pure logic)."""
import sys
import threading

from ZODB.utils import p64

from tests.test_interrupted_invalidations import _Interrupt
from zeotwist.client.cache import ENTRY_OVERHEAD, ClientCache

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


def test_the_structures_of_a_small_revision_stay_small():
    """Its slot in the LRU order and its tuple, without the oid, tid and
    data objects: 138 bytes on CPython 3.11 (231 with a tuple key, a list
    and a second dict); docs/performance.md, "Memory"."""
    import tracemalloc
    n = 5000
    oids = [p64(i) for i in range(n)]
    tids = [p64(10**6 + i) for i in range(n)]
    datas = [b"%57d" % i for i in range(n)]
    c = ClientCache()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for oid, tid, data in zip(oids, tids, datas):
            c.store(oid, tid, None, data)
        per_revision = (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()
    assert per_revision < 180, per_revision


def test_the_revisions_of_one_transaction_share_its_tid():
    """Each answer brings its own copy of the tid; the cache keeps one
    (48 bytes less per revision; docs/performance.md, "Memory")."""
    c = ClientCache()
    for i in range(3):
        c.store(p64(i), bytes(p64(7)), None, b"data")     # equal, not the same object
    starts = [c.load(p64(i))[1] for i in range(3)]
    assert starts == [p64(7)] * 3
    assert starts[0] is starts[1] is starts[2]


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
