"""The commit's frames, framed and read without AMP's machinery.

Every commit sends ``TpcBegin``, ``StoreData`` and the ``Vote`` and
``Finish`` questions (the client frames them here; a small commit's first
three go in one burst), the server answers the Vote and Finish and sends
``Invalidate`` to the other clients, and a blob goes up as thousands of
one-way ``StoreBlobChunk`` boxes: too frequent for AMP's generic argument
encoding and its Deferreds.  Both ends use this module for them (the
LoadBefore frames are :mod:`zeotwist.wire.loadframes`); the constant
pieces are built at import from the declarations
(:mod:`zeotwist.wire.boxlayout`), and tests/test_wire_fast.py checks every
frame byte for byte against AMP's own serializer and parses each one back
through the command's declaration.

The server reads those frames two ways: ``read_*`` takes a box AMP's
parser built, and :func:`match_commit_question` recognises exactly the
client's TpcBegin, StoreData, Vote and Finish frames at an offset of the
received bytes and returns their variable fields, so the server handles
them without building an AMP box key by key
(:meth:`zeotwist.server.fastpath.FastAnswers.fast_frame`).  Anything else -
another command, ``can_resolve=False``, a restore's ``TpcBegin``, a long
entry, a frame not whole yet - is None: AMP's parser reads it as before.
tests/test_commit_frames.py checks that each frame read so is the box
AMP's parser reads from the same bytes.

Pure functions; no I/O.
"""
from twisted.protocols import amp

from zeotwist.errors import UsageError
from zeotwist.wire import commands as C
from zeotwist.wire.boxlayout import MAX_LONG_VALUE, MAX_VALUE, box_fields, box_template
from zeotwist.wire.boxlayout import expect_slots, u16 as _H, u32 as _I


# -- StoreBlobChunk -----------------------------------------------------------------
_CHUNK = C.StoreBlobChunk
_CHUNK_FRAME, slots = box_template(box_fields(
    _CHUNK.arguments, amp.COMMAND, {amp.COMMAND: _CHUNK.commandName}))
expect_slots(slots, b"blob", b"data")
_CHUNK_KEYS = frozenset({amp.COMMAND} | {name for name, _ in _CHUNK.arguments})


_CHUNK_LONG, slots = box_template(box_fields(
    _CHUNK.arguments, amp.COMMAND, {amp.COMMAND: _CHUNK.commandName}), b"data")
