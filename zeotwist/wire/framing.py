"""A bounded, faster AMP box parser.

Stock ``BinaryBoxProtocol`` buffers an unterminated box without bound and
parses one string at a time through ``getattr``.  :class:`BoundedAMP` keeps
AMP's wire format and dispatch but parses boxes itself, refusing a box that
announces more keys or bytes than the receiver allows *before* buffering the
excess.  It also reads the *long entries* of :mod:`zeotwist.wire.boxlayout`
(one value over 64 KiB in one piece, collected once, never re-buffered).  A
violation calls :meth:`BoundedAMP.protocolViolation`, which logs one line
and drops the connection.  How it writes (a burst's answers in one write,
big values from their own object) is :mod:`zeotwist.wire.sending`.

Runs on the reactor thread.
"""
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.protocols import amp

from ZODB.POSException import POSError

from zeotwist import transportcompat, twistedcompat
from zeotwist.errors import RemoteProtocolError
from zeotwist.wire.boxlayout import LONG_MARK
from zeotwist.wire.sending import BatchedSender

_log = Logger()

#: Limits for boxes a *server* accepts from clients.  Stores travel in
#: 1 MiB pieces, so 4 MiB leaves room while bounding memory per connection.
SERVER_MAX_BOX_BYTES = 4 * 2**20
SERVER_MAX_BOX_KEYS = 128
#: Bytes read per ``recv`` while a long entry's value arrives (else 64 KiB),
#: on a side without ``long_buffer`` (the server).  Each ``recv`` allocates
#: this much and shrinks it to what came: 1 MiB left the server's heap 2-4 MB
#: bigger during a blob upload than 512 KiB, at the same rate (measured:
#: docs/performance.md, "Memory").
LONG_READ = 2**19
#: Limits for boxes a client accepts from its server (records of any size
#: come back in one box, so the byte limit is generous but still finite).
CLIENT_MAX_BOX_BYTES = 2**31
CLIENT_MAX_BOX_KEYS = 2**31 // amp.MAX_VALUE_LENGTH + 64


