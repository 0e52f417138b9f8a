"""The store stream: the records a client sends for one transaction.

The stream travels in ``StoreData`` pieces cut anywhere; the server spools
it and replays it at vote time.  Every record has the same layout::

    kind(1) oid(8) serial(8) length(>I) payload(length)

Kinds (each applied in the vote by a handler registered for it on the server):

    b"s"  store: payload is the object record, serial the one it was based on
    b"c"  checkCurrentSerialInTransaction(oid, serial); empty payload

Storage API kinds (:mod:`zeotwist.server.storageapi` applies them):

    b"u"  undo: payload is the undo id (from undoLog); oid and serial zero
    b"r"  restore(oid, serial, data, prev_txn): payload is a flags byte
          (1: data present, 2: prev_txn present), then prev_txn (8 bytes)
          if present, then data
    b"d"  deleteObject(oid, serial); empty payload

Blob kinds (:mod:`zeotwist.server.blobs` applies them); ``blob`` numbers
the transaction's blob files, 0, 1, ... in the order their StoreBlobChunk /
StoreBlobShared messages began:

    b"b"  storeBlob(oid, serial, data, <blob file>): payload is blob(>I), data
    b"B"  restoreBlob(oid, serial, data, <blob file>, prev_txn): payload is
          blob(>I), has_prev(1), prev_txn(8, if has_prev), data

Pure: no I/O beyond the file-like object handed in.
"""
import struct
from typing import BinaryIO, Iterator

from zeotwist.errors import RemoteProtocolError, UsageError

STORE, CHECK = b"s", b"c"
#: storage API kinds (undo, restore, deleteObject)
UNDO, RESTORE, DELETE = b"u", b"r", b"d"
_HEAD = struct.Struct(">c8s8sI")
HEAD_SIZE = _HEAD.size


def encode(kind: bytes, oid: bytes, serial: bytes, payload: bytes = b"") -> bytes:
    """One record; TypeError naming the argument if ``oid`` or ``serial`` is
    not 8 bytes or ``payload`` not bytes (``struct`` would pad or refuse)."""
    if type(oid) is not bytes or type(serial) is not bytes or len(oid) != 8 \
            or len(serial) != 8 or not isinstance(payload, (bytes, bytearray)):
        _check_arguments(oid, serial, payload)
    return _HEAD.pack(kind, oid, serial, len(payload)) + payload


def _check_arguments(oid, serial, payload) -> None:
    for name, value in (("oid", oid), ("serial", serial)):
        if not isinstance(value, (bytes, bytearray)) or len(value) != 8:
            raise UsageError("%s must be 8 bytes, not %s %.40r" % (
                name, type(value).__name__, value))
    if not isinstance(payload, (bytes, bytearray)):
        raise UsageError("data must be bytes, not %s" % type(payload).__name__)


def encode_store(oid: bytes, serial: bytes, data: bytes) -> bytes:
    return encode(STORE, oid, serial, data)


def store_head(oid: bytes, serial: bytes, data: bytes) -> bytes:
    """The header of a store record for ``data``; the caller appends
    ``data`` itself (a big record is then copied once, not twice)."""
    if type(oid) is not bytes or type(serial) is not bytes or len(oid) != 8 \
            or len(serial) != 8 or not isinstance(data, (bytes, bytearray)):
        _check_arguments(oid, serial, data)
    return _HEAD.pack(STORE, oid, serial, len(data))


def encode_check(oid: bytes, serial: bytes) -> bytes:
    return encode(CHECK, oid, serial)


def unpack_head(buffer, offset: int = 0) -> tuple[bytes, bytes, int]:
    """``(kind, oid, length)`` of the record whose header is at ``offset``
    in ``buffer`` (its payload's ``length`` bytes follow the header)."""
    kind, oid, _, length = _HEAD.unpack_from(buffer, offset)
    return kind, oid, length


