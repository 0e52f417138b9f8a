"""The persistent client cache file: format, integrity, locking, atomic saves (pure, tmp_path)."""
import hashlib
import os
import subprocess
import sys

import pytest
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from ZODB.utils import p64

from zeotwist.client import cachefile
from zeotwist.client.cache import ENTRY_OVERHEAD, ClientCache
from zeotwist.client.cachefile import MAGIC, VERSION, CacheFile, cache_path
from zeotwist.errors import CacheLockedError, ForeignCacheFile, WrongStateError, ZeotwistError

LAST = p64(50)


@pytest.fixture
def warnings():
    """Formatted text of every warning (or worse) the cache file logs (another
    test's client still retrying may log through the same publisher)."""
    seen = []

    def observer(event):
        if (event.get("log_level", LogLevel.info) >= LogLevel.warn
                and event.get("log_namespace") == "zeotwist.client.cachefile"):
            seen.append(formatEvent(event))
    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


@pytest.fixture
def cf(tmp_path):
    f = CacheFile(str(tmp_path / "app-1.ztc")).open()
    yield f
    f.close()


def sample_cache() -> ClientCache:
    """Current and non-current revisions, with an LRU order unlike insertion order
    (the cache more than half full, so that a hit reorders: zeotwist.client.cache)."""
    c = ClientCache(size=2000)
    c.store(p64(1), p64(5), None, b"one@5")
    c.store(p64(2), p64(6), None, b"two@6" * 40)
    c.store(p64(1), p64(3), p64(5), b"one@3")
    c.store(p64(3), p64(7), None, b"")
    c.invalidate(p64(2), p64(9))            # two@6 is now non-current, ending at 9
    c.store(p64(4), p64(8), None, bytes(range(256)) * 2)     # spans small chunks
    c.load(p64(1))                          # one@5 becomes the most recently used
    c.last_tid = LAST
    return c


def good_file(cf) -> bytes:
    last_tid, entries = sample_cache().snapshot()
    cf.save(last_tid, entries)
    with open(cf.path, "rb") as f:
        return f.read()


def assert_rejected(cf, content: bytes, warnings, why: str = "") -> None:
    with open(cf.path, "wb") as f:
        f.write(content)
    del warnings[:]
    assert cf.load() is None
    assert len(warnings) == 1, warnings
    assert cf.path in warnings[0] and why in warnings[0], warnings[0]
    assert not os.path.exists(cf.path)       # deleted: the next start does not warn again


def with_digest(body: bytes) -> bytes:
    return body + hashlib.sha256(body).digest()


# -- naming -------------------------------------------------------------------------------

def test_cache_path_follows_zeo_with_our_own_suffix(tmp_path, monkeypatch):
    assert cache_path("app", str(tmp_path), "1") == os.path.join(str(tmp_path), "app-1.ztc")
    monkeypatch.chdir(tmp_path)
    assert cache_path("app", None, "main") == os.path.join(os.getcwd(), "app-main.ztc")


# -- round trips --------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [cachefile._CHUNK, 7, 64])
def test_round_trip_keeps_revisions_last_tid_and_lru_order(cf, monkeypatch, chunk):
    monkeypatch.setattr(cachefile, "_CHUNK", chunk)     # small chunks: records span refills
    cache = sample_cache()
    snap = cache.snapshot()
    cf.save(*snap)
    assert cf.load() == snap
    restored = ClientCache()
    restored.restore(*cf.load())
    assert restored.snapshot() == snap
    assert restored.last_tid == LAST
    assert restored.load(p64(1)) == (b"one@5", p64(5))
    assert restored.loadBefore(p64(1), p64(4)) == (b"one@3", p64(3), p64(5))
    assert restored.loadBefore(p64(2), p64(9)) == (b"two@6" * 40, p64(6), p64(9))
    assert restored.load(p64(2)) is None
    assert restored.load(p64(3)) == (b"", p64(7))
    assert [e[:2] for e in snap[1]][-1] == (p64(1), p64(5))     # the order really was changed


def test_round_trip_without_last_tid_and_empty(cf):
    cf.save(None, [])
    assert cf.load() == (None, [])
    cf.save(None, [(p64(1), p64(2), None, b"x")])
    assert cf.load() == (None, [(p64(1), p64(2), None, b"x")])


def test_save_replaces_the_previous_file(cf):
    cf.save(p64(1), [(p64(1), p64(1), None, b"old")])
    cf.save(p64(2), [(p64(1), p64(2), None, b"new")])
    assert cf.load() == (p64(2), [(p64(1), p64(2), None, b"new")])


def test_missing_file_is_none_without_warning(cf, warnings):
    assert cf.load() is None
    assert warnings == []


# -- untrusted content --------------------------------------------------------------------

