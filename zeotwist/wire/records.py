"""The store stream: the records a client sends for one transaction.

The stream travels in ``StoreData`` pieces cut anywhere; the server spools
it and parses it at vote time with :func:`iter_records`.  Layout::

    b"s" oid(8) serial(8) length(>I) data   store a revision
    b"c" oid(8) serial(8)                   checkCurrentSerialInTransaction

Pure: no I/O beyond the file-like object handed in.
"""
import struct
from typing import BinaryIO, Iterator

from zeotwist.errors import RemoteProtocolError

STORE, CHECK = b"s", b"c"
_STORE_HEAD = struct.Struct(">c8s8sI")
_CHECK = struct.Struct(">c8s8s")


def encode_store(oid: bytes, serial: bytes, data: bytes) -> bytes:
    return _STORE_HEAD.pack(STORE, oid, serial, len(data)) + data


def encode_check(oid: bytes, serial: bytes) -> bytes:
    return _CHECK.pack(CHECK, oid, serial)


def iter_records(f: BinaryIO) -> Iterator[tuple[bytes, bytes, bytes, bytes | None]]:
    """Yield ``(kind, oid, serial, data)`` (data None for checks) from ``f``.

    Raises RemoteProtocolError on a truncated or unknown record.
    """
    read = f.read
    head_size = _STORE_HEAD.size - 1
    while True:
        kind = read(1)
        if not kind:
            return
        if kind == STORE:
            head = read(head_size)
            if len(head) != head_size:
                raise RemoteProtocolError("truncated store record")
            _, oid, serial, length = _STORE_HEAD.unpack(kind + head)
            data = read(length)
            if len(data) != length:
                raise RemoteProtocolError("truncated store data")
            yield STORE, oid, serial, data
        elif kind == CHECK:
            body = read(16)
            if len(body) != 16:
                raise RemoteProtocolError("truncated check record")
            yield CHECK, body[:8], body[8:], None
        else:
            raise RemoteProtocolError("unknown record kind %r" % kind)