def iter_records(f: BinaryIO, kinds=None,
                 size: int | None = None) -> Iterator[tuple[bytes, bytes, bytes, bytes]]:
    """Yield ``(kind, oid, serial, payload)`` from ``f``.

    Raises RemoteProtocolError on a truncated record, or a kind not in
    ``kinds`` (when given).  ``size``: the bytes ``f`` holds; a header
    claiming more than is left is refused before anything is read for it
    (reading it would first allocate what it claims, up to 4 GiB).
    """
    read = f.read
    left = size
    while True:
        head = read(HEAD_SIZE)
        if not head:
            return
        if len(head) != HEAD_SIZE:
            raise RemoteProtocolError("truncated record header")
        kind, oid, serial, length = _HEAD.unpack(head)
        if kinds is not None and kind not in kinds:
            raise RemoteProtocolError("unknown record kind %r" % kind)
        if left is not None:
            left -= HEAD_SIZE
            if length > left:
                raise RemoteProtocolError(
                    "a record claims %d bytes, %d are left in the transaction" % (length, left))
            left -= length
        payload = read(length)
        if len(payload) != length:
            raise RemoteProtocolError("truncated record payload")
        yield kind, oid, serial, payload


# -- storage API records --------------------------------------------------------

_Z8 = b"\0" * 8
RESTORE_DATA, RESTORE_PREV = 1, 2


def encode_undo(undo_id: bytes) -> bytes:
    return encode(UNDO, _Z8, _Z8, undo_id)


def encode_delete(oid: bytes, serial: bytes) -> bytes:
    return encode(DELETE, oid, serial)


def encode_restore(oid: bytes, serial: bytes, data, prev_txn) -> bytes:
    flags = (RESTORE_DATA if data is not None else 0) | \
        (RESTORE_PREV if prev_txn is not None else 0)
    if prev_txn is not None and len(prev_txn) != 8:
        raise ValueError("prev_txn must be an 8-byte tid")
    payload = bytes((flags,)) + (prev_txn or b"") + (data if data is not None else b"")
    return encode(RESTORE, oid, serial, payload)


def decode_restore(payload: bytes) -> tuple:
    """``(data, prev_txn)`` of a restore record's payload (either may be None)."""
    if not payload or payload[0] & ~(RESTORE_DATA | RESTORE_PREV):
        raise RemoteProtocolError("malformed restore record")
    flags, rest = payload[0], payload[1:]
    prev_txn = None
    if flags & RESTORE_PREV:
        if len(rest) < 8:
            raise RemoteProtocolError("truncated restore record")
        prev_txn, rest = rest[:8], rest[8:]
    if flags & RESTORE_DATA:
        return rest, prev_txn
    if rest:
        raise RemoteProtocolError("restore record without data carries data")
    return None, prev_txn


# -- blob records ---------------------------------------------------------------

BLOB, RESTORE_BLOB = b"b", b"B"
_BLOB_NUMBER = struct.Struct(">I")


def encode_blob(oid: bytes, serial: bytes, blob: int, data: bytes) -> bytes:
    """storeBlob of ``data`` with the transaction's blob file number ``blob``."""
    return encode(BLOB, oid, serial, _BLOB_NUMBER.pack(blob) + data)


def decode_blob(payload: bytes) -> tuple[int, bytes]:
    """``(blob, data)`` of a storeBlob record's payload."""
    if len(payload) < _BLOB_NUMBER.size:
        raise RemoteProtocolError("truncated blob record")
    return _BLOB_NUMBER.unpack_from(payload)[0], payload[_BLOB_NUMBER.size:]


def encode_restore_blob(oid: bytes, serial: bytes, blob: int, data: bytes,
                        prev_txn: bytes | None) -> bytes:
    """restoreBlob of ``data`` with blob file ``blob``, based on ``prev_txn``."""
    if prev_txn is not None and len(prev_txn) != 8:
        raise ValueError("prev_txn must be an 8-byte tid")
    head = _BLOB_NUMBER.pack(blob) + (b"\1" + prev_txn if prev_txn is not None else b"\0")
    return encode(RESTORE_BLOB, oid, serial, head + data)


def decode_restore_blob(payload: bytes) -> tuple[int, bytes, bytes | None]:
    """``(blob, data, prev_txn)`` of a restoreBlob record's payload."""
    blob, rest = decode_blob(payload)
    if not rest or rest[0] > 1 or (rest[0] and len(rest) < 9):
        raise RemoteProtocolError("malformed restoreBlob record")
    if rest[0]:
        return blob, rest[9:], rest[1:9]
    return blob, rest[1:], None
