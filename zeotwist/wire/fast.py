"""The hot paths of the wire format, framed and read without AMP's machinery.

These exchanges are too frequent for AMP's generic argument encoding and
its Deferreds: ``LoadBefore`` (every cache miss; the client frames the
request and reads the answer, the server reads the request and frames the
answer), ``TpcBegin``, ``StoreData`` and ``Invalidate`` (every commit; the
client frames TpcBegin, StoreData and the Vote and Finish questions, the
server reads TpcBegin and StoreData and frames Invalidate) and
``StoreBlobChunk`` (thousands of boxes per blob; the client frames, the
server reads).  Both ends use only this module for them, and
tests/test_wire_fast.py checks every frame byte for byte against AMP's own
serializer (``Command.makeArguments``/``makeResponse``, ``AmpBox.serialize``)
and parses each one back through the command's declaration.

AMP's box format: for each key in sorted order, a 2-byte big-endian length
and the key, a 2-byte length and the value; then two zero bytes.  The
constant parts of each box below are built at import from the declarations
in :mod:`zeotwist.wire.commands` (command name, argument and response
names, the 8-byte ``Id8`` fields): a declaration that no longer fits a fast
path fails the import, not a peer.

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
own form is the only form of a short value).  Frames here use a long entry
for LoadBefore's ``data`` and StoreData's ``data``; every other command's
big values keep AMP's path.

Pure functions; no I/O.
"""
import struct

from twisted.protocols import amp

from zeotwist.errors import UsageError
from zeotwist.wire import commands as C
from zeotwist.wire.arguments import BigBytes, Id8

#: The most bytes one AMP value holds; a longer record takes AMP's own path.
MAX_VALUE = amp.MAX_VALUE_LENGTH

_H = struct.Struct(">H").pack
_I = struct.Struct(">I").pack
_FIXED = object()         # a field of 8 bytes (Id8)
_ANY = object()           # a field of any length below MAX_VALUE

#: The key length that introduces a long entry (above AMP's 255-byte keys).
LONG_MARK = 0xFFFF
#: The most bytes a long entry's value may announce (its 4-byte length).
MAX_LONG_VALUE = 2**32 - 1


def _spec(argument) -> object:
    if isinstance(argument, Id8):
        return _FIXED
    if isinstance(argument, (BigBytes, amp.Integer, amp.String)):
        return _ANY
    raise UsageError("no fast encoding for %r" % (argument,))


def _fields(declared, tag: bytes, constants: dict, leave_out=()) -> dict:
    """The box's fields: ``tag`` (``_ask``/``_answer``, any length), the
    declared fields by their type, ``constants`` (name -> fixed value) in
    place of theirs, minus ``leave_out``."""
    fields = {tag: _ANY}
    names = {name for name, _ in declared}
    for name, argument in declared:
        if name not in leave_out:
            fields[name] = constants[name] if name in constants else _spec(argument)
    unknown = (set(constants) | set(leave_out)) - names - {amp.COMMAND}
    if unknown:
        raise UsageError("not declared: %s" % sorted(unknown))
    if amp.COMMAND in constants:
        fields[amp.COMMAND] = constants[amp.COMMAND]
    return fields


def _template(fields: dict, long_key: bytes | None = None) -> tuple[tuple, tuple]:
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


def _expect(slots: tuple, *names: bytes) -> None:
    """The functions below fill the slots in this order."""
    if slots != names:
        raise UsageError("fast frame out of step with commands.py: %r != %r" % (slots, names))


# -- LoadBefore --------------------------------------------------------------------
_LOAD = C.LoadBefore
_REQUEST, slots = _template(_fields(
    _LOAD.arguments, amp.ASK, {amp.COMMAND: _LOAD.commandName}))
_expect(slots, amp.ASK, b"oid", b"tid")
_MISSING, slots = _template(_fields(
    _LOAD.response, amp.ANSWER, {b"found": b"False"},
    (b"data", b"start", b"end", b"prefetch")))
_expect(slots, amp.ANSWER)
_CURRENT, slots = _template(_fields(
    _LOAD.response, amp.ANSWER, {b"found": b"True"}, (b"end", b"prefetch")))
_expect(slots, amp.ANSWER, b"data", b"start")
_REPLACED, slots = _template(_fields(
    _LOAD.response, amp.ANSWER, {b"found": b"True"}, (b"prefetch",)))
