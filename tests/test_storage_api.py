"""The full storage API through a live zeotwist server: history, undo, pack,
iteration, restore, deleteObject, prefetch.

ZODB's conformance mixins (history, undo, pack, iterator, recovery) run
against a real server on 127.0.0.1 exactly as tests/test_conformance.py
runs the basic ones (and with its base class); then zeotwist's own checks:
a database copied into and out of a server with zodbconvert and compared
record by record, server-side iterators released on disconnect, abandon and
overflow, undo, restore, deleteObject, prefetch, and a transaction
extension the server must never unpickle.  zeotwist's own pack checks are
tests/test_pack.py.
"""
import gc
import os
import pickle
import time

import pytest
import transaction
import ZODB
from ZODB.Connection import TransactionMetaData
from ZODB.FileStorage import FileStorage
from ZODB.POSException import (
    ConflictError, POSKeyError, StorageError, StorageTransactionError)
from ZODB.tests import (
    HistoryStorage, IteratorStorage, PackableStorage, RecoveryStorage,
    TransactionalUndoStorage)
from ZODB.tests.MinPO import MinPO
from ZODB.tests.StorageTestBase import zodb_pickle, zodb_unpickle
from ZODB.utils import p64, u64, z64

from test_conformance import ZeotwistStorageTestBase, _collect_check_methods
from zeotwist import ClientStorage
from zeotwist.client.reactorthread import background_reactor, blocking_call
from zeotwist.errors import RemoteProtocolError
from zeotwist.server import storageapi
from zeotwist.testing import start_server, start_storages
from zeotwist.wire import commands as C
from zeotwist.wire.arguments import BoxList, Id8, split_boxes


# -- ZODB's conformance mixins --------------------------------------------------

@_collect_check_methods
class HistoryStorageTests(ZeotwistStorageTestBase, HistoryStorage.HistoryStorage):
    pass


@_collect_check_methods
class TransactionalUndoStorageTests(ZeotwistStorageTestBase,
                                    TransactionalUndoStorage.TransactionalUndoStorage):
    pass


@_collect_check_methods
class PackableStorageTests(ZeotwistStorageTestBase,
                           PackableStorage.PackableStorageWithOptionalGC,
                           PackableStorage.PackableUndoStorage):
    pass


@_collect_check_methods
class IteratorStorageTests(ZeotwistStorageTestBase, IteratorStorage.IteratorStorage,
                           IteratorStorage.ExtendedIteratorStorage):
    use_extension_bytes = True     # extensions travel as stored, never re-pickled


@_collect_check_methods
class RecoveryStorageTests(ZeotwistStorageTestBase, RecoveryStorage.RecoveryStorage):
    """Source and destination are both zeotwist servers: iteration out of
    one, restore into the other."""

    def setUp(self):
        super().setUp()
        tmp = os.path.dirname(self._server.server.storage._file_name)
        self._dst_server = start_server(os.path.join(tmp, "dst.fs"),
                                        reactor=background_reactor())
        self.addCleanup(self._dst_server.stop)
        self._dst = ClientStorage(self._dst_server.address, reactor=background_reactor(),
                                  wait_timeout=self.wait_timeout)
        self._clients.append(self._dst)


def test_every_storage_api_mixin_test_is_collected():
    import unittest
    for cls in (HistoryStorageTests, TransactionalUndoStorageTests, PackableStorageTests,
                IteratorStorageTests, RecoveryStorageTests):
        names = unittest.TestLoader().getTestCaseNames(cls)
        assert names, cls
    assert "testPackAllRevisionsNoGC" in dir(PackableStorageTests)
    assert "testExtendedIteration" in dir(IteratorStorageTests)


# -- fixtures -------------------------------------------------------------------------

def _commit(db, **values):
    conn = db.open()
    try:
        for key, value in values.items():
            conn.root()[key] = value
        transaction.commit()
    finally:
        conn.close()


def _server_call(running, f, *args):
    """Run ``f(*args)`` on the server's reactor thread (session state lives there)."""
    return blocking_call(running.reactor, lambda: f(*args), timeout=10)


def _sessions(running):
    return _server_call(running, lambda: list(running.server.sessions))


