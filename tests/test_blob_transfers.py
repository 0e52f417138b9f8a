"""Blob transfers without a network: the server's blob commands in memory
(a Clock, synchronous storage calls) and the client's transfers and the
server's spool driven by hand.

* Misused blob commands (a chunk outside a transaction or out of order, a
  storage without blobs, a negative offset, a blob file never sent) drop
  the connection and leave no spool file; chunks and records commit; a
  long chunk is spooled as it arrives, never held whole; a read-only
  session spools and moves nothing.
* A download or upload that stops making progress fails after its idle
  timeout (a slow one does not); a spool write error fails the vote, not
  the connection.

The live tests are in tests/test_blobs.py.
"""
import os

import pytest
from ZODB.utils import z64


# -- protocol misuse, in memory (a Clock, synchronous storage calls) ------------------------

@pytest.fixture
def memory_world(tmp_path):
    from twisted.internet.task import Clock
    from ZODB.FileStorage import FileStorage
    from zeotwist.testing import memory_server
    clock = Clock()
    servers = {
        "1": memory_server(FileStorage(str(tmp_path / "b.fs"), blob_dir=str(tmp_path / "blobs")),
                           clock),
        "plain": memory_server(FileStorage(str(tmp_path / "p.fs")), clock),
    }
    yield clock, servers, tmp_path
    for server in servers.values():
        server.close()


def _session(world, storage="1"):
    from zeotwist.testing import connect_in_memory
    from zeotwist.wire import commands as C
    clock, servers, _ = world
    client, session, pump, rec = connect_in_memory(servers, clock)
    out = []
    client.call(C.Register, protocol=C.PROTOCOL_VERSION, storage=storage,
                read_only=False).addBoth(out.append)
    pump.flush()
    assert isinstance(out[0], dict)
    return client, session, pump, rec


def _vote(client, pump):
    from zeotwist.wire import commands as C
    out = []
    client.call(C.Vote).addBoth(out.append)
    pump.flush()
    return out[0] if out else None


@pytest.mark.parametrize("misuse", ["chunk-outside-txn", "out-of-order", "no-blobs-storage",
                                    "negative-offset", "unsent-blob-file"])
def test_blob_protocol_misuse_drops_the_connection(memory_world, misuse):
    from zeotwist.wire import commands as C
    from zeotwist.wire.records import encode_blob
    client, session, pump, rec = _session(
        memory_world, "plain" if misuse == "no-blobs-storage" else "1")
    oid = b"\0" * 7 + b"\1"
    if misuse == "chunk-outside-txn":
        client.send(C.StoreBlobChunk, blob=0, data=b"x")
    elif misuse == "negative-offset":
        client.call(C.LoadBlobChunk, oid=oid, serial=z64, offset=-1).addErrback(lambda f: None)
    else:
        client.send(C.TpcBegin, user=b"", description=b"", extension=b"")
        if misuse == "out-of-order":
            client.send(C.StoreBlobChunk, blob=1, data=b"x")
        elif misuse == "no-blobs-storage":
            client.send(C.StoreBlobChunk, blob=0, data=b"x")
        else:
            client.send(C.StoreBlobChunk, blob=0, data=b"x")
            client.send(C.StoreData, data=encode_blob(oid, z64, 1, b"record"))
            _vote(client, pump)
    pump.flush()
    assert rec.lost, misuse
    assert session.server.lock.waiting() == 0
    spool_dir = memory_world[2] / "blobs" / "tmp"
    assert not spool_dir.exists() or os.listdir(str(spool_dir)) == []


def test_blob_chunks_and_records_commit_in_memory(memory_world):
    from zeotwist.wire import commands as C
    from zeotwist.wire.records import encode_blob
    client, session, pump, rec = _session(memory_world)
    oid = b"\0" * 7 + b"\1"
    client.send(C.TpcBegin, user=b"", description=b"", extension=b"")
    client.send(C.StoreBlobChunk, blob=0, data=b"first ")
    client.send(C.StoreBlobChunk, blob=0, data=b"blob")
    client.send(C.StoreBlobChunk, blob=1, data=b"")          # an empty one
    client.send(C.StoreData, data=encode_blob(oid, z64, 0, b"record 1")
                + encode_blob(oid[:7] + b"\2", z64, 1, b"record 2"))
    assert _vote(client, pump) == dict(resolved=[], conflicts=b"", to_resolve=None, current=None)
    out = []
    client.call(C.Finish).addBoth(out.append)
    pump.flush()
    tid = out[0]["tid"]
    got = []
    client.call(C.LoadBlobChunk, oid=oid, serial=tid, offset=0).addBoth(got.append)
    client.call(C.LoadBlobChunk, oid=oid, serial=tid, offset=6).addBoth(got.append)
    client.call(C.LoadBlobChunk, oid=oid[:7] + b"\2", serial=tid, offset=0).addBoth(got.append)
    pump.flush()
    assert got == [dict(data=b"first blob", size=10), dict(data=b"blob", size=10),
                   dict(data=b"", size=0)]
    assert not rec.lost
    assert os.listdir(str(memory_world[2] / "blobs" / "tmp")) == []


