"""A small TCP proxy for link-failure tests, run on a reactor thread.

    proxy = Proxy.start(server.address)        # listens on 127.0.0.1:<free port>
    ClientStorage(proxy.address, ...)           # the client talks through it
    proxy.cut(refuse=True)                      # drop every proxied link, refuse new ones
    proxy.allow()                               # accept (and forward) again
    proxy.stop()

Every method is called from the test thread and waits (bounded) for the
reactor thread to have done it.  Refusing means: a new connection is
accepted and aborted at once, so the client sees its connection attempt
fail the way a dead link does (and retries with its backoff).
"""
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol

from zeotwist.client.reactorthread import background_reactor, blocking_call


class _Upstream(Protocol):
    """The proxy's connection to the server: bytes go back to the client."""

    def __init__(self, downstream):
        self.downstream = downstream

    def dataReceived(self, data):
        if self.downstream.transport is not None:
            self.downstream.transport.write(data)

    def connectionLost(self, reason):
        self.downstream.upstream_lost()


class _Downstream(Protocol):
    """A client's connection to the proxy."""

    upstream = None
    closed = False

    def connectionMade(self):
        proxy = self.factory.proxy
        proxy.accepted += 1
        if proxy.refusing:
            proxy.refused += 1
            self.transport.abortConnection()
            return
        proxy.links.add(self)
        self.transport.pauseProducing()      # nothing read until the server side is up
        d = proxy.target.connect(_OneShot(_Upstream(self)))
        d.addCallbacks(self._up, self._no_server)

    def _up(self, upstream):
        if self.closed:
            upstream.transport.abortConnection()
            return
        self.upstream = upstream
        self.transport.resumeProducing()

    def _no_server(self, failure):
        self.transport.abortConnection()

    def dataReceived(self, data):
        self.upstream.transport.write(data)

    def upstream_lost(self):
        if not self.closed:
            self.transport.loseConnection()

    def abort(self):
        self.transport.abortConnection()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.abortConnection()

    def connectionLost(self, reason):
        self.closed = True
        self.factory.proxy.links.discard(self)
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.loseConnection()


class _OneShot(Factory):
    def __init__(self, protocol):
        self.protocol_instance = protocol

    def buildProtocol(self, addr):
        return self.protocol_instance


class Proxy:
    def __init__(self, reactor, target):
        self.reactor = reactor
        self.target = target
        self.refusing = False
        self.links: set = set()
        self.accepted = 0          # connections accepted, refused ones included
        self.refused = 0
        self.port = None

    @classmethod
    def start(cls, server_address, reactor=None) -> "Proxy":
        """A proxy to ``(host, port)`` listening on 127.0.0.1, started."""
        reactor = reactor or background_reactor()
        host, port = server_address
        proxy = cls(reactor, TCP4ClientEndpoint(reactor, host, port, timeout=5))
        factory = Factory.forProtocol(_Downstream)
        factory.proxy = proxy

        def listen():
            d = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
            return d.addCallback(lambda p: setattr(proxy, "port", p))

        blocking_call(reactor, listen, timeout=10)
        return proxy

    @property
    def address(self):
        host = self.port.getHost()
        return host.host, host.port

    def cut(self, refuse: bool = False) -> int:
        """Abort every proxied link (both sides); with ``refuse``, also refuse
        new connections until :meth:`allow`.  Returns how many links were cut."""
        def cut():
            self.refusing = refuse
            links = list(self.links)
            for link in links:
                link.abort()
            return len(links)
        return blocking_call(self.reactor, cut, timeout=10)

    def allow(self) -> None:
        def allow():
            self.refusing = False
        blocking_call(self.reactor, allow, timeout=10)

    def stop(self) -> None:
        def stop():
            self.refusing = True
            for link in list(self.links):
                link.abort()
            return self.port.stopListening()
        blocking_call(self.reactor, stop, timeout=10)
