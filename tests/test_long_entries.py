"""Long entries (docs/protocol.md, "Long entries"): a value over 64 KiB in
one piece between peers that declared ``long_values`` at Register, instead
of AMP's split over ``data``, ``data.1``, ...

Frames and the parser in memory (every cut of the byte stream), refusals of
malformed and oversize entries before their value is buffered, and the
handshake: a peer that did not declare them gets AMP's split form, which
every version reads.
"""
import os

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols import amp
from ZODB.FileStorage import FileStorage
from ZODB.utils import maxtid, z64

from zeotwist.testing import call_in_memory as _call, connect_in_memory, memory_server
from zeotwist.wire import commands as C
from zeotwist.wire import boxlayout, commitframes, loadframes
from zeotwist.wire.framing import BoundedAMP
from zeotwist.wire.records import encode_store

START, END = b"\x01" * 8, b"\x02" * 8
BIG = bytes(range(256)) * 1000          # 256,000 bytes: four AMP values' worth


class Receiver(BoundedAMP):
    """BoundedAMP's parser alone: records boxes and violations."""

    maxBoxBytes = 4 * 2**20

    def __init__(self):
        super().__init__()
        self.boxes, self.violations = [], []
        self.makeConnection(StringTransport())

    def ampBoxReceived(self, box):
        self.boxes.append(box)

    def protocolViolation(self, why):
        self.violations.append(why)
        super().protocolViolation(why)


def feed(frame: bytes, cut: int) -> Receiver:
    r = Receiver()
    for off in range(0, len(frame), cut):
        r.dataReceived(frame[off:off + cut])
    return r


def split_form(command, values, response=False, tag_key=None, tag=None) -> bytes:
    make = command.makeResponse if response else command.makeArguments
    box = amp.AmpBox(make(dict(values), None))
    if tag_key:
        box[tag_key] = tag
    if not response:
        box[amp.COMMAND] = command.commandName
    return box.serialize()


@pytest.mark.parametrize("cut", [1, 7, 4096, 65536, 10**9])
@pytest.mark.parametrize("end", [None, END])
def test_load_answer_in_one_entry_reads_as_amps_split_form(cut, end):
    frame = loadframes.load_before_answer(b"a1", (BIG, START, end), long_values=True)
    assert boxlayout.long_entry(b"data", BIG) in frame
    assert len(frame) < len(BIG) + 100          # not cut into keys: no per-piece headers
    r = feed(frame + frame, cut)                # two boxes back to back
    assert r.violations == [] and len(r.boxes) == 2
    values = {"found": True, "data": BIG, "start": START, "end": end}
    [expected] = amp.parseString(split_form(C.LoadBefore, values, True, amp.ANSWER, b"a1"))
    assert b"data.1" in expected and b"data.1" not in r.boxes[0]
    for box in r.boxes:
        assert loadframes.read_load_before_answer(amp.AmpBox(box), None) == (BIG, START, end)
        assert C.LoadBefore.parseResponse(amp.AmpBox(box), None) == \
            C.LoadBefore.parseResponse(amp.AmpBox(expected), None)


@pytest.mark.parametrize("cut", [3, 65536, 10**9])
def test_store_data_piece_in_one_entry(cut):
    frame = commitframes.store_data(memoryview(BIG), long_values=True)
    r = feed(frame, cut)
    assert r.violations == [] and len(r.boxes) == 1
    assert commitframes.read_store_data(r.boxes[0]) == BIG
    assert C.StoreData.parseArguments(r.boxes[0], None) == {"data": BIG}


@pytest.mark.parametrize("piece", [b"", b"small", b"z" * boxlayout.MAX_VALUE])
def test_a_short_store_piece_is_amps_own_either_way(piece):
    expected = split_form(C.StoreData, {"data": piece})
    assert commitframes.store_data(piece) == expected
    assert commitframes.store_data(memoryview(piece), long_values=True) == expected
    [box] = amp.parseString(expected)
    assert commitframes.read_store_data(box) == piece


