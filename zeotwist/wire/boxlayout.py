"""The layout of an AMP box, and the templates the fast frames are built from.

AMP's box format: for each key in sorted order, a 2-byte big-endian length
and the key, a 2-byte length and the value; then two zero bytes.  A fast
frame (:mod:`zeotwist.wire.loadframes`, :mod:`zeotwist.wire.commitframes`)
is a box of one command whose keys are known: :func:`box_template` turns
the declaration in :mod:`zeotwist.wire.commands` (command name, argument
and response names, the 8-byte ``Id8`` fields) into the box's constant
pieces around its variable values, at import, so a declaration that no
longer fits a fast frame fails the import, not a peer.

Long entries: AMP limits a value to 65,535 bytes, so AMP's own path
(``BigBytes``) cuts a 10 MB record into 160 keys that the receiver joins
again.  Between peers that both declared ``long_values`` in ``Register``,
a value longer than that travels as one *long entry* in place of the
key/value pair::

    FF FF  key-length(2)  key  value-length(4, big-endian)  value

A key length of 0xFFFF never starts an AMP entry (keys are at most 255
bytes), so nothing else can be mistaken for one.  The receiver
(:mod:`zeotwist.wire.framing`) counts the value against its box bounds
before buffering it and refuses a long entry of 65,535 bytes or less (AMP's
own form is the only form of a short value).  The fast frames use a long
entry for LoadBefore's ``data``, StoreData's ``data`` and StoreBlobChunk's
``data``; :func:`box_parts` serializes any other box with its long values
(``LongBytes``) so; every other big value keeps AMP's path.

Pure functions; no I/O.
"""
import struct

from twisted.protocols import amp

from zeotwist.errors import UsageError
from zeotwist.fileio import FilePiece
from zeotwist.wire.arguments import BigBytes, Id8

#: The most bytes one AMP value holds; a longer record takes AMP's own path.
MAX_VALUE = amp.MAX_VALUE_LENGTH

#: A 2-byte and a 4-byte big-endian length.
u16 = struct.Struct(">H").pack
u32 = struct.Struct(">I").pack
_H, _I = u16, u32
_FIXED = object()         # a field of 8 bytes (Id8)
_ANY = object()           # a field of any length below MAX_VALUE

#: The key length that introduces a long entry (above AMP's 255-byte keys).
LONG_MARK = 0xFFFF
#: The most bytes a long entry's value may announce (its 4-byte length).
MAX_LONG_VALUE = 2**32 - 1


def _field_spec(argument) -> object:
    if isinstance(argument, Id8):
        return _FIXED
    if isinstance(argument, (BigBytes, amp.Integer, amp.String)):
        return _ANY
    raise UsageError("no fast encoding for %r" % (argument,))


def box_fields(declared, tag: bytes, constants: dict, leave_out=()) -> dict:
    """The box's fields: ``tag`` (``_ask``/``_answer``, any length), the
    declared fields by their type, ``constants`` (name -> fixed value) in
    place of theirs, minus ``leave_out``."""
    fields = {tag: _ANY}
    names = {name for name, _ in declared}
    for name, argument in declared:
        if name not in leave_out:
            fields[name] = constants[name] if name in constants else _field_spec(argument)
    unknown = (set(constants) | set(leave_out)) - names - {amp.COMMAND}
    if unknown:
        raise UsageError("not declared: %s" % sorted(unknown))
    if amp.COMMAND in constants:
        fields[amp.COMMAND] = constants[amp.COMMAND]
    return fields


def box_template(fields: dict, long_key: bytes | None = None) -> tuple[tuple, tuple]:
    """``(constants, slots)``: the box in AMP's order as constant pieces
    around its variable values; ``slots`` names those values in order.
    ``long_key``'s value is a long entry (the caller writes its 4-byte
    length and the value)."""
    pieces, slots, current = [], [], b""
    for key in sorted(fields):
        spec = fields[key]
        if key == long_key:
            if spec is not _ANY:
                raise TypeError("a long entry must be a variable field, not %r" % key)
            current += _H(LONG_MARK) + _H(len(key)) + key
            pieces.append(current)
            slots.append(key)
            current = b""
            continue
        current += _H(len(key)) + key
        if isinstance(spec, bytes):
            current += _H(len(spec)) + spec
            continue
        if spec is _FIXED:
            current += _H(8)
        pieces.append(current)
        slots.append(key)
        current = b""
    pieces.append(current + b"\0\0")
    return tuple(pieces), tuple(slots)


def expect_slots(slots: tuple, *names: bytes) -> None:
    """Fails unless ``slots`` are ``names``, in the order the caller's
    frame functions fill them."""
    if slots != names:
        raise UsageError("fast frame out of step with commands.py: %r != %r" % (slots, names))


def box_parts(box) -> tuple:
    """``(head, value, tail)``: the AMP box ``box`` serialized with its
    values over 64 KiB as long entries (a peer that reads them), ``value``
    being the first of those (written as is: ``BoundedAMP.emit_parts``; it
    may be a ``FilePiece``, sent from its file); checked as
    ``AmpBox.serialize`` checks.  Used for answers whose value
    is declared ``LongBytes`` (``LoadBlobChunk``)."""
    parts, big = [], None
    for key, value in sorted(box.items()):
        if type(key) is not bytes or type(value) is not bytes and (
                type(value) is not FilePiece or big is not None or len(value) <= MAX_VALUE):
            raise TypeError("AMP keys and values are bytes: %r" % (key,))
        if not 0 < len(key) <= amp.MAX_KEY_LENGTH:
            raise amp.TooLong(True, True, key, None)
        if len(value) <= MAX_VALUE:
            parts += (_H(len(key)), key, _H(len(value)), value)
        elif len(value) > MAX_LONG_VALUE:
            raise amp.TooLong(False, True, value, key)
        elif big is None:
            parts += (_H(LONG_MARK), _H(len(key)), key, _I(len(value)))
            big = len(parts)
            parts.append(value)
        else:
            parts += (_H(LONG_MARK), _H(len(key)), key, _I(len(value)), value)
    parts.append(b"\0\0")
    if big is None:
        return b"".join(parts), b"", b""
    return b"".join(parts[:big]), parts[big], b"".join(parts[big + 1:])


def long_entry(key: bytes, value: bytes) -> bytes:
    """One long entry (tests and documentation; the fast frames inline it)."""
    return b"".join((_H(LONG_MARK), _H(len(key)), key, _I(len(value)), value))

