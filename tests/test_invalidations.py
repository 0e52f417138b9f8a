"""The server's recent-invalidations queue (pure logic + a real FileStorage)."""
import transaction
from ZODB import DB
from ZODB.FileStorage import FileStorage
from ZODB.utils import p64, z64

from zeotwist.server.invalidations import RecentInvalidations


def test_since_unions_later_transactions():
    q = RecentInvalidations(10)
    q.append(p64(1), [b"a"])
    q.append(p64(2), [b"b", b"c"])
    q.append(p64(3), [b"a", b"d"])
    assert q.since(p64(3)) == set()
    assert q.since(p64(2)) == {b"a", b"d"}
    assert q.since(p64(1)) == {b"a", b"b", b"c", b"d"}
    assert q.since(z64) == {b"a", b"b", b"c", b"d"}


def test_too_far_behind_is_none():
    q = RecentInvalidations(2)
    for i in range(1, 6):
        q.append(p64(i), [p64(100 + i)])
    assert len(q) == 2
    assert q.since(p64(3)) == {p64(104), p64(105)}      # 4 and 5 are both kept
    assert q.since(p64(2)) is None                       # 3 fell out of the queue


def test_zero_size_queue_never_verifies_the_past():
    q = RecentInvalidations(0)
    q.append(p64(1), [b"a"])
    assert q.since(z64) is None
    assert q.since(p64(1)) == set()


def _commit_n(path, n):
    db = DB(FileStorage(path))
    conn = db.open()
    oids = []
    for i in range(n):
        conn.root()["k%d" % i] = i
        transaction.commit()
        oids.append(conn.root()._p_oid)
    tids = [t.tid for t in db.storage.iterator()]
    db.close()
    return tids


def test_rebuilt_from_storage_after_restart(tmp_path):
    path = str(tmp_path / "data.fs")
    tids = _commit_n(path, 6)            # 1 root-creation transaction + 6 commits
    fs = FileStorage(path, read_only=True)
    try:
        q = RecentInvalidations(3)
        q.fill_from(fs, fs.lastTransaction())
        assert len(q) == 3
        assert q.since(tids[-4]) == {z64}                # the root changed in each
        assert q.since(tids[-5]) is None
        whole = RecentInvalidations(100)
        whole.fill_from(fs, fs.lastTransaction())
        assert whole.since(z64) == {z64}                 # whole history covered
    finally:
        fs.close()