def test_without_long_values_a_big_value_is_left_to_amps_split():
    assert commitframes.store_data(BIG) is None
    assert loadframes.load_before_answer(b"1", (BIG, START, None)) is None
    [box] = amp.parseString(split_form(C.StoreData, {"data": BIG}))
    assert commitframes.read_store_data(box) is None        # AMP's path joins it


def _header(key: bytes, vlen: int) -> bytes:
    return b"\xff\xff" + len(key).to_bytes(2, "big") + key + vlen.to_bytes(4, "big")


@pytest.mark.parametrize("head,why", [
    (_header(b"", 70000), "long entry key length 0"),
    (b"\xff\xff\x01\x2c" + b"k" * 300 + (70000).to_bytes(4, "big"), "long entry key length 300"),
    (_header(b"data", 100), "long entry of 100 bytes"),
    (_header(b"data", 65535), "long entry of 65535 bytes"),
    (_header(b"data", 5 * 2**20), "box larger than 4194304 bytes"),
    (_header(b"data", 2**32 - 1), "box larger than 4194304 bytes"),
])
def test_malformed_or_oversize_long_entries_are_refused_on_their_header(head, why):
    r = Receiver()
    r.dataReceived(head)                  # not one byte of the value sent
    assert len(r.violations) == 1 and r.violations[0].startswith(why), r.violations
    assert r.transport.disconnecting or r._violated
    assert r._long is None and r._buf == b"" and r.boxes == []
    r.dataReceived(b"x" * 100000)         # nothing more is read or kept
    assert r._buf == b"" and r._long is None and r.boxes == []


def test_a_long_entry_counts_against_the_keys_and_bytes_of_its_box():
    r = Receiver()
    r.maxBoxBytes = 300000
    two = b"".join((boxlayout.long_entry(b"a", BIG), boxlayout.long_entry(b"b", BIG), b"\0\0"))
    r.dataReceived(two)
    assert r.violations and "larger than 300000" in r.violations[0]


# -- the handshake decides -----------------------------------------------------------

@pytest.fixture
def world(tmp_path):
    clock = Clock()
    server = memory_server(FileStorage(str(tmp_path / "data.fs")), clock)
    yield clock, {"1": server}
    server.close()


def _commit_big(proto, pump, oid, data):
    stream = encode_store(oid, z64, data)
    proto.send(C.TpcBegin, user=b"", description=b"", extension=b"")
    view = memoryview(stream)
    for off in range(0, len(stream), C.STORE_CHUNK):
        proto.store_data(view[off:off + C.STORE_CHUNK])
    assert _call(proto, pump, C.Vote)["conflicts"] == b""
    _call(proto, pump, C.Finish)


