"""Review (session 8): the file descriptors a client's blob downloads hold
on the server stay few, whatever the client asks for and however slowly
it reads.

Since 3cf3c5d a LoadBlobChunk answer over 64 KiB to a plain socket is
queued as the open blob file (``FilePiece``), read as the socket takes it:
each piece waiting for the client holds a file descriptor.  The pieces'
bytes are bounded by the output budgets (``--max-pending-output``, the
server's ``--memory-budget``), but bytes are not descriptors: 65,537-byte
pieces make one descriptor per 64 KiB of budget, and a client that asks
for many and reads none would make the server hold hundreds (the
connection cap already takes every descriptor but ``FD_RESERVE``, 64):
the server then fails to open blob files, spool files and sockets for
everyone.  A live server on 127.0.0.1; a raw client that never reads.
"""
import os
import socket

from ZODB.utils import z64

from tests.rawamp import RawClient
from tests.test_review_races import _wait_for
from zeotwist.testing import start_server
from zeotwist.wire import commands as C
from zeotwist.wire.records import encode_blob

#: descriptors one connection's waiting pieces may hold (a downloading
#: client keeps 4 pieces of 1 MiB in flight), and the one a piece being
#: read into memory has open for a moment (the reactor thread reads while
#: this test looks)
FD_BOUND = 16 + 1


def _blob_fds(blob_dir: str) -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink("/proc/self/fd/" + fd)
        except OSError:
            continue
        if target.startswith(blob_dir) and target.endswith(".blob"):
            count += 1
    return count


def test_a_client_that_asks_many_pieces_and_reads_none_holds_few_descriptors(tmp_path):
    blob_dir = str(tmp_path / "blobs")
    srv = start_server(str(tmp_path / "data.fs"), blob_dir=blob_dir)
    raw = None
    try:
        served = srv.server
        host, port = srv.address
        # one committed blob of 200 KB, stored the raw way
        writer = RawClient((host, port))
        writer.register("1")
        oid = writer.ask(C.NewOids, count=1)
        oid = C.NewOids.parseResponse(oid, None)["oids"][0]
        writer.send(C.TpcBegin, user=b"", description=b"", extension=b"")
        writer.send(C.StoreBlobChunk, blob=0, data=os.urandom(60_000))
        writer.send(C.StoreBlobChunk, blob=0, data=os.urandom(60_000))
        writer.send(C.StoreBlobChunk, blob=0, data=os.urandom(60_000))
        writer.send(C.StoreData, data=encode_blob(oid, z64, 0, b"record"))
        assert b"_answer" in writer.ask(C.Vote)
        tid = C.Finish.parseResponse(writer.ask(C.Finish), None)["tid"]
        # a reader that declares long entries, asks 600 pieces of 65,537 bytes, reads none
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.settimeout(20)
        raw.connect((host, port))
        reader = RawClient.__new__(RawClient)
        from tests.rawamp import BoxReader
        reader.sock, reader.reader, reader._tag = raw, BoxReader(raw), 0
        answer = reader.ask(C.Register, protocol=C.PROTOCOL_VERSION, storage="1",
                            read_only=False, long_values=True)
        assert b"_answer" in answer
        before = _blob_fds(blob_dir)
        raw.sendall(b"".join(reader.box(C.LoadBlobChunk, True, oid=oid, serial=tid,
                                        offset=0, length=65_537) for _ in range(600)))
        sessions = [s for s in served.sessions if getattr(s, "long_values", False)]
        assert len(sessions) == 1
        session = sessions[0]
        # the server stops reading the client once the answers it left
        # unread fill its budget: every piece it will queue is queued then
        _wait_for(lambda: session._held is not None or _blob_fds(blob_dir) - before > FD_BOUND,
                  "the server paused the reader")
        held = _blob_fds(blob_dir) - before
        assert held <= FD_BOUND, "%d blob files held open for one client" % held
    finally:
        if raw is not None:
            raw.close()
        srv.stop()


class _Blobs:
    """A storage whose blob files are temp files (read_blob_chunk's loadBlob)."""

    def __init__(self, path):
        self.path = path

    def loadBlob(self, oid, serial):
        if oid == b"gone" * 2:
            return self.path + ".packed-away"
        return self.path


def test_file_piece_slots_are_bounded_and_always_given_back(tmp_path):
    """FilePieces: at most ``per_holder`` per session and ``total`` in all;
    read_blob_chunk gives its slot back when it makes no piece (a piece
    that fits one AMP value, a blob packed away) and the piece gives it
    back once its file is closed."""
    import pytest
    from ZODB.POSException import POSKeyError
    from zeotwist.fileio import FilePiece
    from zeotwist.server.blobs import FilePieces, read_blob_chunk
    pieces = FilePieces(2, 3)
    a, b, c = object(), object(), object()
    slots = [pieces.take(a), pieces.take(a)]
    assert all(slots) and pieces.take(a) is None            # per session
    slots.append(pieces.take(b))
    assert slots[2] and pieces.take(c) is None              # in all
    path = str(tmp_path / "x.blob")
    with open(path, "wb") as f:
        f.write(os.urandom(200_000))
    storage = _Blobs(path)
    slots[0]()
    slots[0]()                          # given back once, however often called
    slot = pieces.take(c)
    small = read_blob_chunk(storage, b"\0" * 8, b"\0" * 8, 0, 1000, slot)["data"]
    again = pieces.take(c)
    assert type(small) is bytes and again is not None       # given back at once
    again()
    with pytest.raises(POSKeyError):
        read_blob_chunk(storage, b"gone" * 2, b"\0" * 8, 0, 100_000, pieces.take(a))
    piece = read_blob_chunk(storage, b"\0" * 8, b"\0" * 8, 0, 100_000, pieces.take(a))["data"]
    assert type(piece) is FilePiece and pieces.take(a) is None      # a's two: the piece's
    piece.close()
    assert pieces.take(a) is not None and pieces.take(c) is None  # a's again; 3 in all
