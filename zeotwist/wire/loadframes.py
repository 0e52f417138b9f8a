"""The LoadBefore frames, framed and read without AMP's machinery.

``LoadBefore`` is every cache miss: too frequent for AMP's generic argument
encoding and its Deferreds.  The client frames the request and reads the
answer, the server reads the request and frames the answer, both with this
module only (the commit's frames are :mod:`zeotwist.wire.commitframes`).
The constant pieces are built at import from the declaration
(:mod:`zeotwist.wire.boxlayout`), and tests/test_wire_fast.py checks every
frame byte for byte against AMP's own serializer
(``Command.makeArguments``/``makeResponse``, ``AmpBox.serialize``) and
parses each one back through the command's declaration.  A record over one
AMP value goes as a long entry to a peer that reads them.

Pure functions; no I/O.
"""
from twisted.protocols import amp

from zeotwist.wire import commands as C
from zeotwist.wire.boxlayout import MAX_LONG_VALUE, MAX_VALUE, box_fields, box_template
from zeotwist.wire.boxlayout import expect_slots, u16 as _H, u32 as _I


_LOAD = C.LoadBefore
_REQUEST, slots = box_template(box_fields(
    _LOAD.arguments, amp.ASK, {amp.COMMAND: _LOAD.commandName}))
expect_slots(slots, amp.ASK, b"oid", b"tid")
_MISSING, slots = box_template(box_fields(
    _LOAD.response, amp.ANSWER, {b"found": b"False"},
    (b"data", b"start", b"end", b"prefetch")))
expect_slots(slots, amp.ANSWER)
_CURRENT, slots = box_template(box_fields(
    _LOAD.response, amp.ANSWER, {b"found": b"True"}, (b"end", b"prefetch")))
expect_slots(slots, amp.ANSWER, b"data", b"start")
_REPLACED, slots = box_template(box_fields(
    _LOAD.response, amp.ANSWER, {b"found": b"True"}, (b"prefetch",)))
expect_slots(slots, amp.ANSWER, b"data", b"end", b"start")
# with reference prefetch (zeotwist.wire.prefetch): the same, plus its value
_CURRENT_P, slots = box_template(box_fields(
    _LOAD.response, amp.ANSWER, {b"found": b"True"}, (b"end",)))
expect_slots(slots, amp.ANSWER, b"data", b"prefetch", b"start")
_REPLACED_P, slots = box_template(box_fields(_LOAD.response, amp.ANSWER, {b"found": b"True"}))
expect_slots(slots, amp.ANSWER, b"data", b"end", b"prefetch", b"start")
# (long entry, replaced, prefetch) -> the answer's template; long: data is one
# long entry (a client that declared long_values)
_LOAD_ANSWERS = {}
for _long in (False, True):
    for _replaced in (False, True):
        for _prefetch in (False, True):
            _out = ((() if _replaced else (b"end",)) + (() if _prefetch else (b"prefetch",)))
            _LOAD_ANSWERS[_long, _replaced, _prefetch], slots = box_template(box_fields(
                _LOAD.response, amp.ANSWER, {b"found": b"True"}, _out),
                b"data" if _long else None)
            expect_slots(slots, *((amp.ANSWER, b"data") + ((b"end",) if _replaced else ())
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


del slots
