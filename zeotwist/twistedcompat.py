"""Every use of a private Twisted name, in one place.

zeotwist reaches under Twisted's public API in a few places, each for a
measured reason (named below).  Nothing else in zeotwist touches a name
Twisted keeps private: a Twisted release that renames one breaks this
module only, and tests/test_twisted_compat.py fails loudly, naming it.
Where a missing name has a safe answer, the code here degrades to it at
run time (the test still fails).  The
tested Twisted range is declared in pyproject.toml.

Runs wherever its callers run (the reactor thread, except
:func:`private_reactor`, which builds a reactor for its own thread).
"""
import importlib
import socket
import weakref

from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorCore
from twisted.protocols import amp
from twisted.python.failure import Failure

# -- AMP (twisted.protocols.amp) ------------------------------------------------------
# LoadBefore's hot path registers its own answer receiver under a fresh tag
# instead of a Deferred (one Deferred per load instead of two), and one-way
# commands are sent without AMP's callRemote argument copying.


def amp_encode_fields(objects: dict, arglist, proto):
    """An ``AmpBox`` of ``objects`` encoded by ``arglist`` (``[(name,
    Argument)]``), as a command's arguments are (``_objectsToStrings``):
    a list of boxes inside one value (``wire.arguments.BoxList``)."""
    return amp._objectsToStrings(objects, arglist, amp.AmpBox(), proto)


def amp_decode_fields(box, arglist, proto) -> dict:
    """The objects of a box encoded by :func:`amp_encode_fields` (``_stringsToObjects``)."""
    return amp._stringsToObjects(box, arglist, proto)


def amp_make_connection_quietly(proto, transport) -> None:
    """``AMP.makeConnection`` without its log line, which prints the
    addresses as reprs (``IPv4Address(type='TCP', ...)``): AMP's method only
    logs and calls ``BinaryBoxProtocol.makeConnection`` (it also keeps the
    addresses, for its own connectionLost line)."""
    amp.BinaryBoxProtocol.makeConnection(proto, transport)


def amp_connection_lost_quietly(proto, reason) -> None:
    """``AMP.connectionLost`` without its log line: the outstanding
    questions fail (``BinaryBoxProtocol.connectionLost``) and the transport
    is forgotten, as AMP's does."""
    amp.BinaryBoxProtocol.connectionLost(proto, reason)
    proto.transport = None


def amp_closed(proto) -> bool:
    """The AMP connection failed every outstanding question (``_failAllReason``)."""
    return proto._failAllReason is not None


def amp_switched(proto) -> bool:
    """The connection switched protocols: no more AMP boxes (``_locked``)."""
    return proto._locked


def amp_expect_answer(proto, receiver) -> bytes:
    """A fresh question tag whose answer AMP hands to ``receiver``
    (``callback(box)``, ``errback(failure)``, ``addErrback``)."""
    tag = proto._nextTag()
    proto._outstandingRequests[tag] = receiver
    return tag


def amp_expect_answer_from_thread(proto, tag: bytes, receiver) -> None:
    """Like :func:`amp_expect_answer`, from a thread other than the
    reactor's, under a tag the caller made (AMP's counter, ``_nextTag``, is
    the reactor thread's): one dict item set, atomic.  The caller makes sure
    the connection is not being lost meanwhile (see ClientProtocol)."""
    proto._outstandingRequests[tag] = receiver


def amp_take_receiver(proto, tag: bytes, having: str):
    """The receiver waiting for the answer ``tag`` if it has the attribute
    ``having``, removed as AMP's ``_answerReceived`` removes it; else None
    (and any other receiver is left where it is)."""
    requests = proto._outstandingRequests
    receiver = None if requests is None else requests.get(tag)
    if receiver is None or not hasattr(receiver, having):
        return None
    del requests[tag]
    return receiver


def calls_pending(reactor) -> bool:
    """Calls handed to ``reactor`` with ``callFromThread`` not yet done
    (``threadCallQueue``, emptied only after the last of them returned)."""
    return bool(getattr(reactor, "threadCallQueue", True))


def amp_awaits_answers(proto) -> bool:
    """Any question still waiting for its answer (False once the connection
    failed them all)."""
    return bool(proto._outstandingRequests)


def amp_is_outstanding(proto, tag: bytes) -> bool:
    """``tag`` names a question still waiting for its answer."""
    requests = proto._outstandingRequests
    return requests is not None and tag in requests


def amp_send_box(proto, name: bytes, box, requires_answer: bool):
    """Send an argument box under command ``name`` (``_sendBoxCommand``):
    a Deferred of the answer box, or None for a one-way command."""
    return proto._sendBoxCommand(name, box, requires_answer)


# -- Deferreds (twisted.internet.defer) -------------------------------------------------
# A small commit's lock and storage calls complete at once, on the reactor
# thread: the server reads their results off the fired Deferreds instead of
# running a chain of callbacks for each (zeotwist.server.tpc).