def test_blob_pieces_stored_and_loaded_arm_the_trim_after_the_burst(memory_world, monkeypatch):
    """The blob commands tell malloc.trim_after_burst of each piece (92bd7e4):
    one trim BURST_QUIET seconds after the last stored piece, one after
    the last loaded one (tests/test_malloc.py checks the timing itself)."""
    from zeotwist.server import malloc
    from zeotwist.wire import commands as C
    from zeotwist.wire.records import encode_blob
    clock = memory_world[0]
    trims = []
    monkeypatch.setattr(malloc, "release_free_memory", lambda: trims.append(1) or True)
    monkeypatch.setattr(malloc, "_burst", malloc._BurstTrim(clock))
    client, session, pump, rec = _session(memory_world)
    oid = b"\0" * 7 + b"\1"
    client.send(C.TpcBegin, user=b"", description=b"", extension=b"")
    client.send(C.StoreBlobChunk, blob=0, data=b"a blob")
    client.send(C.StoreData, data=encode_blob(oid, z64, 0, b"record"))
    _vote(client, pump)
    clock.advance(malloc.BURST_QUIET)
    assert trims == [1]                     # after the stored pieces
    out = []
    client.call(C.Finish).addBoth(out.append)
    pump.flush()
    client.call(C.LoadBlobChunk, oid=oid, serial=out[0]["tid"], offset=0).addBoth(out.append)
    pump.flush()
    assert out[1] == dict(data=b"a blob", size=6)
    clock.advance(malloc.BURST_QUIET)
    assert trims == [1, 1]                  # after the loaded ones
    assert not rec.lost


def test_a_long_blob_chunk_is_spooled_as_it_arrives_never_held_whole(memory_world):
    """BlobResponders.long_sink: a StoreBlobChunk's long data entry goes to
    the spool file while it arrives (SpoolSink, in SPOOL_READ pieces), not
    collected in memory first: half of a chunk given to the parser is in
    the spool file when the parser returns, and the parser keeps no pieces.
    The blob then commits and loads back whole."""
    from zeotwist.server.blobs import SPOOL_READ, SpoolSink
    from zeotwist.wire import commands as C
    from zeotwist.wire.commitframes import store_blob_chunk
    from zeotwist.wire.records import encode_blob
    client, session, pump, rec = _session(memory_world)
    oid = b"\0" * 7 + b"\1"
    client.send(C.TpcBegin, user=b"", description=b"", extension=b"")
    pump.flush()
    data = os.urandom(3 * SPOOL_READ + 1000)
    frame = store_blob_chunk(0, data, long_values=True)
    head = len(frame) - len(data) - 2                      # the value ends 2 bytes early
    session.dataReceived(frame[:head + 2 * SPOOL_READ + 10])
    assert isinstance(session._long[2], SpoolSink)         # (key, size, sink, bytes so far)
    spool = session._txn.blob_spool
    with open(spool.paths[0], "rb") as f:       # written already, but for what the
        written = f.read()                      # file object buffers (8 KiB at most)
    assert written == data[:len(written)] and len(written) > 2 * SPOOL_READ + 10 - 2**13
    session.dataReceived(frame[head + 2 * SPOOL_READ + 10:])
    assert session._long is None and not rec.lost
    client.send(C.StoreData, data=encode_blob(oid, z64, 0, b"record"))
    assert _vote(client, pump)["conflicts"] == b""
    out = []
    client.call(C.Finish).addBoth(out.append)
    pump.flush()
    got = []
    for offset in range(0, len(data), C.BLOB_LOAD_MAX):
        client.call(C.LoadBlobChunk, oid=oid, serial=out[0]["tid"], offset=offset,
                    length=C.BLOB_LOAD_MAX).addBoth(got.append)
    pump.flush()
    assert b"".join(g["data"] for g in got) == data
    assert not rec.lost


