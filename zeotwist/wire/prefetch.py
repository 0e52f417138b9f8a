"""Reference prefetch on the wire: the ``prefetch`` value of a LoadBefore answer.

When a client registered with ``prefetch=True`` asks ``LoadBefore(oid,
tid)``, the server may add to the answer the records, as of the same
snapshot (``loadBefore(ref, tid)``), of objects the answered record
references.  They travel as one AMP value (so at most :data:`MAX_BYTES`),
a concatenation of records, each::

    oid (8 bytes)  start (8)  end (8; 8 zero bytes = current)  length (>I, 4)  data

``end`` is the tid that replaced the revision, exactly as a LoadBefore
answer's ``end``; zero means the revision is current (no tid is zero).
docs/protocol.md and docs/performance.md ("Reference prefetch") describe
the bounds and why no stale record can reach a cache.  Pure functions.
"""
import struct

#: The largest ``prefetch`` value: one AMP value holds at most 65,535 bytes.
MAX_BYTES = 65_000
#: The bytes of one record before its data.
HEAD = struct.Struct(">8s8s8sI")
#: ``end`` of a current revision.
CURRENT = b"\0" * 8


def encode(records) -> bytes:
    """``[(oid, data, start, end_or_None), ...]`` -> the ``prefetch`` value."""
    pack = HEAD.pack
    return b"".join(pack(oid, start, end or CURRENT, len(data)) + data
                    for oid, data, start, end in records)


def record_size(data: bytes) -> int:
    """What one record of ``data`` adds to the value."""
    return HEAD.size + len(data)


def decode(value: bytes) -> list:
    """The ``prefetch`` value -> ``[(oid, data, start, end_or_None), ...]``;
    ValueError if it is malformed (truncated, a zero start, an end not after its start)."""
    out, at, size = [], 0, len(value)
    if size > MAX_BYTES:
        raise ValueError("prefetch value of %d bytes (at most %d)" % (size, MAX_BYTES))
    unpack, head = HEAD.unpack_from, HEAD.size
    while at < size:
        if size - at < head:
            raise ValueError("truncated prefetch record header")
        oid, start, end, length = unpack(value, at)
        at += head
        if length > size - at:
            raise ValueError("truncated prefetch record")
        if start == CURRENT or (end != CURRENT and end <= start):
            raise ValueError("prefetch record with an impossible validity")
        out.append((oid, value[at:at + length], start, None if end == CURRENT else end))
        at += length
    return out
