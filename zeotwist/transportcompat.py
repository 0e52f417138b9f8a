"""Every use of a private name of Twisted's socket transports, in one place.

The transports' buffers and reads (``twisted.internet.abstract.FileDescriptor``,
``tcp.Connection``), reached under Twisted's public API for measured
reasons: request/response traffic writes straight to an idle socket
instead of waiting a reactor turn (:func:`zeotwist.wire.sending.write_now`),
a big value is sent from its own object and queued pieces are not joined
into one copy (docs/performance.md, "Memory"), a blob piece is sent from
its file (``FilePiece``, queued in place of bytes), a long value is read
straight into its buffer, a thread sees whether the reactor is reading or
writing, and the server measures what a client leaves unread
(zeotwist.server.limits).  The other private Twisted names are in
:mod:`zeotwist.twistedcompat`; tests/test_twisted_compat.py checks both and
fails loudly, naming the one a Twisted release moved.  Each function does
nothing (or says so) for a transport that is not a socket's (TLS,
``StringTransport``).

Runs wherever its callers run: the reactor thread, except
:func:`idle_seen_from_thread` and :func:`socket_send` (a committing or
loading thread).
"""
import socket
import weakref

from twisted.internet import main
from twisted.internet.abstract import FileDescriptor

from zeotwist.fileio import FilePiece

def nothing_queued(transport) -> bool:
    """A connected socket transport with nothing buffered, not closing nor
    aborted: bytes written to its socket now keep their order.  (An
    ``abortConnection`` leaves ``connected`` set until ``connectionLost``
    runs a turn later; what is written meanwhile must not reach the peer.)"""
    return (getattr(transport, "connected", False) and not transport.disconnecting
            and not getattr(transport, "_writeDisconnected", True)
            and not getattr(transport, "_aborting", False)
            and not transport.dataBuffer and not transport._tempDataBuffer
            and getattr(transport, "producer", None) is None)


def send_some(transport, data: bytes) -> int:
    """``transport.writeSomeData(data)`` of a socket transport, without
    its wrapper (a memoryview slice, ``untilConcludes``: Python retries
    ``send`` on EINTR itself), on every write of a load, a commit or an
    answer: the bytes the socket took; 0 when it took none or failed (the
    transport meets the error itself at its next read or write)."""
    send = socket_send(transport)
    if send is None:                    # not a socket's, or being lost
        sent = transport.writeSomeData(data)
        return sent if isinstance(sent, int) else 0
    try:
        return send(data)
    except OSError:
        return 0


def idle_seen_from_thread(transport) -> bool:
    """:func:`nothing_queued`, asked from a thread other than the reactor's
    while the reactor thread may be in ``doWrite``.  That moves
    ``_tempDataBuffer`` into ``dataBuffer`` (assigned first, then the
    former emptied) and empties ``dataBuffer`` only once the socket took all
    of it, so reading them in this order never sees both empty while bytes
    are still to be written (the reverse order can)."""
    if not getattr(transport, "connected", False) or transport.disconnecting \
            or getattr(transport, "_writeDisconnected", True) \
            or getattr(transport, "_aborting", False) \
            or getattr(transport, "producer", None) is not None:
        return False
    return not transport._tempDataBuffer and not transport.dataBuffer


def socket_send(transport):
    """The ``send`` of a socket transport's socket, for a thread that
    writes to it itself (zeotwist.client.threadwrites, under its lock and
    when :func:`idle_seen_from_thread`); None for any other transport (TLS:
    its ``__getattr__`` would reach the socket under it), and for one whose
    connection is being lost (Twisted's ``connectionLost`` deletes
    ``socket`` before the protocol hears of it: the thread then leaves the
    call to the reactor thread)."""
    if getattr(type(transport), "writeSomeData", None) is None:
        return None
    sock = getattr(transport, "socket", None)
    return None if sock is None else sock.send


def pending_output(transport) -> int:
    """Bytes written to ``transport`` but not yet taken by the socket (0 if
    the transport does not say)."""
    buffered = getattr(transport, "_tempDataLen", 0)
    data = getattr(transport, "dataBuffer", b"")
    return buffered + len(data) - getattr(transport, "offset", 0)


