"""Review (session 8): blob chunks keep their order behind boxes held while
the server's reading is paused (the output budget, OutputBudget._held).

Boxes parsed while reading is paused are held and run later, in order; a
StoreBlobChunk whose data is written to the spool as it is parsed (a
long entry given to a sink) must not jump that queue: the TpcBegin before
it, or the last chunk of the blob before it, is still held then.  In
memory (iosim, a Clock); the session paused by hand as its budget pauses
it (``_pause_reading``) and resumed as its output check resumes it.
"""
import os

from ZODB.utils import z64

from tests.test_blob_transfers import _session, _vote, memory_world  # noqa: F401


def _load(client, pump, oid, tid, size):
    from zeotwist.wire import commands as C
    got = []
    for offset in range(0, size, C.BLOB_LOAD_MAX):
        client.call(C.LoadBlobChunk, oid=oid, serial=tid, offset=offset,
                    length=C.BLOB_LOAD_MAX).addBoth(got.append)
    pump.flush()
    return b"".join(g["data"] for g in got)


def _paused_then_resumed(session, frames: bytes, pump):
    """``frames`` arrive in one burst while the session's reading is paused
    (boxes held), the last one cut in two as a socket delivers it, then the
    output check resumes the session."""
    session._pause_reading()
    cut = len(frames) - 2**19       # in the last chunk's value: the rest comes later
    session.dataReceived(frames[:cut])      # (as a socket delivers a 1 MiB chunk)
    session.dataReceived(frames[cut:])
    assert not session._violated, "a chunk was spooled ahead of the boxes held before it"
    assert session._held is not None
    session._check_output()                 # nothing pending: resumes, runs the held boxes
    assert session._held is None
    pump.flush()


def test_held_tpc_begin_then_a_long_blob_chunk(memory_world):
    """[TpcBegin, StoreBlobChunk (long)] in one burst while reading is paused:
    no protocol violation, and the blob commits and loads back whole."""
    from zeotwist.wire import commands as C
    from zeotwist.wire import commitframes
    from zeotwist.wire.records import encode_blob
    client, session, pump, rec = _session(memory_world)
    oid = b"\0" * 7 + b"\1"
    data = os.urandom(3 * 2**19 + 7)
    frames = commitframes.tpc_begin(b"", b"", b"") \
        + commitframes.store_blob_chunk(0, data, long_values=True)
    _paused_then_resumed(session, frames, pump)
    assert not rec.lost, "dropped: the chunk was spooled before its held TpcBegin ran"
    client.send(C.StoreData, data=encode_blob(oid, z64, 0, b"record"))
    assert _vote(client, pump)["conflicts"] == b""
    out = []
    client.call(C.Finish).addBoth(out.append)
    pump.flush()
    assert _load(client, pump, oid, out[0]["tid"], len(data)) == data
    assert not rec.lost


def test_held_last_chunk_of_a_blob_then_the_next_blobs_long_chunk(memory_world):
    """Blob 0's long chunk, then (reading paused) blob 0's short last chunk
    and blob 1's long chunk in one burst: both blobs load back whole."""
    from zeotwist.wire import commands as C
    from zeotwist.wire import commitframes
    from zeotwist.wire.records import encode_blob
    client, session, pump, rec = _session(memory_world)
    oids = b"\0" * 7 + b"\1", b"\0" * 7 + b"\2"
    first, last, other = os.urandom(2**20), b"the end of blob 0", os.urandom(2**20 + 3)
    session.dataReceived(commitframes.tpc_begin(b"", b"", b"")
                         + commitframes.store_blob_chunk(0, first, long_values=True))
    assert not rec.lost
    frames = commitframes.store_blob_chunk(0, last, long_values=True) \
        + commitframes.store_blob_chunk(1, other, long_values=True)
    _paused_then_resumed(session, frames, pump)
    assert not rec.lost, "dropped: blob 1 began (blob 0 ended) before blob 0's held chunk ran"
    client.send(C.StoreData, data=encode_blob(oids[0], z64, 0, b"r0")
                + encode_blob(oids[1], z64, 1, b"r1"))
    assert _vote(client, pump)["conflicts"] == b""
    out = []
    client.call(C.Finish).addBoth(out.append)
    pump.flush()
    tid = out[0]["tid"]
    assert _load(client, pump, oids[0], tid, len(first) + len(last)) == first + last
    assert _load(client, pump, oids[1], tid, len(other)) == other
    assert not rec.lost