_expect(slots, amp.ANSWER, b"data", b"end", b"start")
# with reference prefetch (zeotwist.wire.prefetch): the same, plus its value
_CURRENT_P, slots = _template(_fields(
    _LOAD.response, amp.ANSWER, {b"found": b"True"}, (b"end",)))
_expect(slots, amp.ANSWER, b"data", b"prefetch", b"start")
_REPLACED_P, slots = _template(_fields(_LOAD.response, amp.ANSWER, {b"found": b"True"}))
_expect(slots, amp.ANSWER, b"data", b"end", b"prefetch", b"start")
# (long entry, replaced, prefetch) -> the answer's template; long: data is one
# long entry (a client that declared long_values)
_LOAD_ANSWERS = {}
for _long in (False, True):
    for _replaced in (False, True):
        for _prefetch in (False, True):
            _out = ((() if _replaced else (b"end",)) + (() if _prefetch else (b"prefetch",)))
            _LOAD_ANSWERS[_long, _replaced, _prefetch], slots = _template(_fields(
                _LOAD.response, amp.ANSWER, {b"found": b"True"}, _out),
                b"data" if _long else None)
            _expect(slots, *((amp.ANSWER, b"data") + ((b"end",) if _replaced else ())
                             + ((b"prefetch",) if _prefetch else ()) + (b"start",)))
assert _LOAD_ANSWERS[False, False, False] == _CURRENT \
    and _LOAD_ANSWERS[False, True, True] == _REPLACED_P
del _long, _replaced, _prefetch, _out
_REQUEST_KEYS = frozenset({amp.ASK, amp.COMMAND} | {name for name, _ in _LOAD.arguments})


def load_before_request(tag: bytes, oid: bytes, tid: bytes) -> bytes:
    """The LoadBefore question ``tag`` (``oid`` and ``tid``: 8 bytes each,
    which the caller has checked)."""
    c = _REQUEST
    return b"".join((c[0], _H(len(tag)), tag, c[1], oid, c[2], tid, c[3]))


def match_load_before_request(buf: bytes, off: int) -> tuple | None:
    """``(tag, oid, tid, end)`` when ``buf`` holds at ``off`` a whole
    LoadBefore question as :func:`load_before_request` frames it (bytes that
    AMP's parser reads as that box, ``end`` where it stops); None for any
    other box, or one not whole yet: AMP's parser reads those."""
    c = _REQUEST
    if not buf.startswith(c[0], off):
        return None
    p = off + len(c[0])
    if len(buf) < p + 2:
        return None
    p2 = p + 2 + ((buf[p] << 8) | buf[p + 1])
    oid_at = p2 + len(c[1])
    tid_at = oid_at + 8 + len(c[2])
    end = tid_at + 8 + len(c[3])
    if len(buf) < end or not buf.startswith(c[1], p2) \
            or not buf.startswith(c[2], oid_at + 8) or not buf.startswith(c[3], tid_at + 8):
        return None
    return buf[p + 2:p2], buf[oid_at:oid_at + 8], buf[tid_at:tid_at + 8], end


def read_load_before_request(box) -> tuple | None:
    """``(tag, oid, tid)`` of a plain LoadBefore box, or None for anything
    else (which then takes AMP's validating path)."""
    if len(box) != 4 or box.keys() != _REQUEST_KEYS \
            or box[amp.COMMAND] != _LOAD.commandName:
        return None
    oid, tid = box[b"oid"], box[b"tid"]
    if len(oid) != 8 or len(tid) != 8:
        return None
    return box[amp.ASK], oid, tid


def load_before_answer(tag: bytes, record, prefetched: bytes | None = None,
                       long_values: bool = False) -> bytes | None:
    """The answer to LoadBefore ``tag``: ``record`` is ``(data, start, end)``
    or None (not found); ``prefetched``, a ``prefetch`` value (at most
    ``MAX_VALUE`` bytes) or None.  ``data`` over one AMP value goes as a
    long entry when ``long_values`` (the client declared them); else None
    (AMP's path splits it)."""
    if record is None:
        c = _MISSING
        return b"".join((c[0], _H(len(tag)), tag, c[1]))
    parts = load_before_answer_parts(tag, record, prefetched, long_values)
    return None if parts is None else b"".join(parts)   # the record copied once