#: what one ``send`` may take of an adopted buffer (Twisted's own limit is 128 KiB)
BULK_SEND = 2**20


def adopt_output(transport, data: bytes) -> bool:
    """Make ``data`` the send buffer of an idle socket transport itself
    (``dataBuffer``), so that Twisted sends it in slices of that object:
    ``transport.write`` would queue it behind a list that ``doWrite`` joins,
    and ``sending.write_now`` would copy what the socket did not take, both
    a copy of ``data``.  False (nothing done) when the transport is not an
    idle socket transport; the caller then writes ``data`` as usual."""
    if getattr(type(transport), "writeSomeData", None) is None or not nothing_queued(transport):
        return False
    transport.dataBuffer, transport.offset = data, 0
    bulk_sends(transport)
    transport.startWriting()
    return True


def bulk_sends(transport) -> None:
    """Let a socket transport hand up to ``BULK_SEND`` bytes to one
    ``send`` (``SEND_LIMIT``, 128 KiB by default): a big value in fewer
    reactor turns.  Nothing for other transports."""
    if isinstance(transport, FileDescriptor):
        transport.SEND_LIMIT = max(BULK_SEND, FileDescriptor.SEND_LIMIT)


def unjoined_writes(transport) -> None:
    """Make a socket transport send what is queued (``transport.write``)
    piece by piece: a piece of ``BULK_SEND`` bytes or more from the object
    itself, smaller ones joined up to about that size.  Twisted's
    ``doWrite`` joins *everything* queued into one new buffer as soon as
    less than ``SEND_LIMIT`` is left to send: with a few 1 MiB blob pieces
    or big records queued behind each other, a copy of all of them while
    they are still held (measured: docs/performance.md, "Memory").  Here
    ``doWrite`` hands Twisted's one piece at a time, with ``SEND_LIMIT``
    kept at most what that piece has left, so Twisted's own join never
    runs; Twisted's ``doWrite`` does the rest (the sends, the end of the
    output, a close waiting for it).  Nothing for other transports (TLS
    writes its own); idempotent."""
    if isinstance(transport, FileDescriptor) and "doWrite" not in transport.__dict__:
        alive = weakref.ref(transport)      # no cycle through the instance's own dict
        transport.doWrite = lambda: _unjoined_do_write(alive())


def sends_files(transport) -> bool:
    """Whether :func:`queue_file_piece` works on ``transport``: a socket
    transport of Twisted's (not TLS, which must encrypt the bytes)."""
    return isinstance(transport, FileDescriptor) and hasattr(transport, "getHandle") \
        and isinstance(getattr(transport, "socket", None), socket.socket)


def queue_file_piece(transport, piece: FilePiece) -> None:
    """Queue ``piece`` on a socket transport (:func:`sends_files`) as
    ``transport.write`` queues bytes, in order with them: its socket takes
    the piece's bytes from the file when the piece's turn comes (the
    :func:`unjoined_writes` ``doWrite``; at once, as much as it takes, when
    nothing else is queued), so they are never held in memory.  It counts
    in :func:`pending_output` as the bytes it holds back."""
    unjoined_writes(transport)
    sock = getattr(transport, "socket", None)   # deleted once the connection is lost
    if not transport.connected or transport._writeDisconnected or sock is None:
        piece.close()
        return
    if nothing_queued(transport):       # what the socket takes now, at once
        try:
            piece.send_to(sock)
        except (OSError, EOFError):     # doWrite meets it again and reports it
            pass
        if not piece.left:
            return
    transport._tempDataBuffer.append(piece)
    transport._tempDataLen += piece.left
    transport.startWriting()


def reading_transport(transport):
    """The socket transport whose ``doRead`` reads ``transport``'s bytes:
    itself, or the one under a TLS transport (``transport.transport``,
    which decrypts in that ``doRead``); None for others."""
    for candidate in (transport, getattr(transport, "transport", None)):
        if getattr(type(candidate), "doRead", None) is not None \
                and hasattr(candidate, "getHandle"):
            return candidate
    return None