expect_slots(slots, b"blob", b"data")


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
    anything else (which then takes AMP's validating path).  ``data`` may
    be :data:`SPOOLED`: the receiver has written it already
    (:func:`store_blob_chunk_head`)."""
    if len(box) != 3 or box.keys() != _CHUNK_KEYS \
            or box[amp.COMMAND] != _CHUNK.commandName:
        return None
    blob = box[b"blob"]
    if not (blob.isdigit() and len(blob) < 10):
        return None
    return int(blob), box[b"data"]


class _Spooled(bytes):
    """The type of :data:`SPOOLED` (an empty ``bytes`` of its own identity)."""


#: The ``data`` of a StoreBlobChunk whose bytes the receiver wrote out as
#: they arrived (a long entry given to a sink), instead of holding them.
SPOOLED = _Spooled()


def store_blob_chunk_head(box, key: bytes) -> int | None:
    """The blob file number of a plain StoreBlobChunk whose long ``data``
    entry (``key``) begins after the keys ``box`` has so far (AMP's order:
    ``_command``, ``blob``, ``data``); None for anything else."""
    if key != b"data" or len(box) != 2 or box.get(amp.COMMAND) != _CHUNK.commandName:
        return None
    blob = box.get(b"blob")
    if blob is None or not (blob.isdigit() and len(blob) < 10):
        return None
    return int(blob)


# -- StoreData ----------------------------------------------------------------------
_STORE = C.StoreData
_STORE_FRAME, slots = box_template(box_fields(
    _STORE.arguments, amp.COMMAND, {amp.COMMAND: _STORE.commandName}))
expect_slots(slots, b"data")
_STORE_LONG, slots = box_template(box_fields(
    _STORE.arguments, amp.COMMAND, {amp.COMMAND: _STORE.commandName}), b"data")
expect_slots(slots, b"data")
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
_BEGIN_FRAME, slots = box_template(box_fields(
    _BEGIN.arguments, amp.COMMAND, {amp.COMMAND: _BEGIN.commandName}, (b"tid", b"status")))
expect_slots(slots, b"description", b"extension", b"user")
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
_VOTE_FRAME, slots = box_template(box_fields(
    C.Vote.arguments, amp.ASK, {amp.COMMAND: C.Vote.commandName, b"can_resolve": b"True"}))
expect_slots(slots, amp.ASK)
_FINISH_FRAME, slots = box_template(box_fields(
    C.Finish.arguments, amp.ASK, {amp.COMMAND: C.Finish.commandName}))
expect_slots(slots, amp.ASK)


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
_VOTED, slots = box_template(box_fields(
    C.Vote.response, amp.ANSWER, {b"conflicts": b""}, (b"to_resolve", b"current")))
expect_slots(slots, amp.ANSWER, b"resolved")
_VOTED_KEYS = frozenset((amp.ANSWER, b"conflicts", b"resolved"))
_FINISHED, slots = box_template(box_fields(C.Finish.response, amp.ANSWER, {}))
expect_slots(slots, amp.ANSWER, b"tid")
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
_INVALIDATE_FRAME, slots = box_template(box_fields(
    _INVALIDATE.arguments, amp.COMMAND, {amp.COMMAND: _INVALIDATE.commandName}))
expect_slots(slots, b"oids", b"tid")


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


del slots


# -- the client's questions read from the bytes (the server's side) ------------------
#: what :func:`match_commit_question` found
BEGIN, STORE, VOTE, FINISH = "TpcBegin", "StoreData", "Vote", "Finish"

_ASK = _VOTE_FRAME[0]               # the questions' first key: ``_ask``
assert _ASK == _FINISH_FRAME[0]
_VOTE_REST, _FINISH_REST = _VOTE_FRAME[1], _FINISH_FRAME[1]
_STORE_HEAD, _STORE_REST = _STORE_FRAME[0], _STORE_FRAME[1:]
_BEGIN_HEAD, _BEGIN_REST = _BEGIN_FRAME[0], _BEGIN_FRAME[1:]


def match_commit_question(buf: bytes, off: int) -> tuple | None:
    """``(kind, fields, end)`` when ``buf`` holds at ``off`` a whole frame
    of :data:`BEGIN` (fields: user, description, extension), :data:`STORE`
    (the piece), :data:`VOTE` (the tag; ``can_resolve`` true) or
    :data:`FINISH` (the tag) as the functions above frame it,
    ``end`` where it stops; None for anything else."""
    if buf.startswith(_ASK, off):
        p = off + len(_ASK)
        if len(buf) < p + 2:
            return None
        q = p + 2 + ((buf[p] << 8) | buf[p + 1])
        if buf.startswith(_VOTE_REST, q):
            return VOTE, buf[p + 2:q], q + len(_VOTE_REST)
        if buf.startswith(_FINISH_REST, q):
            return FINISH, buf[p + 2:q], q + len(_FINISH_REST)
        return None
    if buf.startswith(_STORE_HEAD, off):
        found = _values(buf, off + len(_STORE_HEAD), _STORE_REST)
        return found and (STORE, found[0][0], found[1])
    if buf.startswith(_BEGIN_HEAD, off):
        found = _values(buf, off + len(_BEGIN_HEAD), _BEGIN_REST)
        if found is None:
            return None
        (description, extension, user), end = found
        return BEGIN, (user, description, extension), end
    return None


def _values(buf: bytes, p: int, pieces: tuple) -> tuple | None:
    """``(values, end)``: the variable values (2-byte length, bytes) at
    ``p``, each followed by its constant piece; None if one does not match
    or the frame is not whole."""
    values = []
    for piece in pieces:
        if len(buf) < p + 2:
            return None
        q = p + 2 + ((buf[p] << 8) | buf[p + 1])
        if not buf.startswith(piece, q):
            return None
        values.append(buf[p + 2:q])
        p = q + len(piece)
    return values, p
