"""The client end of one connection: typed calls out, Invalidate in.

:meth:`ClientProtocol.call` sends a command and returns a *fresh* Deferred
that fires with the parsed response or a typed exception (rebuilt from the
wire code by :mod:`zeotwist.wire.codes`); the AMP-level Deferred always ends
handled, so an error answer never drops the connection.  The server's
``Invalidate`` is handed to the protocol's owner (a
:class:`~zeotwist.client.connector.Connector`: ``owner.invalidated(proto,
tid, oids)``, ``owner.prefetched(proto, records)``,
``owner.connection_lost(proto, reason)``, ``owner.reactor``)
synchronously, in the order boxes arrive, and so is every answer: a load
result reaches the cache before the next box is parsed.

Runs on the reactor thread.
"""
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionClosed
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from zeotwist import twistedcompat
from zeotwist.errors import ClientDisconnected, TransactionTimeout, VoteTimeout, WrongServer
from zeotwist.client.longreads import ValueBuffer
from zeotwist.client.commitreads import CommitReads
from zeotwist.client.threadwrites import read_load_answer
from zeotwist.tls import use_clock
from zeotwist.wire import commands as C
from zeotwist.wire import commitframes, loadframes
from zeotwist.wire import zeo
from zeotwist.wire.codes import rebuild
from zeotwist.wire.framing import (
    CLIENT_MAX_BOX_BYTES, CLIENT_MAX_BOX_KEYS, BoundedAMP)

_log = Logger()


def convert_failure(failure: Failure) -> BaseException:
    err = failure.value
    if isinstance(err, amp.RemoteAmpError):
        return rebuild(err.errorCode, err.description)
    if failure.check(ConnectionClosed, amp.ProtocolSwitched):
        return ClientDisconnected("connection to the server was lost: %s" % (err,))
    return err


class _LoadAnswer:
    """Stands where AMP keeps a question's Deferred for one LoadBefore
    (:func:`zeotwist.twistedcompat.amp_expect_answer`): AMP calls ``addErrback``/``callback``/``errback`` on
    it; it parses the answer straight into :attr:`result`, a fresh Deferred,
    so a LoadBefore costs one Deferred instead of two."""

    __slots__ = ("proto", "result")

    def __init__(self, proto):
        self.proto = proto
        self.result = Deferred()

    def addErrback(self, *args, **kw):
        return self          # errors are converted below, never left unhandled

    def callback(self, box):
        try:
            value = read_load_answer(self.proto, box)
        except Exception as e:
            self.proto.protocolViolation("bad LoadBefore answer: %s" % e)
            self.result.errback(ClientDisconnected("bad answer from server: %s" % e))
            return
        self.answered(value)

    def answered(self, value) -> None:
        """The answer, read: ``(data, start, end)`` or None."""
        self.result.callback(value)

    def errback(self, reason):
        if not isinstance(reason, Failure):
            reason = Failure(reason)
        self.result.errback(convert_failure(reason))