def value_now(d):
    """The value ``d`` has already fired with (nothing left to run, not
    paused, not a Failure); else ``d`` itself, for the caller to add its
    callbacks to."""
    if d.called and not d.paused and d._chainedTo is None:
        result = d.result
        if not isinstance(result, (Failure, Deferred)):
            return result
    return d


# -- transports (twisted.internet.abstract.FileDescriptor) -----------------------------
# Request/response traffic writes straight to an idle socket instead of
# waiting a reactor turn (sending.write_now); the server measures what a
# client leaves unread (limits).


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


def marked_reads(transport, owner, attribute: str) -> None:
    """Set ``owner.<attribute>`` True while the reactor is inside the socket
    transport's ``doRead`` (its ``recv`` gives up the GIL: another thread
    can run between the read and the handling of what was read), False
    otherwise.  Nothing for other transports (TLS reads through the one
    under it); idempotent."""
    if getattr(type(transport), "doRead", None) is not None \
            and "doRead" not in transport.__dict__:
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
    if pending and transport.offset >= len(transport.dataBuffer):
        count, size = 1, len(pending[0])
        while count < len(pending) and size < BULK_SEND and len(pending[count]) < BULK_SEND:
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
        transport.dataBuffer, transport.offset = b"", 0
        transport._tempDataBuffer, transport._tempDataLen = [], 0


# -- TLS (twisted.protocols.tls) ---------------------------------------------------------
# The TLS transport flushes small writes on a clock that defaults to the
# *global* reactor; a connection served by the private reactor must use its own.


def set_tls_flush_clock(transport, clock) -> None:
    """Make a TLS transport flush its buffered writes on ``clock``; nothing
    for other transports, or once a flush is already scheduled."""
    aggregator = getattr(transport, "_aggregator", None) if clock is not None else None
    if aggregator is not None and getattr(aggregator, "_clock", clock) is not clock:
        if getattr(aggregator, "_scheduled", None) is None:
            aggregator._clock = clock


# -- listening ports (twisted.internet.tcp.Port) -------------------------------------------
# The accept guard sees the port's accept errors (EMFILE) through its logger.


def port_logger(port):
    """The ``twisted.logger.Logger`` a listening port logs through, or None."""
    return getattr(port, "_logger", None)


def set_port_logger(port, logger) -> None:
    port._logger = logger


# -- reactors (twisted.internet.default, base.ReactorBase) ----------------------------------
def default_reactor_class() -> type:
    """The reactor class Twisted installs by default on this platform
    (epoll on Linux, poll or select elsewhere), without installing it."""
    from twisted.internet import default
    from twisted.python.runtime import platform
    module = importlib.import_module(default._getInstallFunction(platform).__module__)
    found = [v for v in vars(module).values()
             if isinstance(v, type) and v.__module__ == module.__name__
             and v.__name__.endswith("Reactor") and IReactorCore.implementedBy(v)]
    if len(found) != 1:
        raise ImportError("no single reactor class in %s: %r" % (module.__name__, found))
    return found[0]


def stopped_by_signal(reactor) -> int | None:
    """The signal that stopped ``reactor`` (SIGTERM, SIGINT), or None
    (``_exitSignal``: twistd ends the process with it once the reactor is done)."""
    return getattr(reactor, "_exitSignal", None)


def forget_exit_signal(reactor) -> None:
    """twistd ends the process with status 0 rather than by re-raising the
    signal that stopped the reactor."""
    if getattr(reactor, "_exitSignal", None) is not None:
        reactor._exitSignal = None


def private_reactor():
    """A new reactor of the platform's default class that leaves Twisted's
    global io-thread marker alone (``_registerAsIOThread``), for a thread
    of its own."""
    reactor = default_reactor_class()()
    reactor._registerAsIOThread = False
    return reactor


# -- ClientService (twisted.application.internet) -------------------------------------------
# The handshake runs as ``prepareConnection``, which gets a proxy around our
# protocol; a handshake that fails must not be reported as a lost connection
# too (ClientService has no transition for that while connecting).


def service_protocol(proxy):
    """Our protocol behind ClientService's proxy (``_protocol``); the proxy
    itself if it has none (it forwards everything to the protocol)."""
    return getattr(proxy, "_protocol", proxy)


def silence_lost_notification(proxy) -> None:
    """The proxy's connection loss is not reported to ClientService."""
    if hasattr(proxy, "_lostNotification"):
        proxy._lostNotification = lambda reason: None


# -- twisted.logger -------------------------------------------------------------------------
def logging_begun() -> bool:
    """The application has begun Twisted logging: ``beginLoggingTo`` sets
    the start-up buffer (``_temporaryObserver``) to None."""
    from twisted.logger import globalLogBeginner
    return getattr(globalLogBeginner, "_temporaryObserver", False) is None