class BoundedAMP(BatchedSender, amp.AMP):
    """AMP with a bounded box parser and a single protocol-violation path
    (and the sending side of :class:`~zeotwist.wire.sending.BatchedSender`)."""

    maxBoxBytes = SERVER_MAX_BOX_BYTES
    maxBoxKeys = SERVER_MAX_BOX_KEYS
    #: ``fast_frame(buf, off)``: handles a whole box it recognises at ``off``
    #: straight from the bytes and returns where it ends, else 0 (None: none)
    fast_frame = None

    _buf = b""
    _box = None
    _boxBytes = 0

    def makeConnection(self, transport):
        # AMP's own logs "connection established (HOST:IPv4Address(...)
        # PEER:...)"; the server logs its peers as host:port itself.
        twistedcompat.amp_make_connection_quietly(self, transport)

    def connectionLost(self, reason):
        twistedcompat.amp_connection_lost_quietly(self, reason)

    def connectionMade(self):
        super().connectionMade()
        setNoDelay = getattr(self.transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            try:
                setNoDelay(True)
            except OSError:  # Unix sockets and friends have no Nagle
                pass

    def dataReceived(self, data: bytes) -> None:
        if self._violated:
            return
        if self._batch is not None:       # re-entered: the outer call flushes
            return self._parse(data)
        batch = self._batch = []
        self._batch_bytes = 0
        try:
            self._parse(data)
        finally:
            self._batch = None
            if batch and self.transport is not None and not self._violated:
                self.write_out(batch[0] if len(batch) == 1 else b"".join(batch))

    #: a long entry's value being collected: (key, length, pieces, bytes so far)
    _long = None
    #: ``long_buffer(size)``: where a long entry's value of ``size`` bytes is
    #: written as it arrives (its ``view``, then ``value()``), or None: kept
    #: in pieces, joined once.  The server keeps None: a client's announced
    #: size takes no memory before its bytes come.
    long_buffer = None

    def _parse(self, data: bytes) -> None:
        off = 0
        if self._long is not None:       # (then nothing else is buffered)
            off = self._collect_long(data)
            if off is None:
                return
        buf = self._buf + data if self._buf else data
        n, box = len(buf), self._box
        size, maxBytes = self._boxBytes, self.maxBoxBytes
        fast_frame = self.fast_frame
        while n - off >= 2:
            if box is None and fast_frame is not None:
                end = fast_frame(buf, off)
                if end:                     # handled whole, without a box
                    off = end
                    if self._violated or self.transport is None:
                        return
                    continue
            klen = (buf[off] << 8) | buf[off + 1]
            if klen == LONG_MARK:
                # A long entry (zeotwist.wire.boxlayout): one value over 64 KiB,
                # bounded like any other before a byte of it is kept.
                if n - off < 4:
                    break
                klen = (buf[off + 2] << 8) | buf[off + 3]
                if not 0 < klen <= amp.MAX_KEY_LENGTH:
                    return self.protocolViolation("long entry key length %d" % klen)
                kend = off + 4 + klen
                if n < kend + 4:
                    break
                vlen = int.from_bytes(buf[kend:kend + 4], "big")
                if vlen <= amp.MAX_VALUE_LENGTH:
                    return self.protocolViolation(
                        "long entry of %d bytes (at most %d go as a plain value)"
                        % (vlen, amp.MAX_VALUE_LENGTH))
                if size + klen + vlen + 10 > maxBytes:
                    return self.protocolViolation(
                        "box larger than %d bytes" % maxBytes)
                if box is None:
                    box = amp.AmpBox()
                elif len(box) >= self.maxBoxKeys:
                    return self.protocolViolation(
                        "box with more than %d keys" % self.maxBoxKeys)
                size += klen + vlen + 10
                key, vstart = buf[off + 4:kend], kend + 4
                if n - vstart >= vlen:
                    box[key] = buf[vstart:vstart + vlen]
                    off = vstart + vlen
                    continue
                self._box, self._boxBytes, self._buf = box, size, b""
                first = memoryview(buf)[vstart:]
                sink = self.long_sink(box, key, vlen)
                if self._violated or self.transport is None:
                    return
                if sink is not None:                # written as it arrives, never held
                    self._long = (key, vlen, sink, 0)
                    self._collect_long(first)
                    return
                if self.long_buffer is not None:    # into the value's own object
                    self._long = (key, vlen, self.long_buffer(vlen), 0)
                    self._collect_long(first)       # (what follows is in the socket)
                    return
                # The rest arrives in later reads: keep the pieces (views,
                # not copies) and join them once (no re-buffering of a
                # growing value).
                self._long = (key, vlen, [first], len(first))
                transportcompat.read_size(self.transport, LONG_READ)
                return
            if klen == 0:
                off += 2
                self._box, self._boxBytes, self._buf = None, 0, buf[off:]
                if box is None:
                    box = amp.AmpBox()
                self.boxReceiver.ampBoxReceived(box)
                if self._violated or self.transport is None:
                    return
                buf, n, off, box, size = self._buf, len(self._buf), 0, None, 0
                continue
            if klen > amp.MAX_KEY_LENGTH:
                return self.protocolViolation("key length %d" % klen)
            kend = off + 2 + klen
            if n < kend + 2:
                break
            vlen = (buf[kend] << 8) | buf[kend + 1]
            if size + klen + vlen + 4 > maxBytes:
                return self.protocolViolation(
                    "box larger than %d bytes" % maxBytes)
            vend = kend + 2 + vlen
            if n < vend:
                break
            if box is None:
                box = amp.AmpBox()
            elif len(box) >= self.maxBoxKeys:
                return self.protocolViolation(
                    "box with more than %d keys" % self.maxBoxKeys)
            box[buf[off + 2:kend]] = buf[kend + 2:vend]
            size += klen + vlen + 4
            off = vend
        self._box, self._boxBytes = box, size
        self._buf = buf[off:] if off < n else b""

    def _collect_long(self, data: bytes) -> int | None:
        """Add ``data`` to the long entry being collected; once it is
        whole, put it in the box and return where in ``data`` what follows
        it begins (else None)."""
        key, vlen, pieces, have = self._long
        need = vlen - have
        if type(pieces) is not list:
            if isinstance(pieces, LongSink):
                return self._sink_long(key, vlen, pieces, have, data)
            return self._fill_long(key, vlen, pieces, have, data)
        if len(data) < need:
            pieces.append(data)
            self._long = (key, vlen, pieces, have + len(data))
            return None
        pieces.append(memoryview(data)[:need] if len(data) > need else data)
        self._long = None
        transportcompat.read_size(self.transport)
        self._box[key] = b"".join(pieces)       # the value's one copy
        return need

    def _fill_long(self, key: bytes, vlen: int, buffer, have: int, data) -> int | None:
        """:meth:`_collect_long` into a ``long_buffer``: ``data``, then
        what has arrived in the socket (``read_into``: the value's bytes
        only, straight from the kernel)."""
        taken = min(vlen - have, len(data))
        buffer.view[have:have + taken] = memoryview(data)[:taken]
        have += taken
        if have < vlen:
            have += transportcompat.read_into(self.transport, buffer.view[have:])
        return self._long_so_far(key, vlen, buffer, have, taken)

    def _long_so_far(self, key: bytes, vlen: int, holder, have: int, taken: int) -> int | None:
        """A long entry of which ``have`` bytes came: kept for more (None),
        or whole: ``holder.value()`` put in the box, and ``taken`` (where
        what follows begins in the data just handled) returned."""
        if have < vlen:
            self._long = (key, vlen, holder, have)
            return None
        self._long = None
        self._box[key] = holder.value()
        return taken

    def long_sink(self, box, key: bytes, size: int) -> "LongSink | None":
        """Where the value of the long entry ``key`` (``size`` bytes) of
        ``box`` (its keys so far) goes as it arrives, or None (collected
        in memory, the usual way).  None here; a subclass may say
        otherwise (the server: a StoreBlobChunk's data into its spool
        file) or drop the link (:meth:`protocolViolation`)."""
        return None

    def _sink_long(self, key: bytes, vlen: int, sink: "LongSink", have: int,
                   data) -> int | None:
        """:meth:`_collect_long` into a :class:`LongSink`: ``data``, then
        what has arrived in the socket, read into the sink's buffer
        (``read_into``: no new buffer per ``recv``)."""
        taken = min(vlen - have, len(data))
        if taken:
            sink.write(memoryview(data)[:taken])
            have += taken
        while have < vlen and not self._violated and self.transport is not None:
            got = transportcompat.read_into(self.transport, sink.buffer(vlen - have))
            if not got:
                break
            sink.filled(got)
            have += got
        if self._violated or self.transport is None:
            return None
        sink.flush()
        return self._long_so_far(key, vlen, sink, have, taken)

    def ampBoxReceived(self, box):
        # A box that is neither a command nor the answer to a question we
        # asked is the peer's violation, not an unhandled error of ours.
        tag = box.get(amp.ANSWER, box.get(amp.ERROR))
        if tag is not None:
            if not twistedcompat.amp_is_outstanding(self, tag):
                return self.protocolViolation("answer to no question %r" % (tag[:16],))
        elif amp.COMMAND not in box:
            return self.protocolViolation("box with no command")
        super().ampBoxReceived(box)

    def locateResponder(self, name):
        if not name.isascii():          # AMP's lookup decodes it as ASCII: it would raise
            return self._unknownCommand
        responder = super().locateResponder(name)
        if responder is None:
            return self._unknownCommand
        command = self._commandDispatch.get(name, (None, None))[0]
        needs_ask = command is not None and command.requiresAnswer

        def guarded(box):
            if needs_ask and amp.ASK not in box:
                # its answer (or error) would have nowhere to go
                self.protocolViolation("%s without _ask" % name.decode("ascii", "replace"))
                return Deferred()
            try:
                return responder(box)
            except (RemoteProtocolError, KeyError, TypeError, ValueError) as e:
                self.protocolViolation(
                    "bad arguments to %s: %s" % (name.decode("ascii", "replace"), e))
                return Deferred()  # never answered: the link is closing

        return guarded

    def _unknownCommand(self, box):
        self.protocolViolation(
            "unknown command %r" % (box.get(amp.COMMAND, b"")[:64],))
        return Deferred()

    def unhandledError(self, failure) -> None:
        """A one-way command failed (AMP has nobody to answer).  A storage
        error is the peer's mistake (its arguments, its state): one line, no
        traceback; anything else is ours and logged in full.  Either way the
        link drops, as AMP's own handler does."""
        if not failure.check(POSError, RemoteProtocolError, amp.RemoteAmpError):
            _log.failure("unexpected error in a one-way command", failure)
        self.protocolViolation("one-way command failed: %s: %s"
                               % (failure.type.__name__, failure.getErrorMessage()))

    def protocolViolation(self, why: str) -> None:
        """The peer broke the protocol: log one line and drop the link."""
        if self._violated:
            return
        self._violated = True
        self._buf, self._box, self._long = b"", None, None
        self.logViolation("protocol violation from {peer}: {why}; closing",
                          peer=peer_text(self.transport), why=why)
        transport = self.transport
        if transport is not None:
            abort = getattr(transport, "abortConnection", transport.loseConnection)
            abort()

    def logViolation(self, fmt: str, **kw) -> None:
        """Log a violation (the server rate-limits these lines)."""
        _log.warn(fmt, **kw)




class LongSink:
    """Where a long entry's value goes as it arrives (``BoundedAMP.long_sink``),
    in order: :meth:`write` gets bytes that were read already (a view,
    valid during the call only), :meth:`buffer` is where the next are read
    from the socket and :meth:`filled` says how many came; :meth:`flush`
    comes before the parser returns to the reactor (what the sink holds
    must not wait for more), and :meth:`value` is what the box then holds
    under its key.  Reactor thread."""

    def write(self, piece: memoryview) -> None:
        raise NotImplementedError

    def buffer(self, most: int) -> memoryview:
        raise NotImplementedError

    def filled(self, count: int) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        raise NotImplementedError

    def value(self) -> bytes:
        raise NotImplementedError


def peer_text(transport) -> str:
    """The other end of a connection for a log line: ``127.0.0.1:53412``,
    ``[::1]:53412``, ``unix``, or ``-`` once the connection is gone."""
    if transport is None:
        return "-"
    try:
        return address_text(transport.getPeer())
    except Exception:
        return "-"


def address_text(address) -> str:
    """An IAddress as :func:`peer_text` writes it."""
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is None or port is None:
        return "unix"
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)