def load_before_answer_parts(tag: bytes, record, prefetched: bytes | None = None,
                             long_values: bool = False) -> tuple | None:
    """The answer to LoadBefore ``tag`` for a found ``record`` as three
    pieces, ``(head, data, tail)``, whose concatenation is
    :func:`load_before_answer`'s frame: a big record can then be written
    without being copied into a frame (``BoundedAMP.emit_parts``)."""
    data, start, end = record
    size = len(data)
    if size <= MAX_VALUE:
        head, long = _H(size), False
    elif long_values and size <= MAX_LONG_VALUE:
        head, long = _I(size), True
    else:
        return None
    # the slots in AMP's key order: _answer, data, [end], [prefetch], start
    c = _LOAD_ANSWERS[long, end is not None, prefetched is not None]
    tail = [c[2]]
    i = 3
    if end is not None:
        tail += (end, c[i])
        i += 1
    if prefetched is not None:
        tail += (_H(len(prefetched)), prefetched, c[i])
        i += 1
    tail += (start, c[i])
    return b"".join((c[0], _H(len(tag)), tag, c[1], head)), data, b"".join(tail)


def match_load_before_answer(buf: bytes, off: int) -> tuple | None:
    """``(tag, record, end)`` when ``buf`` holds at ``off`` a whole answer
    to LoadBefore ``tag`` as :func:`load_before_answer` frames one without
    prefetched records or long entries (``record``: ``(data, start, end)``,
    or None: not found); None for anything else or an answer not whole yet
    (AMP's parser reads those)."""
    c, n = _CURRENT, len(buf)
    if not buf.startswith(c[0], off):
        return None
    at = off + len(c[0])
    if n < at + 2:
        return None
    tag_at = at + 2
    at = tag_end = tag_at + ((buf[at] << 8) | buf[at + 1])
    if buf.startswith(_MISSING[1], at):
        return buf[tag_at:tag_end], None, at + len(_MISSING[1])
    data_at = at + len(c[1]) + 2
    if n < data_at or not buf.startswith(c[1], at):
        return None
    data_end = data_at + ((buf[data_at - 2] << 8) | buf[data_at - 1])
    at, end_tid = data_end, None
    if buf.startswith(_REPLACED[2], at):
        at += len(_REPLACED[2]) + 8
        end_tid = buf[at - 8:at]
    start_at = at + len(c[2])
    stop = start_at + 8 + len(c[3])
    if n < stop or not buf.startswith(c[2], at) or not buf.startswith(c[3], start_at + 8):
        return None
    return (buf[tag_at:tag_end], (buf[data_at:data_end], buf[start_at:start_at + 8], end_tid),
            stop)


def match_load_before_long_head(buf: bytes, off: int) -> tuple | None:
    """``(tag, size, at)`` when ``buf`` holds at ``off`` the head of an
    answer to LoadBefore ``tag`` whose record is a long entry (as
    :func:`load_before_answer_parts` frames one for a peer that reads them)
    of ``size`` bytes, starting at ``at``; ``()`` for the start of such a
    head, not whole yet; None for anything else.  The head is the same
    whatever follows the record."""
    c, n = _LOAD_ANSWERS[True, False, False], len(buf)
    if not buf.startswith(c[0], off):
        return () if c[0].startswith(buf[off:]) else None
    at = off + len(c[0])
    if n < at + 2:
        return ()
    tag_at = at + 2
    tag_end = tag_at + ((buf[at] << 8) | buf[at + 1])
    size_at = tag_end + len(c[1])
    if n < tag_end:
        return ()
    if not c[1].startswith(buf[tag_end:size_at]):
        return None
    if n < size_at + 4:
        return ()
    return buf[tag_at:tag_end], int.from_bytes(buf[size_at:size_at + 4], "big"), size_at + 4


def read_load_before_answer(box, proto) -> tuple | None:
    """``(data, start, end)`` or None from a LoadBefore answer box; raises
    on a malformed one (a record over 64 KiB is read through the declaration)."""
    if box.get(b"found") != b"True":
        return None
    if b"data.1" in box:        # AMP's path: the record cut into pieces
        r = _LOAD.parseResponse(box, proto)
        return r["data"], r["start"], r["end"]
    start, end = box[b"start"], box.get(b"end")
    if len(start) != 8 or (end is not None and len(end) != 8):
        raise ValueError("tids must be 8 bytes")
    return box[b"data"], start, end


