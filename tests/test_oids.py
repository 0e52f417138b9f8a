"""Oids stay unique across a server crash (oid reservation file), and a
batch is allocated at once (allocate)."""
import os

import pytest
from ZODB.FileStorage import FileStorage
from ZODB.POSException import ReadOnlyError
from ZODB.utils import p64, u64
from twisted.internet.task import Clock

from zeotwist.server.oids import allocate
from zeotwist.testing import memory_server


def test_oids_handed_out_are_not_reused_after_a_crash(tmp_path):
    path = str(tmp_path / "data.fs")
    server = memory_server(FileStorage(path), Clock())
    handed = server.new_oids(100)             # given to a client, never committed
    assert os.path.exists(path + ".oids")
    # crash: nothing closed cleanly; a new server opens the same file
    server.storage._lock_file.close()
    again = memory_server(FileStorage(path), Clock())
    try:
        fresh = again.new_oids(100)
        assert min(u64(o) for o in fresh) > max(u64(o) for o in handed)
    finally:
        again.close()


def test_reservation_is_written_ahead_not_per_oid(tmp_path):
    path = str(tmp_path / "data.fs")
    server = memory_server(FileStorage(path), Clock())
    try:
        server.new_oids(1)
        first = os.stat(path + ".oids").st_mtime_ns
        for _ in range(50):
            server.new_oids(100)             # 5,000 oids: within the reserved step
        assert os.stat(path + ".oids").st_mtime_ns == first
    finally:
        server.close()


def test_read_only_server_keeps_no_reservation(tmp_path):
    path = str(tmp_path / "data.fs")
    FileStorage(path).close()
    server = memory_server(FileStorage(path, read_only=True), Clock())
    try:
        assert not os.path.exists(path + ".oids")
    finally:
        server.close()


def _filestorage_at(path, counter=None):
    s = FileStorage(str(path))
    if counter is not None:
        s._oid = p64(counter)
    return s


def test_a_batch_is_what_new_oid_would_have_handed_out(tmp_path):
    """allocate() moves a BaseStorage's counter at once: the same oids,
    across a carry out of the last byte, and the counter where new_oid
    leaves it."""
    one, many = _filestorage_at(tmp_path / "a.fs", 0x1f0), _filestorage_at(tmp_path / "b.fs", 0x1f0)
    try:
        assert allocate(many, 300) == [one.new_oid() for _ in range(300)]
        assert many.new_oid() == one.new_oid()
    finally:
        one.close()
        many.close()


def test_a_batch_is_taken_under_the_storage_lock(tmp_path):
    """A store of a higher oid (set_max_oid, under the same lock) moves
    the counter: the next batch starts past it."""
    s = _filestorage_at(tmp_path / "a.fs", 10)
    try:
        s.set_max_oid(p64(500))
        assert allocate(s, 2) == [p64(501), p64(502)]
    finally:
        s.close()


def test_a_storage_with_its_own_new_oid_is_asked_oid_by_oid():
    class Counter:
        def __init__(self):
            self.calls = 0

        def new_oid(self):
            self.calls += 1
            return p64(self.calls)

    class Proxy:                    # new_oid found through __getattr__ (a wrapper)
        def __init__(self, base):
            self._base = base

        def __getattr__(self, name):
            return getattr(self._base, name)

    c = Counter()
    assert allocate(c, 3) == [p64(1), p64(2), p64(3)] and c.calls == 3
    assert allocate(Proxy(c), 2) == [p64(4), p64(5)] and c.calls == 5


def test_a_batch_past_the_last_oid_hands_out_nothing(tmp_path):
    s = _filestorage_at(tmp_path / "a.fs", 2**64 - 3)
    try:
        with pytest.raises(OverflowError):
            allocate(s, 3)
        assert allocate(s, 2) == [p64(2**64 - 2), p64(2**64 - 1)]
    finally:
        s.close()


def test_a_read_only_storage_refuses_a_batch(tmp_path):
    path = str(tmp_path / "data.fs")
    FileStorage(path).close()
    s = FileStorage(path, read_only=True)
    try:
        with pytest.raises(ReadOnlyError):
            allocate(s, 1)
    finally:
        s.close()