def test_every_truncation_is_rejected(cf, warnings, monkeypatch):
    monkeypatch.setattr(cachefile, "_CHUNK", 64)       # truncations fall in every refill state
    good = good_file(cf)
    for length in range(len(good)):           # every header, record and trailer byte
        assert_rejected(cf, good[:length], warnings)


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_every_flipped_byte_is_rejected(cf, warnings, mask):
    good = good_file(cf)
    for i in range(len(good)):
        bad = bytearray(good)
        bad[i] ^= mask
        if i < len(cachefile.OURS):      # no longer says ZTC: not ours, left alone
            assert_left_alone(cf, bytes(bad), warnings)
        else:
            assert_rejected(cf, bytes(bad), warnings)


def assert_left_alone(cf, content: bytes, warnings) -> None:
    with open(cf.path, "wb") as f:
        f.write(content)
    del warnings[:]
    assert cf.load() is None
    assert len(warnings) == 1 and "not a zeotwist cache file" in warnings[0], warnings
    with open(cf.path, "rb") as f:
        assert f.read() == content
    os.unlink(cf.path)


def test_truncated_large_file_is_rejected(cf, warnings):
    entries = [(p64(i), p64(1), None, os.urandom(100)) for i in range(30000)]   # ~4 MB
    cf.save(LAST, entries)
    with open(cf.path, "rb") as f:
        good = f.read()
    for length in (15, 2**20, 2**20 + 13, len(good) // 2, len(good) - 33, len(good) - 1):
        assert_rejected(cf, good[:length], warnings, "truncated")
    assert_rejected(cf, good + b"\0", warnings)


def test_wrong_magic_and_version_are_rejected_even_with_a_valid_digest(cf, warnings):
    body = good_file(cf)[:-32]
    assert body[:4] == MAGIC
    assert_rejected(cf, with_digest(b"ZTC0" + body[4:]), warnings, "magic")
    version = (VERSION + 1).to_bytes(2, "big")
    assert_rejected(cf, with_digest(body[:4] + version + body[6:]), warnings, "version")

def test_a_file_that_is_not_ours_is_never_deleted_or_replaced(cf, warnings):
    garbage = b"garbage that is not a cache file at all, longer than a header"
    with open(cf.path, "wb") as f:
        f.write(garbage)
    del warnings[:]
    assert cf.load() is None
    assert len(warnings) == 1 and "not a zeotwist cache file" in warnings[0], warnings
    with pytest.raises(ForeignCacheFile):
        cf.save(LAST, [])
    with open(cf.path, "rb") as f:
        assert f.read() == garbage           # left alone
    cf.close()
    with pytest.raises(ForeignCacheFile, match="will not overwrite"):
        cf.open()                            # and refused from the start
    assert cf._lock is None


def test_wrong_record_count_is_rejected(cf, warnings):
    body = good_file(cf)[:-32]
    count = int.from_bytes(body[-8:], "big")
    forged = body[:-8] + (count + 1).to_bytes(8, "big")
    assert_rejected(cf, with_digest(forged), warnings, "count")


def test_forged_records_are_rejected_even_with_a_valid_digest(cf, warnings):
    body = good_file(cf)[:-32]
    first = 15                                 # the header's size; then the first record
    assert body[first:first + 1] == b"n"       # two@6, ended by 9: the least recently used
    huge = (2**32 - 1).to_bytes(4, "big")
    forged = [
        (body[:first + 25] + huge + body[first + 29:], "runs past the end"),
        (body[:first] + b"x" + body[first + 1:], "corrupt record"),
        (body[:first] + b"c" + body[first + 1:], "corrupt record"),   # current with an end
        (body[:6] + b"\2" + body[7:], "corrupt header"),
        (body[:6] + b"\0" + body[7:], "corrupt header"),              # no tid, yet tid bytes
    ]
    for content, why in forged:
        assert_rejected(cf, with_digest(content), warnings, why)


def test_unreadable_path_is_none_with_a_warning(cf, warnings):
    os.mkdir(cf.path)                          # a directory where the file should be
    assert cf.load() is None
    assert len(warnings) == 1 and cf.path in warnings[0]


# -- locking ------------------------------------------------------------------------------

def test_second_opener_is_refused_until_the_first_closes(cf, tmp_path):
    other = CacheFile(cf.path)
    with pytest.raises(CacheLockedError) as info:
        other.open()
    assert isinstance(info.value, ZeotwistError) and cf.path in str(info.value)
    cf.save(LAST, [])
    cf.close()
    with other:
        assert other.load() == (LAST, [])


def test_another_process_is_refused(cf):
    probe = ("import sys\nfrom zeotwist.client.cachefile import CacheFile\n"
             "from zeotwist.errors import CacheLockedError\n"
             "try:\n    CacheFile(sys.argv[1]).open()\nexcept CacheLockedError:\n    sys.exit(3)\n")
    run = subprocess.run([sys.executable, "-c", probe, cf.path], timeout=60, capture_output=True)
    assert run.returncode == 3, run.stderr
    cf.close()
    run = subprocess.run([sys.executable, "-c", probe, cf.path], timeout=60, capture_output=True)
    assert run.returncode == 0, run.stderr


def test_load_and_save_need_the_lock(tmp_path):
    f = CacheFile(str(tmp_path / "x.ztc"))
    with pytest.raises(WrongStateError, match="not open"):
        f.load()
    with pytest.raises(RuntimeError, match="not open"):        # as before
        f.save(None, [])


# -- atomic saves -------------------------------------------------------------------------

OLD = (p64(1), [(p64(1), p64(1), None, b"old")])
NEW = (p64(2), [(p64(i), p64(2), None, b"new" * 1000) for i in range(1000)])


def test_failed_rename_keeps_the_old_file(cf, monkeypatch):
    cf.save(*OLD)

    def crash(src, dst):
        raise OSError("simulated crash before the rename")
    monkeypatch.setattr(cachefile.os, "replace", crash)
    with pytest.raises(OSError):
        cf.save(*NEW)
    monkeypatch.undo()
    assert cf.load() == OLD
    assert not os.path.exists(cf.path + ".tmp")


def test_write_failing_midway_keeps_the_old_file(cf, monkeypatch):
    cf.save(*OLD)

    class DiskFull:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, b):
            if self.written > 5000:
                raise OSError(28, "No space left on device")
            self.written += len(b)
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()
    monkeypatch.setattr(cachefile, "_CHUNK", 1024)
    real = CacheFile._open_temp
    monkeypatch.setattr(CacheFile, "_open_temp", lambda self: DiskFull(real(self)))
    with pytest.raises(OSError):
        cf.save(*NEW)
    monkeypatch.undo()
    assert cf.load() == OLD
    assert not os.path.exists(cf.path + ".tmp")


