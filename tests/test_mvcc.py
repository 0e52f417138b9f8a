"""PerThreadStorage: one IMVCC storage instance per thread, new snapshots
after every announced transaction, idle transactions ended; pure logic
with a fake storage (no database)."""
import threading

import pytest
import zope.interface
from ZODB.interfaces import IMVCCStorage, IStorageUndoable
from ZODB.POSException import StorageError

from zeotwist.server.mvcc import PerThreadStorage


@zope.interface.implementer(IMVCCStorage, IStorageUndoable)
class FakeRoot:
    def __init__(self):
        self.made, self.closed = [], False

    def new_instance(self):
        self.made.append(FakeInstance())
        return self.made[-1]

    def loadBefore(self, oid, tid):
        raise AssertionError("the root itself is never used")

    tpc_begin = tpc_finish = tpc_abort = undoLog = loadBefore

    def close(self):
        self.closed = True


class FakeInstance:
    def __init__(self):
        self.calls, self.released = [], False

    def sync(self):
        self.calls.append("sync")

    def loadBefore(self, oid, tid):
        self.calls.append("loadBefore")
        return b"data", b"\0" * 8, None

    def tpc_begin(self, txn):
        self.calls.append("tpc_begin")
        if txn == "bad":
            raise ValueError("cannot begin")

    def tpc_finish(self, txn):
        self.calls.append("tpc_finish")

    def tpc_abort(self, txn):
        self.calls.append("tpc_abort")

    def release(self):
        self.released = True


def in_thread(f):
    """``f()`` in a new thread: its result, or its exception raised here."""
    out = []

    def run():
        try:
            out.append((True, f()))
        except Exception as e:
            out.append((False, e))
    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    ok, value = out[0]
    if not ok:
        raise value
    return value


def test_each_thread_its_own_instance_and_the_root_untouched():
    root = FakeRoot()
    storage = PerThreadStorage(root)
    assert IStorageUndoable.providedBy(storage) and hasattr(storage, "undoLog")
    assert not hasattr(storage, "restore")              # the root has none
    storage.loadBefore(b"o", b"t")
    storage.loadBefore(b"o", b"t")
    in_thread(lambda: storage.loadBefore(b"o", b"t"))
    assert len(root.made) == storage.instances() == 2
    assert root.made[0].calls == ["loadBefore", "loadBefore"]
    storage.close()
    assert all(i.released for i in root.made) and root.closed
    with pytest.raises(StorageError, match="closed"):    # no new instance after close
        in_thread(lambda: storage.loadBefore(b"o", b"t"))


def test_a_new_snapshot_after_advance_but_not_inside_a_commit():
    root = FakeRoot()
    storage = PerThreadStorage(root)
    storage.loadBefore(b"o", b"t")
    storage.tpc_begin("txn")
    storage.advance()
    storage.loadBefore(b"o", b"t")              # committing: no sync in between
    storage.tpc_finish("txn")
    storage.loadBefore(b"o", b"t")              # now it syncs first
    assert root.made[0].calls == ["loadBefore", "tpc_begin", "loadBefore", "tpc_finish",
                                  "sync", "loadBefore"]


def test_sweep_ends_idle_transactions_only():
    root = FakeRoot()
    storage = PerThreadStorage(root)
    storage.tpc_begin("txn")
    assert storage.sweep() == 0                 # committing: left alone
    storage.tpc_abort("txn")
    assert storage.sweep() == 1 and root.made[0].calls[-1] == "sync"
    with pytest.raises(ValueError):
        storage.tpc_begin("bad")                # a failed begin is no transaction
    assert storage.sweep() == 1


def test_translated_errors():
    root = FakeRoot()
    storage = PerThreadStorage(root, translate=lambda e, name: KeyError(name)
                               if isinstance(e, ValueError) else None)
    with pytest.raises(KeyError, match="tpc_begin"):
        storage.tpc_begin("bad")


def test_read_conflicts_are_counted():
    root = FakeRoot()
    storage = PerThreadStorage(root, translate=lambda e, name: KeyError(name))
    root.new_instance = lambda: BrokenInstance()
    with pytest.raises(KeyError):
        storage.loadBefore(b"o", b"t")
    with pytest.raises(KeyError):
        storage.tpc_begin("txn")                # a commit's: counted by the vote
    assert storage.read_conflicts == 1


class BrokenInstance(FakeInstance):
    def loadBefore(self, oid, tid):
        raise ValueError("stale")

    def tpc_begin(self, txn):
        raise ValueError("stale")
