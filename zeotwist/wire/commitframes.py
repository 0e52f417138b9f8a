"""The commit's questions read straight from the bytes (the server's side).

Every small commit sends ``TpcBegin``, one ``StoreData`` and ``Vote`` in
one burst, then ``Finish``, each framed by the client with
:mod:`zeotwist.wire.fast` (``tpc_begin``, ``store_data``,
``vote_request``, ``finish_request``).  :func:`match_commit_question`
recognises exactly those frames at an offset of the received bytes and
returns their variable fields, so the server handles them without building
an AMP box key by key (:meth:`zeotwist.server.fastpath.FastAnswers.fast_frame`).
Anything else - another command, ``can_resolve=False``, a restore's
``TpcBegin``, a long entry, a frame not whole yet - is None: AMP's parser
reads it as before.  tests/test_wire_fast.py checks that each frame read
here is the box AMP's parser reads from the same bytes.

Pure functions; no I/O.
"""
from zeotwist.wire.fast import _BEGIN_FRAME, _FINISH_FRAME, _STORE_FRAME, _VOTE_FRAME

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
    :data:`FINISH` (the tag) as :mod:`zeotwist.wire.fast` frames it,
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