def test_leftover_temp_file_from_a_crash_is_ignored_and_removed(tmp_path):
    path = str(tmp_path / "app-1.ztc")
    with CacheFile(path) as f:
        f.save(*OLD)
    with open(path + ".tmp", "wb") as tmp:          # a save killed mid-way
        tmp.write(MAGIC + b"\0\1 half a file")
    with CacheFile(path) as f:
        assert not os.path.exists(path + ".tmp")
        assert f.load() == OLD


# -- ClientCache.snapshot / restore -------------------------------------------------------

def test_restore_keeps_the_most_recently_used_within_the_size_limit():
    big = ClientCache(size=30_000)                       # more than half full: hits reorder
    for i in range(100):
        big.store(p64(i), p64(1), None, b"x" * 80)
    big.invalidate(p64(99), p64(2))
    big.store(p64(99), p64(2), None, b"y" * 80)      # 99: a current and a non-current revision
    big.load(p64(0))                                  # 0 becomes the most recently used
    last_tid, entries = big.snapshot()
    assert len(entries) == 101 and entries[-1][0] == p64(0)

    small = ClientCache(size=10 * (80 + ENTRY_OVERHEAD))
    small.restore(p64(7), entries)
    assert small.snapshot() == (p64(7), entries[-10:])
    assert small.stats()["bytes"] == 10 * (80 + ENTRY_OVERHEAD)
    assert small.load(p64(0)) == (b"x" * 80, p64(1))
    assert small.loadBefore(p64(99), p64(2)) == (b"x" * 80, p64(1), p64(2))
    assert small.load(p64(99)) == (b"y" * 80, p64(2))
    assert small.load(p64(5)) is None
    small.store(p64(200), p64(3), None, b"z" * 80)   # accounting still right: one eviction
    assert len(small) == 10 and small.stats()["evictions"] == 1


def test_restore_replaces_contents_and_skips_duplicates():
    c = ClientCache()
    c.store(p64(9), p64(1), None, b"gone")
    rev = (p64(1), p64(2), None, b"a")
    c.restore(None, [(p64(1), p64(1), None, b"older current"), rev, rev])
    assert c.snapshot() == (None, [rev])
    assert c.stats()["bytes"] == 1 + ENTRY_OVERHEAD


def test_missing_var_folder_is_created(tmp_path):
    """As ZEO's ``var``: the folder of the cache file is made when missing."""
    from zeotwist.client.cachefile import CacheFile
    path = tmp_path / "var" / "cache" / "web1-1.ztc"
    with CacheFile(str(path)) as f:
        f.save(b"\0" * 8, [])
    assert path.exists()