class ClientProtocol(CommitReads, BoundedAMP):
    maxBoxBytes = CLIENT_MAX_BOX_BYTES
    maxBoxKeys = CLIENT_MAX_BOX_KEYS
    #: a big record (or blob piece) read into its own bytes object
    long_buffer = ValueBuffer
    #: the server reads long entries (its Register answer said so)
    long_values = False
    #: this connection's last vote was refused for conflicts, with no commit
    #: since (ClientTransaction._voted)
    refused_last = False

    def __init__(self, owner):
        super().__init__()
        self.owner = owner

    def fast_frame(self, buf: bytes, off: int) -> int:
        """The hottest path (see BoundedAMP._parse): a plain LoadBefore
        answer read straight from the bytes, without a box, and handed to
        the load waiting for it; 0 for anything else."""
        match = loadframes.match_load_before_answer(buf, off)
        if match is None:
            return 0
        tag, value, end = match
        receiver = twistedcompat.amp_take_receiver(self, tag, "answered")
        if receiver is None:                # no load asked it: AMP's path decides
            return 0
        receiver.answered(value)
        return end

    def ampBoxReceived(self, box):
        # Every commit of another client: applied here, in box order, as
        # AMP's responder below would (without its dispatch and Deferreds).
        invalidation = commitframes.read_invalidate(box)
        if invalidation is None:
            super().ampBoxReceived(box)
            return
        self.invalidations += 1
        try:
            self.owner.invalidated(self, *invalidation)
        except Exception:           # as AMP's path: a one-way command failed
            self.unhandledError(Failure())

    def connectionMade(self):
        super().connectionMade()
        self.start_thread_writes()      # loads sent from the application's thread
        self.track_reactor_reads()      # catch_up: what the reactor is reading
        use_clock(self.transport, getattr(self.owner, "reactor", None))   # TLS: see zeotwist.tls

    # -- what answers: a zeotwist server, or a ZEO server ----------------------------
    #: the first bytes, until they show an AMP box (None from then on)
    _greeting: bytes | None = b""
    #: the WrongServer error, once the first bytes showed another protocol
    wrong_server = None
    #: the TransactionTimeout the server announced (TransactionTimedOut), or
    #: None: the transaction on this connection fails with it
    timed_out = None

    def dataReceived(self, data: bytes) -> None:
        if self._later:                 # commits a reading thread made visible
            self.publish_pending()
        if self._greeting is not None:
            # A zeotwist server speaks only to answer (AMP boxes), or sends
            # its ZEO probe to a client silent for a while; a ZEO server
            # speaks first, a ZEO frame (zeotwist.wire.zeo).
            data = self._greeting + data
            if len(data) < 2:
                self._greeting = data
                return
            if zeo.starts_zeo_frame(data):
                if data.startswith(zeo.PROBE):          # a zeotwist server: skip it
                    self._greeting = b""
                    self.dataReceived(data[len(zeo.PROBE):])
                    return
                if zeo.PROBE.startswith(data) or zeo.first_message(data) is None:
                    self._greeting = data               # more bytes to come
                    return
                self._greeting = None
                self._refuse_server(data)
                return
            self._greeting = None
        super().dataReceived(data)
        self.maybe_park()           # a thread loading: it reads the next answer itself

    def _refuse_server(self, first: bytes) -> None:
        self.wrong_server = WrongServer(describe_greeting(first, peer_text(self.transport)))
        abort = getattr(self.transport, "abortConnection", self.transport.loseConnection)
        abort()

    def call(self, command, **kw) -> Deferred:
        """Send ``command``; a fresh Deferred of its response dict."""
        return self._ask(command, command.makeArguments(kw, self))

    def send(self, command, **kw) -> None:
        """Send a one-way ``command`` (no answer)."""
        twistedcompat.amp_send_box(self, command.commandName,
                                   command.makeArguments(kw, self), False)

    def tpc_begin(self, user: bytes, description: bytes, extension: bytes,
                  tid: bytes | None = None, status: str | None = None) -> None:
        """Open a transaction (one-way); framed by :mod:`zeotwist.wire.commitframes`
        unless it is a restore's (``tid``/``status``) or a field is over 64 KiB."""
        frame = None if tid is not None or status is not None else \
            commitframes.tpc_begin(user, description, extension)
        if frame is None:
            self.send(C.TpcBegin, user=user, description=description, extension=extension,
                      tid=tid, status=status)
        elif self.transport is not None and not twistedcompat.amp_closed(self):
            self.emit(frame)

    def store_data(self, piece) -> None:
        """The hot path of the store stream: one StoreData of ``piece``
        (bytes or a memoryview), framed by :mod:`zeotwist.wire.commitframes`."""
        frame = commitframes.store_data(piece, self.long_values)
        if frame is None:           # over 64 KiB to a server without long entries
            self.send(C.StoreData, data=bytes(piece))
        elif self.transport is not None and not twistedcompat.amp_closed(self):
            self.emit(frame)

    def load_before(self, oid: bytes, tid: bytes) -> Deferred:
        """The hot path: LoadBefore without AMP's generic encoding and parsing.

        Fires with ``(data, start, end)`` or None (never with an AMP-level
        failure: errors are converted like every other answer).
        """
        if twistedcompat.amp_closed(self) or self.transport is None:
            return fail(ClientDisconnected("not connected"))
        if len(oid) != 8 or len(tid) != 8:
            raise ValueError("oids and tids are 8 bytes")
        answer = _LoadAnswer(self)
        tag = twistedcompat.amp_expect_answer(self, answer)
        self.emit(loadframes.load_before_request(tag, oid, tid))
        return answer.result

    def call_frame(self, command, frame) -> Deferred:
        """Like :meth:`call`, the question framed by ``frame(tag)`` (from
        :mod:`zeotwist.wire.commitframes`) instead of AMP's generic encoding."""
        if twistedcompat.amp_closed(self) or self.transport is None:
            return fail(ClientDisconnected("not connected"))
        d = Deferred()
        tag = twistedcompat.amp_expect_answer(self, d)
        self.emit(frame(tag))
        return self._answered(command, d)

    def _ask(self, command, box, parse=None) -> Deferred:
        d = twistedcompat.amp_send_box(self, command.commandName, box, True)
        return self._answered(command, d, parse)

    def _answered(self, command, d: Deferred, parse=None) -> Deferred:
        """A fresh Deferred of the parsed answer AMP hands to ``d``."""
        result = Deferred()
        parse = parse or command.parseResponse

        def done(answer):
            if isinstance(answer, Failure):
                result.errback(convert_failure(answer))
                return
            try:
                value = parse(answer, self)
            except Exception as e:
                self.protocolViolation("bad %s answer: %s" % (
                    command.commandName.decode("ascii"), e))
                result.errback(ClientDisconnected("bad answer from server: %s" % e))
                return
            result.callback(value)

        d.addBoth(done)
        return result

    @C.Invalidate.responder
    def invalidate(self, tid, oids):
        self.invalidations += 1
        self.owner.invalidated(self, tid, oids)
        return {}

    @C.TransactionTimedOut.responder
    def transaction_timed_out(self, timeout, limit=None):
        kind = VoteTimeout if limit == "vote" else TransactionTimeout
        self.timed_out = kind(timeout, peer_text(self.transport))
        # the one line of this event (the connection's loss is not a second)
        _log.warn("zeotwist: {err}; the server drops the connection, the client reconnects",
                  err=str(self.timed_out))
        return {}

    def lost_transaction(self, message: str) -> ClientDisconnected:
        """The error for the transaction this connection carried, now that
        it is gone: the server's transaction or vote timeout if it said so,
        else ClientDisconnected(``message``)."""
        t = self.timed_out
        return ClientDisconnected(message) if t is None else type(t)(t.timeout, t.server)

    def connectionLost(self, reason):
        if self.wrong_server is not None:       # what the waiting calls should hear
            reason = Failure(self.wrong_server)
        self.stop_thread_writes()               # before AMP fails the questions
        self.publish_pending()
        # The owner first: a caller whose call fails here and calls again
        # (synchronously, in its errback) waits for the next connection
        # instead of meeting this dead one.
        self.owner.connection_lost(self, reason)
        super().connectionLost(reason)


def peer_text(transport) -> str:
    """``host:port`` (or the socket path) of the other end, for messages."""
    peer = getattr(transport, "getPeer", lambda: None)()
    if hasattr(peer, "port"):
        return "%s:%s" % (peer.host, peer.port)
    name = getattr(peer, "name", None)
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name or "server")


def describe_greeting(first: bytes, where: str) -> str:
    """Why the server at ``where``, whose first bytes were ``first``, is not ours."""
    version = zeo.protocol_version(zeo.first_message(first) or b"")
    if version is not None:
        return ("%s is a ZEO server (it announced ZEO protocol %s), not a zeotwist server: "
                "use ZEO's ClientStorage for it, or point this client at a zeotwist server "
                "(twistd zeotwist)" % (where, version))
    return "%s is not a zeotwist server (it sent %r first)" % (where, first[:16])


class ClientFactory(Factory):
    noisy = False        # no "Starting factory" line at every connection attempt

    def __init__(self, owner):
        self.owner = owner

    def buildProtocol(self, addr):
        p = ClientProtocol(self.owner)
        p.factory = self
        return p
