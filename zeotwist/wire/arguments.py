"""AMP argument types for zeotwist: 8-byte ids, large byte strings, id lists.

Runs wherever the protocol runs (the reactor thread).  Every decoder checks
lengths, so a malformed value from a peer raises :class:`RemoteProtocolError`
while the box is being parsed, before any storage code sees it.
"""
from twisted.protocols import amp

from zeotwist.errors import RemoteProtocolError, UsageError
from zeotwist.fileio import FilePiece
from zeotwist.twistedcompat import amp_decode_fields, amp_encode_fields

CHUNK = amp.MAX_VALUE_LENGTH


class Id8(amp.Argument):
    """An object id or transaction id: exactly 8 bytes."""

    def fromString(self, inString: bytes) -> bytes:
        if len(inString) != 8:
            raise RemoteProtocolError(
                "expected an 8-byte id, got %d bytes" % len(inString))
        return inString

    def toString(self, inObject: bytes) -> bytes:
        if not isinstance(inObject, bytes) or len(inObject) != 8:
            raise ValueError("ids are 8 bytes, not %r" % (inObject,))
        return inObject


class BigBytes(amp.Argument):
    """A byte string of any size, split over the keys ``name``, ``name.1``, ...

    AMP limits one value to 65,535 bytes; the pieces travel in the same box,
    so a large value still costs one message.  The size of a whole box is
    bounded by the receiving protocol (:mod:`zeotwist.wire.framing`).
    """

    def toBox(self, name, strings, objects, proto):
        value = objects.pop(name.decode("ascii"), None)
        if value is None and self.optional:
            return
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise UsageError("%s must be bytes" % name.decode("ascii"))
        if len(value) <= CHUNK:
            strings[name] = bytes(value)
            return
        view = memoryview(value)
        strings[name] = bytes(view[:CHUNK])
        for i, off in enumerate(range(CHUNK, len(value), CHUNK), 1):
            strings[b"%s.%d" % (name, i)] = bytes(view[off:off + CHUNK])

    def fromBox(self, name, strings, objects, proto):
        first = strings.pop(name, None)
        if first is None:
            if self.optional:
                objects[name.decode("ascii")] = None
                return
            raise RemoteProtocolError("missing argument %r" % name)
        parts, i = [first], 1
        while True:
            part = strings.pop(b"%s.%d" % (name, i), None)
            if part is None:
                break
            parts.append(part)
            i += 1
        objects[name.decode("ascii")] = (
            first if len(parts) == 1 else b"".join(parts))


_LONG_TYPES = (bytes, FilePiece)


class LongBytes(BigBytes):
    """``BigBytes`` that goes as one value, a long entry
    (:mod:`zeotwist.wire.boxlayout`), to a peer that reads them (``proto.long_values``)
    instead of being cut into 64 KiB pieces; the receiver sees the same box.
    The value may be a :class:`~zeotwist.fileio.FilePiece` (to such a peer
    only), sent from its file."""

    def toBox(self, name, strings, objects, proto):
        value = objects.get(name.decode("ascii"))
        if getattr(proto, "long_values", False) and type(value) in _LONG_TYPES \
                and len(value) > CHUNK:
            del objects[name.decode("ascii")]
            strings[name] = value           # BoundedAMP.sendBox frames it
            return
        BigBytes.toBox(self, name, strings, objects, proto)


class IdList(BigBytes):
    """A list of 8-byte ids, packed end to end."""

    def toBox(self, name, strings, objects, proto):
        key = name.decode("ascii")
        objects[key] = b"".join(objects[key])
        BigBytes.toBox(self, name, strings, objects, proto)

    def fromBox(self, name, strings, objects, proto):
        BigBytes.fromBox(self, name, strings, objects, proto)
        key = name.decode("ascii")
        objects[key] = split_ids(objects[key])


def split_ids(packed: bytes) -> list[bytes]:
    """Split a packed id string into 8-byte ids, rejecting a ragged tail."""
    if len(packed) % 8:
        raise RemoteProtocolError(
            "id list of %d bytes is not a multiple of 8" % len(packed))
    return [packed[i:i + 8] for i in range(0, len(packed), 8)]


class BoxList(BigBytes):
    """A list of small boxes, each typed by ``arglist``, sent as one BigBytes.

    Each item is a dict encoded with ``arglist`` exactly as an AMP command's
    arguments are (so an item may hold ``Id8``, ``BigBytes``, optional
    fields, ...) and serialized as an AMP box; the boxes are concatenated.
    Lists of records (history entries, iterator batches) thus travel typed,
    without pickles, and may exceed AMP's 64 KiB per value.
    """

    def __init__(self, arglist, optional=False):
        super().__init__(optional=optional)
        self.arglist = list(arglist)

    def toBox(self, name, strings, objects, proto):
        key = name.decode("ascii")
        items = objects.get(key)
        if items is None and self.optional:
            objects.pop(key, None)
            return
        parts = []
        for item in items:
            box = amp_encode_fields(item, self.arglist, proto)
            parts.append(box.serialize())
        objects[key] = b"".join(parts)
        BigBytes.toBox(self, name, strings, objects, proto)

    def fromBox(self, name, strings, objects, proto):
        BigBytes.fromBox(self, name, strings, objects, proto)
        key = name.decode("ascii")
        packed = objects[key]
        if packed is None:
            return
        objects[key] = [amp_decode_fields(box, self.arglist, proto)
                        for box in split_boxes(packed)]


def split_boxes(packed: bytes) -> list:
    """Parse concatenated AMP boxes; RemoteProtocolError if malformed."""
    boxes, box = [], {}
    off, n = 0, len(packed)
    while off < n:
        if n - off < 2:
            raise RemoteProtocolError("truncated box list")
        klen = (packed[off] << 8) | packed[off + 1]
        off += 2
        if klen == 0:
            boxes.append(box)
            box = {}
            continue
        if klen > amp.MAX_KEY_LENGTH or n - off < klen + 2:
            raise RemoteProtocolError("malformed box list")
        key = packed[off:off + klen]
        off += klen
        vlen = (packed[off] << 8) | packed[off + 1]
        off += 2
        if n - off < vlen:
            raise RemoteProtocolError("truncated box list value")
        box[key] = packed[off:off + vlen]
        off += vlen
    if box:
        raise RemoteProtocolError("unterminated box in box list")
    return boxes