def test_a_chunk_still_arriving_when_its_transaction_ends_is_dropped(memory_world):
    """The spool is closed (the transaction aborted) while a long chunk's
    bytes are still arriving: the rest is not written anywhere, and no
    spool file is left behind."""
    from zeotwist.wire import commands as C
    from zeotwist.wire.commitframes import store_blob_chunk
    client, session, pump, rec = _session(memory_world)
    client.send(C.TpcBegin, user=b"", description=b"", extension=b"")
    pump.flush()
    data = os.urandom(2**20)
    frame = store_blob_chunk(0, data, long_values=True)
    session.dataReceived(frame[:len(frame) // 2])
    spool = session._txn.blob_spool
    spool.close()                               # as the transaction's end does
    session.dataReceived(frame[len(frame) // 2:])
    assert spool.closed and spool.paths == []
    assert os.listdir(str(memory_world[2] / "blobs" / "tmp")) == []


# -- transfers that stop making progress (a Clock, fake connections) ------------------------

class _SilentProto:
    """A connection whose server never answers and whose transport, once
    written to, stays full (it never asks the producer to resume)."""

    def __init__(self):
        from twisted.internet.defer import Deferred
        self.asked = []
        self.transport = self
        self.producer = None
        self._Deferred = Deferred

    def call(self, command, **kw):
        self.asked.append(kw)
        return self._Deferred()

    def emit(self, frame):
        if self.producer is not None:
            self.producer.pauseProducing()

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None


def test_a_stalled_download_fails_after_its_idle_timeout(tmp_path):
    from twisted.internet.task import Clock
    from zeotwist.client.blobtransfer import BlobDownload
    from zeotwist.errors import ClientDisconnected
    clock, proto, out = Clock(), _SilentProto(), []
    with open(str(tmp_path / "partial"), "wb") as f:
        BlobDownload(proto, b"\0" * 8, b"\1" * 8, f, reactor=clock,
                     idle_timeout=30).start().addBoth(out.append)
        clock.advance(29)
        assert out == [] and len(proto.asked) == 1
        clock.advance(2)
    assert out and out[0].check(ClientDisconnected)
    assert "no progress for 30 s" in str(out[0].value)


def test_a_stalled_upload_fails_after_its_idle_timeout_but_a_slow_one_does_not(tmp_path):
    from twisted.internet.task import Clock
    from zeotwist.client.blobtransfer import BlobUpload
    from zeotwist.errors import ClientDisconnected
    src = tmp_path / "blob"
    src.write_bytes(b"x" * 500_000)
    clock, proto, out = Clock(), _SilentProto(), []
    upload = BlobUpload(clock, proto, 0, str(src), idle_timeout=30)
    upload.start().addBoth(out.append)
    clock.advance(0)                               # begins in a turn of its own
    assert upload.sent > 0 and proto.producer is upload
    for _ in range(5):                             # slow but moving: one chunk per 20 s
        clock.advance(20)
        upload.resumeProducing()
    assert out == []
    clock.pump([1] * 61)                           # then stuck
    assert out and out[0].check(ClientDisconnected)
    assert proto.producer is None                  # unregistered


def test_a_spool_write_error_fails_the_vote_not_the_connection(tmp_path):
    from ZODB.POSException import StorageError
    from zeotwist.server.blobs import BlobSpool

    class FullDisk:
        def write(self, data):
            raise OSError(28, "No space left on device")

        def close(self):
            pass

    spool = BlobSpool(str(tmp_path))
    spool.append(0, b"first")
    spool._file = FullDisk()                  # the disk fills up
    spool.append(0, b"more")                  # kept, not raised
    spool.append(1, b"next blob")             # ignored from now on
    with pytest.raises(StorageError, match="No space left"):
        spool.take(0)
    spool.close()
    assert os.listdir(str(tmp_path)) == []


def test_read_only_session_spools_and_moves_nothing(memory_world):
    from zeotwist.testing import connect_in_memory
    from zeotwist.wire import commands as C
    from zeotwist.wire.records import encode_blob
    from ZODB.POSException import ReadOnlyError
    clock, servers, tmp_path = memory_world
    client, session, pump, rec = connect_in_memory(servers, clock)
    client.call(C.Register, protocol=C.PROTOCOL_VERSION, storage="1", read_only=True)
    pump.flush()
    shared = tmp_path / "blobs" / "tmp" / "someone-elses.tmp"
    shared.write_bytes(b"in flight")
    client.send(C.TpcBegin, user=b"", description=b"", extension=b"")
    client.send(C.StoreBlobChunk, blob=0, data=b"x" * 1000)
    client.send(C.StoreBlobShared, blob=1, name="tmp/someone-elses.tmp")
    client.send(C.StoreData, data=encode_blob(b"\0" * 7 + b"\1", z64, 0, b"r"))
    answer = _vote(client, pump)
    assert answer is not None and answer.check(ReadOnlyError)
    assert not rec.lost
    assert os.listdir(str(tmp_path / "blobs" / "tmp")) == ["someone-elses.tmp"]
