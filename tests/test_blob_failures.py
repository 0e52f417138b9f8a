"""Blob transfers that fail half-way, against a live server (a FileStorage
with a blob directory in a temp dir, the client's blob cache in another).

* The connection is lost during a blob store (the server cuts it after
  spooling the first piece; the client cuts it inside a piece's frame):
  the vote fails with ClientDisconnected, the server keeps no spool file
  and commits nothing, the client's cache keeps no partial file, and what
  was committed before is still there after the reconnection.
* The connection is lost during a blob load (the server cuts it after the
  first piece): loadBlob fails with ClientDisconnected and leaves no partial
  (``.dl``) file in the cache; loading it again after the reconnection works.
* A short or inconsistent piece from the server is refused with a
  StorageError, not written as the blob.
* The loading thread asks for a blob's first piece itself: a one-piece
  blob needs no reactor-driven download, a bigger one continues in one.

The in-process server and the blocking ClientStorage share the background
reactor (docs/testing.md), so the server-side hooks below run on the
reactor thread, inside the server's handling of the client's messages.
"""
import os
import time

import pytest
import ZODB
from ZODB.Connection import TransactionMetaData
from ZODB.POSException import StorageError

from zeotwist import ClientStorage
from zeotwist.client.reactorthread import background_reactor, blocking_call
from zeotwist.errors import ClientDisconnected
from zeotwist.server import blobs as server_blobs
from zeotwist.testing import start_server
from zeotwist.wire import commitframes

from test_blobs import blob_refs, commit_blobs

MB = 2**20
KEPT = b"committed before " * 70_000          # about 1.2 MB: two pieces
BIG = os.urandom(MB) * 8                      # eight 1 MiB pieces


@pytest.fixture
def world(tmp_path):
    """``(server, storage, db)``: a live server, a client with a blob cache."""
    srv = start_server(str(tmp_path / "data.fs"), blob_dir=str(tmp_path / "blobs"))
    cs = ClientStorage(srv.address, blob_dir=str(tmp_path / "cache"), wait_timeout=10,
                       timeout=10, reactor=background_reactor())
    db = ZODB.DB(cs)
    try:
        yield srv, cs, db
    finally:
        db.close()
        srv.stop()


def contents(db, cs) -> dict:
    """``{key: bytes}`` of the root's blobs, loaded through ``cs``."""
    out = {}
    for key, (oid, serial) in blob_refs(db).items():
        with open(cs.loadBlob(oid, serial), "rb") as f:
            out[key] = f.read()
    return out


def partial_files(tmp_path) -> list:
    """The files in the client's blob cache that are neither committed
    blobs (``*.blob``) nor its bookkeeping (``.lock``, ``.layout``)."""
    found = []
    for top, _, names in os.walk(str(tmp_path / "cache")):
        found += [os.path.relpath(os.path.join(top, n), str(tmp_path / "cache"))
                  for n in names if not (n.startswith(".") or n.endswith(".blob"))]
    return sorted(found)


def cached_blobs(tmp_path) -> int:
    return sum(n.endswith(".blob") for _, _, names in os.walk(str(tmp_path / "cache"))
               for n in names)


def spool_files(tmp_path) -> list:
    return sorted(os.listdir(str(tmp_path / "blobs" / "tmp")))


def cut_server_side(srv) -> None:
    """Abort every session's connection (on the reactor thread)."""
    for session in list(srv.server.sessions):
        session.transport.abortConnection()


def reconnected(cs, srv) -> None:
    deadline = time.monotonic() + 10
    while not (cs.is_connected() and srv.server.sessions):
        assert time.monotonic() < deadline, "no reconnection"
        time.sleep(0.01)          # polling a real condition, bounded above


def test_connection_lost_by_the_server_during_a_blob_store(world, tmp_path, monkeypatch):
    srv, cs, db = world
    commit_blobs(db, {"kept": KEPT})
    last = cs.lastTransaction()
    spooled = []
    append = server_blobs.BlobSpool.append

    def append_then_cut(spool, blob, data):
        append(spool, blob, data)
        spooled.append(len(data))
        if len(spooled) == 1:               # the first piece is on the server's disk
            assert spool_files(tmp_path)
            cut_server_side(srv)

    monkeypatch.setattr(server_blobs.BlobSpool, "append", append_then_cut)
    with pytest.raises(ClientDisconnected):
        commit_blobs(db, {"lost": BIG})
    monkeypatch.undo()
    assert spooled and sum(spooled) < len(BIG)      # cut mid-blob
    assert spool_files(tmp_path) == []              # the spool is removed
    assert partial_files(tmp_path) == []            # no partial blob in the cache
    assert cached_blobs(tmp_path) == 1              # only the committed one
    reconnected(cs, srv)
    assert srv.server.storage.lastTransaction() == last     # nothing committed
    assert contents(db, cs) == {"kept": KEPT}                    # nothing lost
    commit_blobs(db, {"again": b"the connection works"})
    assert contents(db, cs)["again"] == b"the connection works"