def _wait_for(condition, what, timeout=10.0):
    """Wait (bounded) until ``condition()`` holds on the server's reactor thread."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError("timed out waiting for " + what)


def _records(storage):
    """Every transaction of ``storage`` with its records, for comparison."""
    out = []
    it = storage.iterator()
    try:
        for txn in it:
            out.append((txn.tid, txn.status, txn.user, txn.description, txn.extension_bytes,
                        [(r.oid, r.tid, r.data, r.data_txn) for r in txn]))
    finally:
        if hasattr(it, "close"):
            it.close()
    return out


def _populate(path):
    """A FileStorage with a little history: commits, an extension, an undo."""
    db = ZODB.DB(FileStorage(path))
    try:
        for i in range(5):
            t = transaction.get()
            t.note("commit %d" % i)
            t.setUser("user%d" % i)
            t.setExtendedInfo("n", i)
            conn = db.open()
            conn.root()["value"] = MinPO(i)
            conn.root()["list%d" % i] = PersistentListOf(i)
            transaction.commit()
            conn.close()
        db.undo(db.undoLog(0, 1)[0]["id"])
        transaction.commit()
    finally:
        db.close()


def PersistentListOf(n):
    from persistent.list import PersistentList
    return PersistentList(range(n))


# -- zodbconvert into and out of a server ---------------------------------------------

def test_zodbconvert_copies_into_and_out_of_a_server(tmp_path, monkeypatch):
    zodbconvert = pytest.importorskip(
        "relstorage.zodbconvert", reason="zodbconvert (RelStorage's script) is not installed")
    import zeotwist.config
    monkeypatch.setattr(zeotwist.config, "reactor", background_reactor())
    source = str(tmp_path / "source.fs")
    _populate(source)
    running = start_server(str(tmp_path / "served.fs"))
    try:
        host, port = running.address
        # zodbconvert's file: two storage sections named source and destination
        client = ("<zeotwistclient %%s>\n  server %s:%d\n  wait-timeout 10\n"
                  "</zeotwistclient>\n" % (host, port))
        into = tmp_path / "into.conf"
        into.write_text("%%import zeotwist\n<filestorage source>\n  path %s\n</filestorage>\n%s"
                        % (source, client % "destination"))
        copy = str(tmp_path / "copy.fs")
        out = tmp_path / "out.conf"
        out.write_text("%%import zeotwist\n%s<filestorage destination>\n  path %s\n"
                       "</filestorage>\n" % (client % "source", copy))
        zodbconvert.main(["zodbconvert", str(into)])
        zodbconvert.main(["zodbconvert", str(out)])

        original = FileStorage(source, read_only=True)
        copied = FileStorage(copy, read_only=True)
        served = ClientStorage(running.address, reactor=background_reactor(), wait_timeout=10)
        try:
            expected = _records(original)
            assert len(expected) == 7          # root creation, 5 commits, the undo
            assert any(r[3] is not None for t in expected for r in t[5])   # undo backpointers
            assert _records(served) == expected
            assert _records(copied) == expected
            assert served.lastTransaction() == original.lastTransaction()
        finally:
            served.close()
            original.close()
            copied.close()
    finally:
        running.stop()


def test_copy_transactions_from_a_zeotwist_config(tmp_path, monkeypatch):
    """The same copy through ZODB.config and copyTransactionsFrom alone."""
    import ZODB.config
    import zeotwist.config
    monkeypatch.setattr(zeotwist.config, "reactor", background_reactor())
    source = str(tmp_path / "source.fs")
    _populate(source)
    running = start_server(str(tmp_path / "served.fs"))
    try:
        host, port = running.address
        dest = ZODB.config.storageFromString(
            "%%import zeotwist\n<zeotwistclient>\n  server %s:%d\n</zeotwistclient>\n"
            % (host, port))
        original = FileStorage(source, read_only=True)
        try:
            dest.copyTransactionsFrom(original)
            assert _records(dest) == _records(original)
            # the copied database works as a database
            db = ZODB.DB(dest)
            conn = db.open()
            assert conn.root()["list3"] == list(range(3))
            assert "list4" not in conn.root()          # its commit was undone
            conn.close()
            db.close()
        finally:
            original.close()
    finally:
        running.stop()


# -- iterators on the server ------------------------------------------------------------

@pytest.fixture
def small_batches(monkeypatch):
    """Iterator batches of 2 items, so a server iterator stays open mid-way."""
    monkeypatch.setattr(storageapi, "ITERATOR_BATCH_ITEMS", 2)


def _store_transactions(cs, n):
    tids = []
    for i in range(n):
        t = TransactionMetaData()
        cs.tpc_begin(t)
        cs.store(cs.new_oid(), z64, zodb_pickle(MinPO(i)), "", t)
        cs.tpc_vote(t)
        tids.append(cs.tpc_finish(t))
    return tids


def _open_iterators(session):
    return dict(session._iterators or {})


def test_iterator_released_when_the_client_disconnects(server, make_client, small_batches):
    cs = make_client()
    _store_transactions(cs, 4)
    it = cs.iterator()
    next(it)                                   # the server is part way through
    session, = _sessions(server)
    opened = _server_call(server, _open_iterators, session)
    assert len(opened) == 1
    source = next(iter(opened.values())).source
    assert source._file is not None           # FileIterator holds the file open
    cs.close()
    _wait_for(lambda: _server_call(server, lambda: not session._iterators
                                   and session.transport is None),
              "the session to drop its iterators")
    assert source._file is None                # ... and closed it


def test_iterator_released_when_abandoned_or_closed(server, make_client, small_batches):
    cs = make_client()
    _store_transactions(cs, 4)
    session, = _sessions(server)
    it = cs.iterator()
    next(it)
    assert len(_server_call(server, _open_iterators, session)) == 1
    del it
    gc.collect()
    cs.sync()
    cs._call(cs.client.ping)                   # the one-way close arrived before this
    assert _server_call(server, _open_iterators, session) == {}

    it = cs.iterator()
    next(it)
    it.close()
    cs._call(cs.client.ping)
    assert _server_call(server, _open_iterators, session) == {}
    with pytest.raises(StopIteration):
        next(it)

    assert len(list(cs.iterator())) == 4       # run to the end: released by the server
    assert _server_call(server, _open_iterators, session) == {}


def test_open_iterators_per_session_are_bounded(server, make_client):
    cs = make_client()
    _store_transactions(cs, 2)
    session, = _sessions(server)
    iterators = [cs.iterator() for _ in range(storageapi.MAX_ITERATORS + 3)]
    assert len(_server_call(server, _open_iterators, session)) == storageapi.MAX_ITERATORS
    with pytest.raises(StorageError, match="expired"):
        next(iterators[0])                     # the least recently used was closed
    assert [t.tid for t in iterators[-1]] == [t.tid for t in cs.iterator()]


def test_iterator_keeps_a_transaction_split_over_batches_whole(server, make_client,
                                                               small_batches):
    cs = make_client()
    t = TransactionMetaData(extension={"big": True})
    cs.tpc_begin(t)
    oids = [cs.new_oid() for _ in range(7)]
    for i, oid in enumerate(oids):
        cs.store(oid, z64, zodb_pickle(MinPO(i)), "", t)
    cs.tpc_vote(t)
    tid = cs.tpc_finish(t)
    txn, = list(cs.iterator())
    assert txn.tid == tid and txn.extension == {"big": True}
    assert [r.oid for r in txn] == oids
    assert [zodb_unpickle(r.data) for r in txn] == [MinPO(i) for i in range(7)]


def test_record_iternext_walks_every_current_object(server, make_client):
    cs = make_client()
    db = ZODB.DB(cs)
    _commit(db, a=MinPO(1), b=MinPO(2))
    _commit(db, a=MinPO(3))
    seen, next_oid = {}, None
    while True:
        oid, tid, data, next_oid = cs.record_iternext(next_oid)
        seen[oid] = (tid, data)
        if next_oid is None:
            break
    fs = server.server.storage
    assert set(seen) == set(fs._index.keys())
    for oid, (tid, data) in seen.items():
        assert fs.load(oid) == (data, tid)
    db.close()


# -- undo, restore, deleteObject ----------------------------------------------------------

def test_undo_invalidates_other_clients(server, make_client):
    db1, db2 = ZODB.DB(make_client()), ZODB.DB(make_client())
    try:
        _commit(db1, x=MinPO(1))
        _commit(db1, x=MinPO(2))
        c2 = db2.open()
        assert c2.root()["x"].value == 2
        c2.close()
        db1.undo(db1.undoLog(0, 1)[0]["id"])
        transaction.commit()
        c1 = db1.open()
        assert c1.root()["x"].value == 1       # the undoing client's own cache
        c1.close()
        db2.storage.sync()
        db2.storage._call(db2.storage.client.ping)
        c2 = db2.open()
        assert c2.root()["x"].value == 1       # the other client was invalidated
        c2.close()
    finally:
        db1.close()
        db2.close()


def test_undo_log_paging_and_client_side_filter(server, make_client):
    cs = make_client()
    db = ZODB.DB(cs)
    for i in range(30):
        t = transaction.get()
        t.setExtendedInfo("even", i % 2 == 0)
        _commit(db, x=i)
    fs = server.server.storage
    assert cs.undoLog(0, 100) == fs.undoLog(0, 100)
    assert cs.undoLog(5, -7) == fs.undoLog(5, -7)
    assert cs.undoInfo(2, 6, {"even": True}) == fs.undoInfo(2, 6, {"even": True})
    assert cs.undoLog(1, 4, lambda d: d.get("even") is False) == \
        fs.undoLog(1, 4, lambda d: d.get("even") is False)
    oid = z64
    assert cs.history(oid, 5) == fs.history(oid, 5)
    db.close()


def test_restore_needs_a_later_tid(server, make_client):
    cs = make_client()
    (last,) = _store_transactions(cs, 1)
    t = TransactionMetaData()
    cs.tpc_begin(t, last, " ")
    cs.restore(cs.new_oid(), last, zodb_pickle(MinPO(1)), "", None, t)
    with pytest.raises(StorageTransactionError, match="not later"):
        cs.tpc_vote(t)
    cs.tpc_abort(t)
    later = p64(u64(last) + 1)
    t = TransactionMetaData()
    cs.tpc_begin(t, later, "p")
    oid = cs.new_oid()
    cs.restore(oid, later, zodb_pickle(MinPO(2)), "", None, t)
    cs.tpc_vote(t)
    assert cs.tpc_finish(t) == later
    assert cs.load(oid) == (zodb_pickle(MinPO(2)), later)
    assert list(cs.iterator(later))[0].status == "p"


def test_delete_object(server, make_client):
    cs, other = make_client(), make_client()
    oid = cs.new_oid()
    t = TransactionMetaData()
    cs.tpc_begin(t)
    cs.store(oid, z64, zodb_pickle(MinPO(0)), "", t)
    cs.tpc_vote(t)
    created = cs.tpc_finish(t)
    assert other.load(oid)[1] == created         # cached by the other client
    t = TransactionMetaData()
    cs.tpc_begin(t)
    cs.deleteObject(oid, p64(1), t)              # not the current serial
    with pytest.raises(ConflictError):
        cs.tpc_vote(t)
    cs.tpc_abort(t)
    t = TransactionMetaData()
    cs.tpc_begin(t)
    cs.deleteObject(oid, created, t)
    cs.tpc_vote(t)
    deleted = cs.tpc_finish(t)
    with pytest.raises(POSKeyError):
        cs.load(oid)
    other._call(other.client.ping)
    with pytest.raises(POSKeyError):
        other.load(oid)
    assert other.loadBefore(oid, deleted)[:2] == (zodb_pickle(MinPO(0)), created)


# -- prefetch -------------------------------------------------------------------------------

def test_prefetch_loads_many_objects_in_one_round_trip(server, make_client):
    writer = make_client()
    db = ZODB.DB(writer)
    _commit(db, **{"o%d" % i: MinPO(i) for i in range(50)})
    conn = db.open()
    oids = [conn.root()["o%d" % i]._p_oid for i in range(50)]
    conn.close()
    db.close()

    reader = make_client()
    tid = p64(u64(reader.lastTransaction()) + 1)
    stats = server.server.stats
    before = stats["loads"]
    reader.prefetch(oids, tid)
    fs = server.server.storage
    for oid in oids:                           # waits for the prefetch, asks nothing more
        data, start, end = reader.loadBefore(oid, tid)
        assert (data, start) == fs.load(oid) and end is None
    assert stats["loads"] - before == len(oids)
    reader.prefetch(oids, tid)                 # all cached: nothing is sent
    reader._call(reader.client.ping)
    assert stats["loads"] - before == len(oids)


def test_connection_prefetch_fills_the_cache(server, make_client):
    db = ZODB.DB(make_client())
    _commit(db, **{"o%d" % i: MinPO(i) for i in range(20)})
    db.close()
    reader = make_client()
    db = ZODB.DB(reader)
    try:
        conn = db.open()
        root = conn.root()
        objs = [root["o%d" % i] for i in range(20)]     # ghosts
        conn.prefetch(objs)
        reader._call(reader.client.ping)
        assert all(reader.client.cache.loadBefore(o._p_oid, conn._storage._start)
                   for o in objs)
        conn.close()
    finally:
        db.close()


# -- the server never unpickles a client's transaction extension ------------------------------

#: unpickling the extension below appends here
UNPICKLED = []


def _record_unpickling():
    UNPICKLED.append(True)
    return {}


def test_server_never_unpickles_the_extension(server, make_client):
    import pickle

    class Boom:
        def __reduce__(self):
            return (_record_unpickling, ())
    evil = pickle.dumps(Boom(), 3)
    del UNPICKLED[:]
    cs = make_client()
    t = TransactionMetaData(b"mallory", b"evil", evil)
    cs.tpc_begin(t)
    oid = cs.new_oid()
    cs.store(oid, z64, zodb_pickle(MinPO(1)), "", t)
    cs.tpc_vote(t)
    cs.tpc_finish(t)
    client = cs.client
    log = blocking_call(client.reactor, client.call, C.UndoLog, first=0, last=5, timeout=10)
    assert log["entries"][0]["extension"] == evil
    history = blocking_call(client.reactor, client.call, C.History, oid=oid, size=1,
                            timeout=10)
    assert history["entries"][0]["extension"] == evil
    txn = [t for t in cs.iterator()][-1]
    assert txn.extension_bytes == evil
    assert UNPICKLED == []
    server.server.storage.undoLog(0, 5)        # ZODB's own undoLog runs it
    assert UNPICKLED == [True]


# -- the wire --------------------------------------------------------------------------------

def test_box_list_round_trip_and_malformed_input():
    arg = BoxList([(b"tid", Id8()), (b"n", C.amp.Integer(optional=True))])
    strings = {}
    arg.toBox(b"items", strings, {"items": [dict(tid=b"x" * 8, n=1), dict(tid=b"y" * 8)]},
              None)
    objects = {}
    arg.fromBox(b"items", dict(strings), objects, None)
    assert objects["items"] == [dict(tid=b"x" * 8, n=1), dict(tid=b"y" * 8, n=None)]
    for bad in (b"\x00", b"\x00\x03tid\x00\x08", b"\x00\x03tid\x00\x01x"):
        with pytest.raises(RemoteProtocolError):
            split_boxes(bad)
    with pytest.raises(RemoteProtocolError):
        arg.fromBox(b"items", {b"items": b"\x00\x03tid\x00\x01x\x00\x00"}, {}, None)


@pytest.mark.parametrize("kind", ["mapping", "demo"])
def test_iterator_over_in_memory_storages_sends_extensions(kind):
    """A MappingStorage's (and a DemoStorage's) transaction records have an
    ``extension`` mapping but no ``extension_bytes``: the server pickles the
    mapping (plain data, decoded at vote) so IteratorNext works for them too."""
    from ZODB.DemoStorage import DemoStorage
    from ZODB.MappingStorage import MappingStorage
    storage = MappingStorage() if kind == "mapping" else DemoStorage()
    running = start_storages({"1": storage})
    cs = ClientStorage(running.address, reactor=background_reactor(), wait_timeout=10)
    db = ZODB.DB(cs)
    try:
        txn = transaction.get()
        txn.note("with an extension")
        txn.setExtendedInfo("who", "tester")
        _commit(db, a=1)
        records = _records(cs)
        assert len(records) == 2        # the root's creation, then ours
        tid, status, user, description, ext, recs = records[-1]
        assert description == b"with an extension"
        assert pickle.loads(ext) == {"who": "tester"}
        assert [r[0] for r in recs] == [z64]
    finally:
        db.close()
        running.stop()