# -- StoreBlobChunk -----------------------------------------------------------------
_CHUNK = C.StoreBlobChunk
_CHUNK_FRAME, slots = _template(_fields(
    _CHUNK.arguments, amp.COMMAND, {amp.COMMAND: _CHUNK.commandName}))
_expect(slots, b"blob", b"data")
_CHUNK_KEYS = frozenset({amp.COMMAND} | {name for name, _ in _CHUNK.arguments})


_CHUNK_LONG, slots = _template(_fields(
    _CHUNK.arguments, amp.COMMAND, {amp.COMMAND: _CHUNK.commandName}), b"data")
_expect(slots, b"blob", b"data")


def store_blob_chunk(number: int, data: bytes, long_values: bool = False) -> bytes:
    """The one-way StoreBlobChunk of blob file ``number``: ``data`` at most
    ``BLOB_CHUNK`` bytes, or ``BLOB_CHUNK_LONG`` in a long entry when
    ``long_values`` (the server declared them)."""
    blob = b"%d" % number
    if len(data) <= MAX_VALUE:
        c, head = _CHUNK_FRAME, _H(len(data))
    elif long_values:
        c, head = _CHUNK_LONG, _I(len(data))
    else:
        raise UsageError("a blob chunk over one AMP value needs long entries")
    return b"".join((c[0], _H(len(blob)), blob, c[1], head, data, c[2]))


def read_store_blob_chunk(box) -> tuple | None:
    """``(number, data)`` of a plain StoreBlobChunk box, or None for
    anything else (which then takes AMP's validating path)."""
    if len(box) != 3 or box.keys() != _CHUNK_KEYS \
            or box[amp.COMMAND] != _CHUNK.commandName:
        return None
    blob = box[b"blob"]
    if not (blob.isdigit() and len(blob) < 10):
        return None
    return int(blob), box[b"data"]


# -- StoreData ----------------------------------------------------------------------
_STORE = C.StoreData
_STORE_FRAME, slots = _template(_fields(
    _STORE.arguments, amp.COMMAND, {amp.COMMAND: _STORE.commandName}))
_expect(slots, b"data")
_STORE_LONG, slots = _template(_fields(
    _STORE.arguments, amp.COMMAND, {amp.COMMAND: _STORE.commandName}), b"data")
_expect(slots, b"data")
_STORE_KEYS = frozenset({amp.COMMAND} | {name for name, _ in _STORE.arguments})


def store_data(piece, long_values: bool = False) -> bytes | None:
    """The one-way StoreData of ``piece`` of the store stream (bytes, a
    bytearray or a memoryview: its bytes are copied once, into the frame).
    Over one AMP value it goes as a long entry when ``long_values`` (the
    server declared them); else None (AMP's path splits it)."""
    size = len(piece)
    if size <= MAX_VALUE:
        c, head = _STORE_FRAME, _H(size)
    elif long_values and size <= MAX_LONG_VALUE:
        c, head = _STORE_LONG, _I(size)
    else:
        return None
    return b"".join((c[0], head, piece, c[1]))


def read_store_data(box) -> bytes | None:
    """The piece of a plain StoreData box (its ``data``, plain, joined by
    the parser from a long entry, or None for AMP's split form and anything
    else, which then takes AMP's validating path)."""
    if len(box) != 2 or box.keys() != _STORE_KEYS \
            or box[amp.COMMAND] != _STORE.commandName:
        return None
    return box[b"data"]


# -- TpcBegin -----------------------------------------------------------------------
_BEGIN = C.TpcBegin
_BEGIN_FRAME, slots = _template(_fields(
    _BEGIN.arguments, amp.COMMAND, {amp.COMMAND: _BEGIN.commandName}, (b"tid", b"status")))
_expect(slots, b"description", b"extension", b"user")
_BEGIN_KEYS = frozenset({amp.COMMAND, b"user", b"description", b"extension"})