@pytest.mark.parametrize("declared", [True, None])
def test_long_entries_only_between_peers_that_declared_them(world, monkeypatch, declared):
    """A client that declares long_values gets a big record in one entry and
    sends its store pieces that way; one that does not (an older client)
    gets and sends AMP's split form - and both commit and load the same."""
    clock, servers = world
    client, session, pump, _ = connect_in_memory(servers, clock)
    answer = _call(client, pump, C.Register, protocol=C.PROTOCOL_VERSION, storage="1",
                   read_only=False, long_values=declared)
    assert answer["long_values"] is True            # this server reads them
    client.long_values = bool(declared)             # as the connector sets it
    assert session.long_values is bool(declared)
    seen = []
    for module, name in ((commitframes, "read_store_data"),
                         (loadframes, "read_load_before_answer")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda box, *a, real=real: (
            b"data" in box and seen.append(sorted(box)), real(box, *a))[1])
    oid = _call(client, pump, C.NewOids, count=1)["oids"][0]
    data = bytes(range(256)) * (3 * 2**20 // 256)        # 3 MiB: four pieces
    _commit_big(client, pump, oid, data)
    out = []
    client.load_before(oid, maxtid).addBoth(out.append)
    pump.flush()
    assert out[0][0] == data
    split = [keys for keys in seen if b"data.1" in keys]
    if declared:
        assert seen and not split            # every piece and the answer: one entry
    else:       # the big pieces fell back, the answer split (the last, small piece is
        assert len(split) == len(seen) >= 2     # read from the bytes: wire/commitframes)


@pytest.mark.parametrize("end", [None, END])
def test_a_long_entry_beside_a_prefetch_value(end):
    prefetched = b"p" * 300
    frame = loadframes.load_before_answer(b"9", (BIG, START, end), prefetched, long_values=True)
    [box] = feed(frame, 5000).boxes
    values = {"found": True, "data": BIG, "start": START, "end": end, "prefetch": prefetched}
    [expected] = amp.parseString(split_form(C.LoadBefore, values, True, amp.ANSWER, b"9"))
    assert C.LoadBefore.parseResponse(amp.AmpBox(box), None) == \
        C.LoadBefore.parseResponse(amp.AmpBox(expected), None)
    assert box[b"prefetch"] == prefetched


@pytest.mark.parametrize("corked", [False, True])
def test_a_big_answer_is_sent_from_its_record_in_order_with_other_frames(corked):
    """The server writes a LoadBefore answer over BULK_MIN without copying
    the record into a frame (BoundedAMP.emit_parts): the socket is handed
    slices of the record object itself, and frames collected before it or
    emitted after it keep their places."""
    from test_twisted_compat import _Socketish
    from zeotwist.wire.sending import BULK_MIN
    fd = _Socketish(take=300_000)
    proto = BoundedAMP()
    proto.makeConnection(fd)
    record = bytes(range(256)) * (3 * BULK_MIN // 256)
    head, data, tail = loadframes.load_before_answer_parts(b"7", (record, START, None), None, True)
    assert head + data + tail == loadframes.load_before_answer(b"7", (record, START, None), None, True)
    if corked:
        with proto.corked():
            proto.emit(b"before")
            proto.emit_parts(head, data, tail)
    else:
        proto.emit(b"before")
        proto.emit_parts(head, data, tail)
    proto.emit(b"after")
    while fd.dataBuffer[fd.offset:] or fd._tempDataBuffer:
        fd.doWrite()
    sent = b"".join(bytes(s[:fd.take]) for s in fd.sent)
    assert sent == b"before" + head + record + tail + b"after"
    assert any(getattr(s, "obj", s) is record for s in fd.sent)
    r = feed(sent[len(b"before"):-len(b"after")], 2**20)
    assert loadframes.read_load_before_answer(r.boxes[0], None) == (record, START, None)


# -- blob pieces of 1 MiB: one long entry each way ------------------------------------

BLOB_PIECE = bytes(range(256)) * (C.BLOB_CHUNK_LONG // 256)


@pytest.mark.parametrize("cut", [1000, 65536, 2**20 + 7])
def test_a_1mib_blob_chunk_in_one_entry(cut):
    frame = commitframes.store_blob_chunk(4, BLOB_PIECE, long_values=True)
    r = feed(frame, cut)
    assert r.violations == [] and len(r.boxes) == 1
    assert commitframes.read_store_blob_chunk(r.boxes[0]) == (4, BLOB_PIECE)
    assert C.StoreBlobChunk.parseArguments(r.boxes[0], None) == {"blob": 4, "data": BLOB_PIECE}
    with pytest.raises(Exception):          # never over 64 KiB without long entries
        commitframes.store_blob_chunk(4, BLOB_PIECE)


@pytest.mark.parametrize("declared", [False, True])
def test_a_load_blob_chunk_answer_is_one_long_entry_to_a_peer_that_reads_them(declared):
    """LongBytes: the answer's data goes whole (BoundedAMP.sendBox, boxlayout.box_parts)
    to a peer that declared long entries, cut into AMP values to one that did not;
    both read back as the same answer."""
    sender = Receiver()
    sender.long_values = declared
    box = amp.AmpBox(C.LoadBlobChunk.makeResponse(dict(data=BLOB_PIECE, size=5 * 2**20),
                                                  sender))
    box[amp.ANSWER] = b"3"
    sender.sendBox(box)
    frame = sender.transport.value()
    assert (boxlayout.long_entry(b"data", BLOB_PIECE) in frame) == declared
    assert (b"data.1" in frame) != declared
    r = feed(frame, 65536)
    assert r.violations == []
    assert C.LoadBlobChunk.parseResponse(r.boxes[0], None) == dict(data=BLOB_PIECE,
                                                                   size=5 * 2**20)


class _ChunkServer:
    """A connection's ``call`` for BlobDownload: answers LoadBlobChunk from
    ``blob``, honouring ``length`` (up to BLOB_LOAD_MAX) or, like a server
    from before ``length``, always BLOB_LOAD_CHUNK bytes."""

    def __init__(self, blob: bytes, honours_length: bool):
        self.blob, self.honours = blob, honours_length
        self.asked, self.waiting = [], []

    def call(self, command, oid, serial, offset, length=None):
        from twisted.internet.defer import Deferred
        self.asked.append((offset, length))
        n = min(length, C.BLOB_LOAD_MAX) if self.honours and length else C.BLOB_LOAD_CHUNK
        d = Deferred()
        self.waiting.append((d, dict(data=self.blob[offset:offset + n], size=len(self.blob))))
        return d

    def answer_all(self) -> int:
        most = 0
        while self.waiting:
            most = max(most, len(self.waiting))
            d, answer = self.waiting.pop(0)
            d.callback(answer)
        return most


@pytest.mark.parametrize("honours_length", [True, False])
def test_a_download_asks_for_1mib_pieces_and_follows_an_older_server(honours_length):
    import io
    from zeotwist.client.blobtransfer import BlobDownload, DOWNLOAD_BYTES, DOWNLOAD_WINDOW
    blob = bytes(range(256)) * (9 * 2**20 // 256) + b"end"
    server, f = _ChunkServer(blob, honours_length), io.BytesIO()
    done = BlobDownload(server, b"\0" * 8, b"\1" * 8, f).start()
    most = server.answer_all()
    assert done.result == len(blob) and f.getvalue() == blob
    piece = C.BLOB_LOAD_MAX if honours_length else C.BLOB_LOAD_CHUNK
    offsets = [offset for offset, _ in server.asked]
    assert offsets == list(range(0, len(blob), piece))
    assert server.asked[0][1] == C.BLOB_LOAD_MAX           # always asked for 1 MiB first
    assert all(length == piece for _, length in server.asked[1:])
    assert most <= min(DOWNLOAD_WINDOW, DOWNLOAD_BYTES // piece)


class _WriteSizes:
    """A binary file that records the size of every write."""

    def __init__(self):
        self.sizes, self.data = [], bytearray()

    def write(self, data):
        self.sizes.append(len(data))
        self.data += data
        return len(data)

    def close(self):
        pass


def test_blob_pieces_are_written_in_64_kib_slices(tmp_path):
    """The client's download and the server's spool write each 1 MiB piece
    in slices of at most 64 KiB (zeotwist.fileio), the bytes unchanged."""
    from zeotwist.client.blobtransfer import BlobDownload
    from zeotwist.fileio import FILE_WRITE
    from zeotwist.server.blobs import BlobSpool
    blob = os.urandom(2 * 2**20 + 5)
    server, f = _ChunkServer(blob, True), _WriteSizes()
    done = BlobDownload(server, b"\0" * 8, b"\1" * 8, f).start()
    server.answer_all()
    assert done.result == len(blob) and bytes(f.data) == blob
    assert max(f.sizes) == FILE_WRITE == 2**16
    spool = BlobSpool(str(tmp_path))
    spool.append(0, b"first")
    spool._file.close()
    spool._file = written = _WriteSizes()
    spool.append(0, blob[:2**20])
    assert bytes(written.data) == blob[:2**20] and max(written.sizes) == FILE_WRITE
    spool.close()