def test_a_piece_cut_short_by_the_client_is_never_stored(world, tmp_path):
    """The client's connection ends inside a StoreBlobChunk frame (after a
    whole first piece): the server spools only whole pieces, and removes
    the spool when the transaction dies with the connection."""
    srv, cs, db = world
    commit_blobs(db, {"kept": KEPT})
    last = cs.lastTransaction()
    meta = TransactionMetaData()
    cs.tpc_begin(meta)
    txn = cs._check_trans(meta, "test")

    def send_and_cut():
        txn._send(b"")                       # TpcBegin goes out first
        proto = txn._proto
        whole = commitframes.store_blob_chunk(0, b"a" * MB, proto.long_values)
        second = commitframes.store_blob_chunk(0, b"b" * MB, proto.long_values)
        proto.transport.write(whole + second[:len(second) // 2])
        proto.transport.loseConnection()     # after what was written has gone

    blocking_call(background_reactor(), send_and_cut)
    with pytest.raises(ClientDisconnected):
        cs.tpc_vote(meta)
    cs.tpc_abort(meta)
    reconnected(cs, srv)
    assert spool_files(tmp_path) == []
    assert srv.server.storage.lastTransaction() == last
    assert contents(db, cs) == {"kept": KEPT}


def test_connection_lost_during_a_blob_load(world, tmp_path, monkeypatch):
    srv, cs, db = world
    commit_blobs(db, {"big": BIG})
    oid, serial = blob_refs(db)["big"]
    cache = cs.blob_cache
    os.remove(cache.lookup(oid, serial))        # the writer's copy: load it afresh
    read = server_blobs.read_blob_chunk
    served = []

    def read_then_cut(storage, oid, serial, offset, length=None, as_file=False):
        if served == [0]:        # one piece went out already; before this one's
            srv.reactor.callFromThread(cut_server_side, srv)    # answer, or the next few
        served.append(offset)
        return read(storage, oid, serial, offset, length, as_file)

    monkeypatch.setattr(server_blobs, "read_blob_chunk", read_then_cut)
    with pytest.raises(ClientDisconnected):
        cs.loadBlob(oid, serial)
    monkeypatch.undo()
    assert 0 < len(served) < len(BIG) // MB
    assert cache.lookup(oid, serial) is None
    assert partial_files(tmp_path) == []          # no partial (.dl) file left
    reconnected(cs, srv)
    with open(cs.loadBlob(oid, serial), "rb") as f:
        assert f.read() == BIG


@pytest.mark.parametrize("fault", ["short last piece", "size changed"])
def test_a_bad_piece_from_the_server_is_refused(world, tmp_path, monkeypatch, fault):
    srv, cs, db = world
    commit_blobs(db, {"big": BIG})
    oid, serial = blob_refs(db)["big"]
    cache = cs.blob_cache
    os.remove(cache.lookup(oid, serial))
    read = server_blobs.read_blob_chunk

    def read_badly(storage, oid, serial, offset, length=None, as_file=False):
        got = read(storage, oid, serial, offset, length)       # bytes, to spoil
        if as_file:
            as_file()       # the FILE_PIECES slot taken for it: no piece holds it
        if offset + len(got["data"]) >= got["size"]:       # the last piece
            if fault == "short last piece":
                got["data"] = got["data"][:-1]
            else:
                got["size"] += 1
        return got

    monkeypatch.setattr(server_blobs, "read_blob_chunk", read_badly)
    with pytest.raises(StorageError, match="changed on the server while it was read"):
        cs.loadBlob(oid, serial)
    monkeypatch.undo()
    assert cache.lookup(oid, serial) is None
    assert partial_files(tmp_path) == []
    with open(cs.loadBlob(oid, serial), "rb") as f:     # the connection is fine
        assert f.read() == BIG


# -- the first piece asked by the loading thread (client/blobtransfer.first_piece_from_thread)

def test_a_one_piece_blob_loads_without_the_reactor_download(world, tmp_path, monkeypatch):
    """The loading thread asks for the first piece itself: a blob of one
    piece never goes through ``Client.fetch_blob``; a bigger one continues
    there from the piece received; a missing one raises POSKeyError."""
    from ZODB.POSException import POSKeyError
    from zeotwist.client.client import Client
    srv, cs, db = world
    commit_blobs(db, {"small": b"s" * 10_000, "big": BIG})
    refs = blob_refs(db)
    for key in refs:
        os.remove(cs.blob_cache.lookup(*refs[key]))
    fetched = []
    fetch = Client.fetch_blob

    def fetch_blob(client, oid, serial, f, idle_timeout=None, first=None):
        fetched.append((oid, None if first is None else len(first["data"])))
        return fetch(client, oid, serial, f, idle_timeout, first)

    monkeypatch.setattr(Client, "fetch_blob", fetch_blob)
    with open(cs.loadBlob(*refs["small"]), "rb") as f:
        assert f.read() == b"s" * 10_000
    with open(cs.loadBlob(*refs["big"]), "rb") as f:
        assert f.read() == BIG
    assert fetched == [(refs["big"][0], MB)]
    with pytest.raises(POSKeyError):
        cs.loadBlob(refs["small"][0], b"\0" * 7 + b"\1")
    assert partial_files(tmp_path) == []


# -- small blobs sent by the committing thread (client/blobtxn.py) -----------------------

def uploads_seen(monkeypatch) -> list:
    """The blob file numbers that go to the reactor's BlobUploads from now on."""
    from zeotwist.client.blobtransfer import BlobUploads
    seen = []
    add = BlobUploads.add

    def recording(uploads, proto, number, path, idle_timeout=None):
        seen.append(number)
        return add(uploads, proto, number, path, idle_timeout)

    monkeypatch.setattr(BlobUploads, "add", recording)
    return seen


def store_files(cs, tmp_path, blobs: list, commit: bool = True):
    """storeBlob each of ``blobs`` (bytes), in order, in one transaction;
    ``[(oid, tid)]`` once committed (or aborted: ``tid`` None)."""
    meta = TransactionMetaData()
    cs.tpc_begin(meta)
    oids = []
    for i, data in enumerate(blobs):
        src = tmp_path / ("source-%d" % i)
        src.write_bytes(data)
        oids.append(cs.new_oid())
        cs.storeBlob(oids[-1], b"\0" * 8, b"record", str(src), "", meta)
    if not commit:
        cs.tpc_abort(meta)
        return [(oid, None) for oid in oids]
    cs.tpc_vote(meta)
    tid = cs.tpc_finish(meta)
    return [(oid, tid) for oid in oids]


def test_small_blobs_go_from_the_thread_and_after_a_streamed_one_in_order(world, tmp_path,
                                                                         monkeypatch):
    """A blob of one piece is sent by the committing thread (no upload on
    the reactor); once one went to the uploads (a bigger one), every later
    one follows it there, so no two blob files' pieces interleave."""
    srv, cs, db = world
    seen = uploads_seen(monkeypatch)
    blobs = [b"a" * 10_000, b"b" * 5_000, BIG[:3 * MB], b"c" * 10_000, b""]
    refs = store_files(cs, tmp_path, blobs)
    assert seen == [2, 3, 4]
    for (oid, tid), data in zip(refs, blobs):
        os.remove(cs.blob_cache.lookup(oid, tid))      # read back from the server
        with open(cs.loadBlob(oid, tid), "rb") as f:
            assert f.read() == data
    del seen[:]
    refs = store_files(cs, tmp_path, [b"d" * 20_000, b"e"])      # a fresh transaction
    assert seen == []
    assert spool_files(tmp_path) == [] and partial_files(tmp_path) == []


def test_small_blobs_fall_back_to_the_uploads_when_the_thread_may_not_write(
        world, tmp_path, monkeypatch):
    from zeotwist.client.threadwrites import ThreadWrites
    srv, cs, db = world
    monkeypatch.setattr(ThreadWrites, "send_from_thread", lambda proto, frame: False)
    seen = uploads_seen(monkeypatch)
    blobs = [b"f" * 10_000, b"g" * 3]
    refs = store_files(cs, tmp_path, blobs)
    assert seen == [0, 1]
    for (oid, tid), data in zip(refs, blobs):
        os.remove(cs.blob_cache.lookup(oid, tid))
        with open(cs.loadBlob(oid, tid), "rb") as f:
            assert f.read() == data


def test_connection_lost_after_a_small_blob_from_the_thread(world, tmp_path, monkeypatch):
    """The server cuts the connection once the thread's small blob is
    spooled: the vote fails with ClientDisconnected, nothing is committed
    or left behind; an aborted transaction of small blobs leaves nothing."""
    srv, cs, db = world
    commit_blobs(db, {"kept": KEPT})
    last = cs.lastTransaction()
    seen = uploads_seen(monkeypatch)
    append = server_blobs.BlobSpool.append

    def append_then_cut(spool, blob, data):
        append(spool, blob, data)
        cut_server_side(srv)

    monkeypatch.setattr(server_blobs.BlobSpool, "append", append_then_cut)
    with pytest.raises(ClientDisconnected):
        store_files(cs, tmp_path, [b"h" * 10_000])
    cs.tpc_abort(cs._transaction) if cs._transaction is not None else None
    monkeypatch.setattr(server_blobs.BlobSpool, "append", append)
    assert seen == []                                # it went from the thread
    reconnected(cs, srv)
    assert spool_files(tmp_path) == [] and partial_files(tmp_path) == []
    assert srv.server.storage.lastTransaction() == last
    store_files(cs, tmp_path, [b"i" * 10_000, b"j" * 100], commit=False)
    cs.sync()                                        # a round trip after the Abort
    assert spool_files(tmp_path) == [] and partial_files(tmp_path) == []
    assert srv.server.storage.lastTransaction() == last
    assert seen == []
    assert contents(db, cs) == {"kept": KEPT}