def tpc_begin(user: bytes, description: bytes, extension: bytes) -> bytes | None:
    """The one-way TpcBegin of an ordinary transaction (no restore tid or
    status); None when a field does not fit one AMP value (AMP's path)."""
    if len(user) > MAX_VALUE or len(description) > MAX_VALUE or len(extension) > MAX_VALUE:
        return None
    c = _BEGIN_FRAME
    return b"".join((c[0], _H(len(description)), description, c[1], _H(len(extension)),
                     extension, c[2], _H(len(user)), user, c[3]))


def read_tpc_begin(box) -> tuple | None:
    """``(user, description, extension)`` of a plain TpcBegin box, or None
    for anything else (a restore's tid or status, split fields), which then
    takes AMP's validating path."""
    if len(box) != 4 or box.keys() != _BEGIN_KEYS or box[amp.COMMAND] != _BEGIN.commandName:
        return None
    return box[b"user"], box[b"description"], box[b"extension"]


# -- Vote and Finish (the client's questions) ----------------------------------------
_VOTE_FRAME, slots = _template(_fields(
    C.Vote.arguments, amp.ASK, {amp.COMMAND: C.Vote.commandName, b"can_resolve": b"True"}))
_expect(slots, amp.ASK)
_FINISH_FRAME, slots = _template(_fields(
    C.Finish.arguments, amp.ASK, {amp.COMMAND: C.Finish.commandName}))
_expect(slots, amp.ASK)


def vote_request(tag: bytes) -> bytes:
    """The Vote question ``tag`` of a client that resolves conflicts itself
    when the server leaves them to it (``can_resolve=True``)."""
    c = _VOTE_FRAME
    return b"".join((c[0], _H(len(tag)), tag, c[1]))


def finish_request(tag: bytes) -> bytes:
    """The Finish question ``tag``."""
    c = _FINISH_FRAME
    return b"".join((c[0], _H(len(tag)), tag, c[1]))


# -- Vote and Finish (the server's answers) --------------------------------------------
# A vote without conflicts (its ``resolved`` oids packed, at most one AMP
# value) and a Finish's tid; anything else (conflicts, to_resolve, errors)
# takes AMP's path (``makeResponse``), and is read back by it.
_VOTED, slots = _template(_fields(
    C.Vote.response, amp.ANSWER, {b"conflicts": b""}, (b"to_resolve", b"current")))
_expect(slots, amp.ANSWER, b"resolved")
_VOTED_KEYS = frozenset((amp.ANSWER, b"conflicts", b"resolved"))
_FINISHED, slots = _template(_fields(C.Finish.response, amp.ANSWER, {}))
_expect(slots, amp.ANSWER, b"tid")
_FINISHED_KEYS = frozenset((amp.ANSWER, b"tid"))


def vote_answer(tag: bytes, resolved) -> bytes | None:
    """The answer ``tag`` to a Vote that succeeded, ``resolved`` being the
    oids whose data the server changed; None when they do not fit one value."""
    packed = b"".join(resolved)
    if len(packed) > MAX_VALUE:
        return None
    c = _VOTED
    return b"".join((c[0], _H(len(tag)), tag, c[1], _H(len(packed)), packed, c[2]))


def finish_answer(tag: bytes, tid: bytes) -> bytes:
    """The answer ``tag`` to a Finish that committed ``tid``."""
    c = _FINISHED
    return b"".join((c[0], _H(len(tag)), tag, c[1], tid, c[2]))


def read_vote_answer(box) -> dict | None:
    """Vote's parsed answer (as ``C.Vote.parseResponse`` makes it) from a
    plain successful one; None for anything else (AMP's path parses it)."""
    if len(box) != 3 or box.keys() != _VOTED_KEYS or box[b"conflicts"]:
        return None
    packed = box[b"resolved"]
    if len(packed) % 8:
        return None
    return {"resolved": [packed[i:i + 8] for i in range(0, len(packed), 8)],
            "conflicts": b""}


def read_finish_answer(box) -> dict | None:
    """Finish's parsed answer from a plain one; None for anything else."""
    if len(box) != 2 or box.keys() != _FINISHED_KEYS or len(box[b"tid"]) != 8:
        return None
    return {"tid": box[b"tid"]}


