"""A big record read straight into its own ``bytes`` object.

A LoadBefore answer whose record is a long entry (:mod:`zeotwist.wire.boxlayout`:
one value over 64 KiB, 10 MB in the bench) used to arrive as pieces that
were joined once: the kernel copied the record into the pieces, the join
copied it again into fresh memory, and while the client cache filled, that
fresh memory cost a page fault per 4 KiB (docs/performance.md, "Big
records").  Now the value is read with ``recv_into`` into the very
``bytes`` object the cache and the caller then get (:class:`ValueBuffer`):
it is allocated zero-filled (``bytes(size)``: ``calloc``, whose fresh pages
are mapped on first write, by the kernel's copy) inside an ``io.BytesIO``,
whose ``getbuffer()`` writes into it and whose ``getvalue()`` hands the
object itself back once the view is released (CPython; elsewhere
``getvalue`` copies, which is correct, only slower).  No copy besides the
kernel's: by the loading thread (:class:`LongAnswer`), or by the reactor
(``ClientProtocol.long_buffer``: the parser of :mod:`zeotwist.wire.framing`
copies what Twisted read, then reads the rest of the value from the socket
itself, ``transportcompat.read_into``).

The rest of the answer (its tail: ``end``, ``found``, ``prefetch``,
``start``) is read field by field with ``recv`` calls of exactly the bytes
the next field needs, so the reader never takes a byte past its answer
(whatever follows stays in the socket for the reactor).

The value's size comes from the server, and is checked before anything is
allocated (:func:`start`: the connection's box limit, as the reactor's
parser checks it; a client trusts its server that far, a server never
allocates for a client's announced size).  No locks, no Twisted.
"""
import io

from twisted.protocols import amp

from zeotwist.wire import boxlayout, loadframes

#: ``answer()``: not whole yet (the value shared with threadreads)
MORE = "more"
#: a tail longer than this is not a LoadBefore answer's: the reactor decides
TAIL_LIMIT = 2**18


def start(buf: bytes, tag: bytes, limit: int, parse, make_room=None):
    """A :class:`LongAnswer` when ``buf`` begins with the head of the answer
    to LoadBefore ``tag`` whose record is a long entry no bigger than the
    box limit ``limit``, holding the value's first bytes; MORE when ``buf``
    may still become one; None when it is not (any other answer, or a value
    over the limit: the reactor reads those, and refuses the latter).
    ``make_room(size)`` is called first (the cache evicts what the record
    will displace, so that its memory is reused for the record's)."""
    head = loadframes.match_load_before_long_head(buf, 0)
    if not head:
        return None if head is None else MORE
    own, size, at = head
    if own != tag or size <= boxlayout.MAX_VALUE or at + size > limit or len(buf) - at > size:
        return None
    if make_room is not None:
        make_room(size)
    answer = LongAnswer(buf[:at], size, parse)
    answer.take(memoryview(buf)[at:])
    return answer


class ValueBuffer:
    """A ``bytes`` object of ``size`` bytes, written in place through
    :attr:`view` (zero-filled at first: ``calloc``), then handed out whole
    by :meth:`value` without a copy (CPython's ``io.BytesIO``: see above)."""

    __slots__ = ("_bio", "view", "_value")

    def __init__(self, size: int):
        self._bio = io.BytesIO(bytes(size))
        self.view = self._bio.getbuffer()
        self._value = None

    def value(self) -> bytes:
        """The object, once written (no more writes after this)."""
        if self._value is None:
            self.view.release()
            self._value = self._bio.getvalue()
        return self._value

    def written(self, n: int):
        """Its first ``n`` bytes (a view), at any time."""
        return (self._value if self._value is not None else self._bio.getbuffer())[:n]


class LongAnswer:
    """A long LoadBefore answer being read: its head (read), its value
    (``size`` bytes), its tail; ``parse(box)`` makes the reader's result of
    the whole box.  Its state is two lists that only C code extends or
    replaces whole (``counts``: bytes read into the value, per read;
    ``tails``: the tail's pieces), everything else derived from them: an
    exception a signal handler raises between two steps cannot lose a
    read (threadreads hands :meth:`received` to the reactor then)."""

    __slots__ = ("head", "size", "parse", "counts", "tails", "_buffer")

    def __init__(self, head: bytes, size: int, parse):
        self.head, self.size, self.parse = head, size, parse
        self.counts, self.tails = [0], []
        self._buffer = ValueBuffer(size)            # the record's own bytes object

    def have(self) -> int:
        """Value bytes read so far."""
        counts = self.counts
        if len(counts) > 1:
            counts[:] = [sum(counts)]
        return counts[0]

    def take(self, piece) -> None:
        """Value bytes already read (with the head)."""
        self._buffer.view[:len(piece)] = piece
        self.counts[:] = [len(piece)]

    def receive(self, sock) -> bool:
        """Read the next bytes of the answer from ``sock``: into the value,
        then exactly what the tail's next field needs; False at the
        connection's end.  Raises what ``sock`` raises."""
        have = self.have()
        if have < self.size:
            self.counts.extend(map(sock.recv_into, (self._buffer.view[have:],)))
            return self.counts[-1] > 0
        self.tails.extend(map(sock.recv, (self._tail()[0],)))
        return bool(self.tails[-1])

    def _tail(self) -> tuple:
        """``(need, box)``: the bytes the tail's next field needs (0: the
        tail is whole, ``box`` its fields), or ``(-1, None)`` when it is not
        a plain box's end."""
        tails = self.tails
        if len(tails) > 1:
            tails[:] = [b"".join(tails)]
        tail = tails[0] if tails else b""
        off, n, box = 0, len(tail), amp.AmpBox()
        while True:
            if n - off < 2:
                return off + 2 - n, box
            klen = (tail[off] << 8) | tail[off + 1]
            if klen == 0:
                return (0, box) if off + 2 == n else (-1, None)
            kend = off + 2 + klen
            if klen > amp.MAX_KEY_LENGTH or kend + 2 > TAIL_LIMIT:
                return -1, None
            if n < kend + 2:
                return kend + 2 - n, box
            vend = kend + 2 + ((tail[kend] << 8) | tail[kend + 1])
            if n < vend:
                return vend - n, box
            key = tail[off + 2:kend]
            if key in box or key in (amp.ANSWER, b"data"):
                return -1, None
            box[key] = tail[kend + 2:vend]
            off = vend

    def answer(self):
        """``parse(box)`` once the answer is whole; MORE before; None when
        the tail is not a plain box's (the reactor reads it all)."""
        if self.have() < self.size:
            return MORE
        need, box = self._tail()
        if need:
            return None if need < 0 else MORE
        box[b"data"] = self._buffer.value()
        try:
            return self.parse(box)
        except Exception:
            return None                 # the reactor drops the connection for it

    def received(self) -> bytes:
        """Every byte read so far, in order (what the reactor is handed
        when the reader does not keep them)."""
        return b"".join((self.head, self._buffer.written(self.have()), *self.tails))
