"""The client end of one connection: typed calls out, Invalidate in.

:meth:`ClientProtocol.call` sends a command and returns a *fresh* Deferred
that fires with the parsed response or a typed exception (rebuilt from the
wire code by :mod:`zeotwist.wire.codes`); the AMP-level Deferred always ends
handled, so an error answer never drops the connection.  The server's
``Invalidate`` is handed to the owning :class:`~zeotwist.client.client.Client`
synchronously, in the order boxes arrive, and so is every answer: a load
result reaches the cache before the next box is parsed.

Runs on the reactor thread.
"""
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionClosed
from twisted.internet.protocol import Factory
from twisted.protocols import amp
from twisted.python.failure import Failure

from zeotwist.errors import ClientDisconnected
from zeotwist.tls import use_clock
from zeotwist.wire import commands as C
from zeotwist.wire.codes import rebuild
from zeotwist.wire.framing import (
    CLIENT_MAX_BOX_BYTES, CLIENT_MAX_BOX_KEYS, BoundedAMP, frame as _frame)


def _convert(failure: Failure) -> BaseException:
    err = failure.value
    if isinstance(err, amp.RemoteAmpError):
        return rebuild(err.errorCode, err.description)
    if failure.check(ConnectionClosed, amp.ProtocolSwitched):
        return ClientDisconnected("connection to the server was lost: %s" % (err,))
    return err


def _fast_parse_load(box, proto):
    if box.get(b"found") != b"True":
        return None
    if b"data.1" in box:                       # a record over 64 KiB: the generic way
        r = C.LoadBefore.parseResponse(box, proto)
        return r["data"], r["start"], r["end"]
    start, end = box[b"start"], box.get(b"end")
    if len(start) != 8 or (end is not None and len(end) != 8):
        raise ValueError("tids must be 8 bytes")
    return box[b"data"], start, end



class ClientProtocol(BoundedAMP):
    maxBoxBytes = CLIENT_MAX_BOX_BYTES
    maxBoxKeys = CLIENT_MAX_BOX_KEYS

    def __init__(self, client):
        super().__init__()
        self.client = client

    def connectionMade(self):
        super().connectionMade()
        use_clock(self.transport, getattr(self.client, "reactor", None))   # TLS: see zeotwist.tls

    def call(self, command, **kw) -> Deferred:
        """Send ``command``; a fresh Deferred of its response dict."""
        return self._ask(command, command.makeArguments(kw, self))

    def send(self, command, **kw) -> None:
        """Send a one-way ``command`` (no answer)."""
        self._sendBoxCommand(command.commandName, command.makeArguments(kw, self), False)

    def load_before(self, oid: bytes, tid: bytes) -> Deferred:
        """The hot path: LoadBefore without AMP's generic encoding and parsing.

        Fires with ``(data, start, end)`` or None (never with an AMP-level
        failure: errors are converted like every other answer).
        """
        if self._failAllReason is not None or self.transport is None:
            return fail(ClientDisconnected("not connected"))
        tag = self._nextTag()
        d = self._outstandingRequests[tag] = Deferred()
        self.emit(_frame(b"_ask", tag, b"_command", b"LoadBefore", b"oid", oid, b"tid", tid))
        result = Deferred()

        def done(box):
            if isinstance(box, Failure):
                result.errback(_convert(box))
                return
            try:
                value = _fast_parse_load(box, self)
            except Exception as e:
                self.protocolViolation("bad LoadBefore answer: %s" % e)
                result.errback(ClientDisconnected("bad answer from server: %s" % e))
                return
            result.callback(value)

        d.addBoth(done)
        return result

    def _ask(self, command, box, parse=None) -> Deferred:
        result = Deferred()
        parse = parse or command.parseResponse
        d = self._sendBoxCommand(command.commandName, box, True)

        def done(answer):
            if isinstance(answer, Failure):
                result.errback(_convert(answer))
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
        self.client._invalidated(self, tid, oids)
        return {}

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.client._connection_lost(self, reason)


class ClientFactory(Factory):
    def __init__(self, client):
        self.client = client

    def buildProtocol(self, addr):
        p = ClientProtocol(self.client)
        p.factory = self
        return p