def match_vote_answer(buf: bytes, tag: bytes) -> dict | None:
    """:func:`read_vote_answer`'s dict when ``buf`` is exactly the frame
    :func:`vote_answer` makes for ``tag``, read from the bytes (a thread
    reading its own answer: zeotwist.client.threadreads); else None."""
    c = _VOTED
    head = len(c[0]) + 2 + len(tag) + len(c[1])
    if len(buf) < head + 2 + len(c[2]) or not buf.endswith(c[2]) \
            or buf[:head] != b"".join((c[0], _H(len(tag)), tag, c[1])):
        return None
    size = (buf[head] << 8) | buf[head + 1]
    if size % 8 or head + 2 + size + len(c[2]) != len(buf):
        return None
    return {"resolved": [buf[i:i + 8] for i in range(head + 2, head + 2 + size, 8)],
            "conflicts": b""}


def match_finish_answer(buf: bytes, tag: bytes) -> dict | None:
    """:func:`read_finish_answer`'s dict when ``buf`` is exactly the frame
    :func:`finish_answer` makes for ``tag``; else None."""
    c = _FINISHED
    head = len(c[0]) + 2 + len(tag) + len(c[1])
    if len(buf) != head + 8 + len(c[2]) or not buf.endswith(c[2]) \
            or buf[:head] != b"".join((c[0], _H(len(tag)), tag, c[1])):
        return None
    return {"tid": buf[head:head + 8]}


# -- Invalidate ---------------------------------------------------------------------
_INVALIDATE = C.Invalidate
_INVALIDATE_FRAME, slots = _template(_fields(
    _INVALIDATE.arguments, amp.COMMAND, {amp.COMMAND: _INVALIDATE.commandName}))
_expect(slots, b"oids", b"tid")


def invalidate(tid: bytes, oids) -> bytes | None:
    """The one-way Invalidate of ``oids`` (8 bytes each) by ``tid``; None
    when the packed list does not fit one AMP value (AMP's path splits it)."""
    packed = b"".join(oids)
    if len(packed) > MAX_VALUE or len(tid) != 8:
        return None
    c = _INVALIDATE_FRAME
    return b"".join((c[0], _H(len(packed)), packed, c[1], tid, c[2]))


_INVALIDATE_KEYS = frozenset({amp.COMMAND, b"tid", b"oids"})


def read_invalidate(box) -> tuple | None:
    """``(tid, oids)`` of a plain Invalidate box (its oids in one value),
    or None for anything else, which then takes AMP's validating path."""
    if len(box) != 3 or box.keys() != _INVALIDATE_KEYS \
            or box[amp.COMMAND] != _INVALIDATE.commandName:
        return None
    tid, packed = box[b"tid"], box[b"oids"]
    if len(tid) != 8 or len(packed) % 8:
        return None
    return tid, [packed[i:i + 8] for i in range(0, len(packed), 8)]


def match_invalidate(buf: bytes, off: int = 0) -> tuple | None:
    """``(tid, oids, end)`` when the frame :func:`invalidate` makes starts
    at ``off`` in ``buf`` and is whole (``end``: where it ends), read from
    the bytes (a thread reading the socket: zeotwist.client.commitreads);
    else None."""
    c = _INVALIDATE_FRAME
    start = off + len(c[0]) + 2
    if len(buf) < start or not buf.startswith(c[0], off):
        return None
    size = (buf[start - 2] << 8) | buf[start - 1]
    at = start + size + len(c[1])
    end = at + 8 + len(c[2])
    if size % 8 or len(buf) < end or not buf.startswith(c[1], start + size) \
            or not buf.startswith(c[2], at + 8):
        return None
    return buf[at:at + 8], [buf[i:i + 8] for i in range(start, start + size, 8)], end


def box_parts(box) -> tuple:
    """``(head, value, tail)``: the AMP box ``box`` serialized with its
    values over 64 KiB as long entries (a peer that reads them), ``value``
    being the first of those (written as is: ``BoundedAMP.emit_parts``);
    checked as ``AmpBox.serialize`` checks.  Used for answers whose value
    is declared ``LongBytes`` (``LoadBlobChunk``)."""
    parts, big = [], None
    for key, value in sorted(box.items()):
        if type(key) is not bytes or type(value) is not bytes:
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
    """One long entry (tests and documentation; the frames above inline it)."""
    return b"".join((_H(LONG_MARK), _H(len(key)), key, _I(len(value)), value))


del slots