def marked_reads(transport, owner, attribute: str) -> None:
    """Set ``owner.<attribute>`` True while the reactor is inside the
    ``doRead`` of the socket transport that reads ``transport``
    (:func:`reading_transport`: its ``recv`` gives up the GIL, and another
    thread can run between the read and the handling of what was read,
    decrypted first under TLS), False otherwise.  Nothing for other
    transports; idempotent."""
    transport = reading_transport(transport)
    if transport is not None and "doRead" not in transport.__dict__:
        transport.doRead = _MarkedRead(transport, owner, attribute)


class _MarkedRead:
    """A transport's ``doRead`` (:func:`marked_reads`); weak references: no
    cycle through the transport's own dict."""
    __slots__ = ("_transport", "_owner", "_attribute")

    def __init__(self, transport, owner, attribute: str):
        self._transport, self._owner = weakref.ref(transport), weakref.ref(owner)
        self._attribute = attribute

    def __call__(self):
        transport, owner = self._transport(), self._owner()
        if owner is None:
            return type(transport).doRead(transport)
        setattr(owner, self._attribute, True)
        try:
            return type(transport).doRead(transport)
        finally:
            setattr(owner, self._attribute, False)


def _unjoined_do_write(transport):
    pending = transport._tempDataBuffer
    while pending and type(pending[0]) is FilePiece \
            and transport.offset >= len(transport.dataBuffer):
        piece = pending[0]
        try:
            sent = piece.send_to(transport.socket)
        except (OSError, EOFError):
            return main.CONNECTION_LOST
        transport._tempDataLen -= sent
        if piece.left:
            return None         # the socket is full: doWrite again once it has room
        del pending[0]
    if pending and transport.offset >= len(transport.dataBuffer):
        count, size = 1, len(pending[0])
        while count < len(pending) and size < BULK_SEND and len(pending[count]) < BULK_SEND \
                and type(pending[count]) is not FilePiece:
            size += len(pending[count])
            count += 1
        # the new buffer first, then the queue shortened: a thread looking
        # (idle_seen_from_thread) never sees both empty while bytes are left
        transport.dataBuffer = pending[0] if count == 1 else b"".join(pending[:count])
        transport.offset = 0
        del pending[:count]
        transport._tempDataLen -= size
    limit = transport.SEND_LIMIT
    transport.SEND_LIMIT = max(1, min(limit, len(transport.dataBuffer) - transport.offset))
    try:
        return type(transport).doWrite(transport)
    finally:
        transport.SEND_LIMIT = limit


def read_size(transport, size: int | None = None) -> None:
    """Read up to ``size`` bytes per ``recv`` from a socket transport
    (``bufferSize``; None: Twisted's default, 64 KiB) -- while a long value
    arrives, fewer reactor turns.  Nothing for other transports."""
    if isinstance(transport, FileDescriptor):
        if size is None:
            transport.__dict__.pop("bufferSize", None)
        else:
            transport.bufferSize = size


def read_into(transport, view) -> int:
    """Read what has already arrived on a socket transport's socket into
    ``view`` (at most its length), without waiting, past Twisted's own
    ``doRead``: the bytes read.  0 for other transports (TLS: Twisted
    decrypts), and it stops at the connection's end or an error, which
    Twisted's next read meets (an end stays readable)."""
    if not isinstance(transport, FileDescriptor) or not hasattr(transport, "getHandle"):
        return 0
    sock, total, size = transport.getHandle(), 0, len(view)
    while total < size and isinstance(sock, socket.socket):
        try:
            n = sock.recv_into(view[total:])
        except OSError:     # BlockingIOError: nothing more yet
            break
        if not n:
            break
        total += n
    return total


def discard_output(transport) -> None:
    """Drop what ``transport`` still holds for its peer, at once: an aborted
    connection's buffers are otherwise freed only when ``connectionLost``
    runs, a reactor turn later, and the server's memory budget has already
    handed that room to other connections (nothing for other transports)."""
    if hasattr(transport, "_tempDataBuffer") and hasattr(transport, "dataBuffer"):
        queued = transport._tempDataBuffer
        transport.dataBuffer, transport.offset = b"", 0
        transport._tempDataBuffer, transport._tempDataLen = [], 0
        for piece in queued:
            if type(piece) is FilePiece:
                piece.close()
