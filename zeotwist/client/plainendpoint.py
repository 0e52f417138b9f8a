"""Client endpoints for plain TCP and Unix sockets, without Twisted's
``endpoints`` module.

``twisted.internet.endpoints`` imports ``twisted.plugin`` (and with it
``zipfile``, ``twisted.python.modules``), ``stdio`` and ``systemd`` for its
string parsers and server endpoints: 0.8 MB of a client's resident memory
(docs/performance.md, "Memory").  The addresses most clients give, ``(host,
port)``, ``"host:port"``, a port, a socket path, need none of it: they
become a :class:`PlainEndpoint`, which does what Twisted's
``TCP4ClientEndpoint`` and ``UNIXClientEndpoint`` do (``reactor.connectTCP``
or ``connectUNIX``, 30 s timeout; the Deferred fires with the protocol once
connected; cancelling it stops the attempt).  Endpoint strings and TLS still
go through Twisted's module, imported then (:mod:`zeotwist.client.addresses`).
"""
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectingCancelledError, NoProtocol
from twisted.internet.interfaces import (
    IFileDescriptorReceiver, IHalfCloseableProtocol, IHandshakeListener, ILoggingContext,
    IStreamClientEndpoint)
from twisted.internet.protocol import ClientFactory, Protocol
from zope.interface import directlyProvides, implementer

#: seconds a connection attempt may take (Twisted's endpoint strings' default)
TIMEOUT = 30


@implementer(IStreamClientEndpoint)
class PlainEndpoint:
    """A TCP (``host``, ``port``) or Unix socket (``path``) client endpoint
    (Twisted's endpoints' attribute names: ``_host``, ``_port``, ``_path``)."""

    def __init__(self, reactor, host: str | None = None, port: int = 0,
                 path: str | None = None, timeout: float = TIMEOUT):
        self._reactor, self._host, self._port, self._path = reactor, host, port, path
        self._timeout = timeout

    def __repr__(self) -> str:
        where = self._path if self._path is not None else "%s:%d" % (self._host, self._port)
        return "<PlainEndpoint %s>" % (where,)

    def connect(self, factory) -> Deferred:
        try:
            wrapping = _WrappingFactory(factory)
            if self._path is not None:
                self._reactor.connectUNIX(self._path, wrapping, timeout=self._timeout)
            else:
                self._reactor.connectTCP(self._host, self._port, wrapping, timeout=self._timeout)
            return wrapping.connected
        except BaseException:
            return fail()


class _WrappingProtocol(Protocol):
    """Fires the endpoint's Deferred with the protocol once connected, and
    passes the connection's events on to it (as Twisted's endpoints do)."""

    def __init__(self, connected: Deferred, wrapped):
        self._connected, self._wrapped = connected, wrapped
        for iface in (IHalfCloseableProtocol, IFileDescriptorReceiver, IHandshakeListener):
            if iface.providedBy(wrapped):
                directlyProvides(self, iface)

    def logPrefix(self) -> str:
        if ILoggingContext.providedBy(self._wrapped):
            return self._wrapped.logPrefix()
        return self._wrapped.__class__.__name__

    def connectionMade(self):
        self._wrapped.makeConnection(self.transport)
        self._connected.callback(self._wrapped)

    def dataReceived(self, data):
        return self._wrapped.dataReceived(data)

    def fileDescriptorReceived(self, descriptor):
        return self._wrapped.fileDescriptorReceived(descriptor)

    def connectionLost(self, reason):
        return self._wrapped.connectionLost(reason)

    def readConnectionLost(self):
        self._wrapped.readConnectionLost()

    def writeConnectionLost(self):
        self._wrapped.writeConnectionLost()

    def handshakeCompleted(self):
        self._wrapped.handshakeCompleted()


class _WrappingFactory(ClientFactory):
    def __init__(self, wrapped):
        self._wrapped = wrapped
        self._connector = None
        self.connected = Deferred(canceller=self._cancel)

    def startedConnecting(self, connector):
        self._connector = connector

    def _cancel(self, deferred):
        deferred.errback(ConnectingCancelledError(self._connector.getDestination()))
        self._connector.stopConnecting()

    def doStart(self):
        self._wrapped.doStart()

    def doStop(self):
        self._wrapped.doStop()

    def buildProtocol(self, addr):
        try:
            protocol = self._wrapped.buildProtocol(addr)
            if protocol is None:
                raise NoProtocol()
        except BaseException:
            self.connected.errback()
            return None
        return _WrappingProtocol(self.connected, protocol)

    def clientConnectionFailed(self, connector, reason):
        if not self.connected.called:
            self.connected.errback(reason)
