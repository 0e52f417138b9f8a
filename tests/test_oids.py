"""Oids stay unique across a server crash (oid reservation file)."""
import os

from ZODB.FileStorage import FileStorage
from ZODB.utils import u64
from twisted.internet.task import Clock

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
