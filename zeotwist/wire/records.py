"""The store stream: the records a client sends for one transaction.

The stream travels in ``StoreData`` pieces cut anywhere; the server spools
it and replays it at vote time.  Every record has the same layout::

    kind(1) oid(8) serial(8) length(>I) payload(length)

Kinds (each applied in the vote by a handler registered for it on the server):

    b"s"  store: payload is the object record, serial the one it was based on
    b"c"  checkCurrentSerialInTransaction(oid, serial); empty payload

Later kinds (undo, restore, deleteObject, blobs) use the same frame.
Pure: no I/O beyond the file-like object handed in.
"""
import struct
from typing import BinaryIO, Iterator

from zeotwist.errors import RemoteProtocolError

STORE, CHECK = b"s", b"c"
_HEAD = struct.Struct(">c8s8sI")
HEAD_SIZE = _HEAD.size


def encode(kind: bytes, oid: bytes, serial: bytes, payload: bytes = b"") -> bytes:
    return _HEAD.pack(kind, oid, serial, len(payload)) + payload


def encode_store(oid: bytes, serial: bytes, data: bytes) -> bytes:
    return encode(STORE, oid, serial, data)


def encode_check(oid: bytes, serial: bytes) -> bytes:
    return encode(CHECK, oid, serial)


def iter_records(f: BinaryIO, kinds=None) -> Iterator[tuple[bytes, bytes, bytes, bytes]]:
    """Yield ``(kind, oid, serial, payload)`` from ``f``.

    Raises RemoteProtocolError on a truncated record, or a kind not in
    ``kinds`` (when given).
    """
    read = f.read
    while True:
        head = read(HEAD_SIZE)
        if not head:
            return
        if len(head) != HEAD_SIZE:
            raise RemoteProtocolError("truncated record header")
        kind, oid, serial, length = _HEAD.unpack(head)
        if kinds is not None and kind not in kinds:
            raise RemoteProtocolError("unknown record kind %r" % kind)
        payload = read(length)
        if len(payload) != length:
            raise RemoteProtocolError("truncated record payload")
        yield kind, oid, serial, payload
