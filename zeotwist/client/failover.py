"""Several server addresses for one client, tried in turn.

:class:`FailoverEndpoint` is an ``IStreamClientEndpoint`` over a list of
endpoints: ``connect`` tries them in order, starting at :attr:`start`, and
fails only when every one has failed (Twisted's ``ClientService`` then backs
off and tries again).  The client moves :attr:`start` past a server that
accepted the TCP connection but refused the handshake (for instance a
read-only server when the client wants to write), so the next attempt goes
to the next server.

Runs on the reactor thread.
"""
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IStreamClientEndpoint
from zope.interface import implementer


@implementer(IStreamClientEndpoint)
class FailoverEndpoint:
    def __init__(self, endpoints, labels=None):
        if not endpoints:
            raise ValueError("at least one server address is needed")
        self.endpoints = list(endpoints)
        self.labels = list(labels or map(repr, self.endpoints))
        self.start = 0
        #: index of the endpoint of the last successful connection
        self.current: int | None = None

    def __len__(self) -> int:
        return len(self.endpoints)

    def skip_current(self) -> None:
        """Begin the next attempt with the server after the current one."""
        if self.current is not None:
            self.start = (self.current + 1) % len(self.endpoints)

    def connect(self, factory) -> Deferred:
        attempt = [None]
        errors = []

        def cancel(_):
            if attempt[0] is not None:
                attempt[0].cancel()

        result = Deferred(cancel)
        n = len(self.endpoints)

        def try_one(k):
            if k == n:
                result.errback(ConnectError(string="no zeotwist server reachable: " + "; ".join(errors)))
                return
            i = (self.start + k) % n
            d = attempt[0] = self.endpoints[i].connect(factory)

            def connected(proto):
                self.current = i
                result.callback(proto)

            def failed(f):
                if result.called:        # cancelled
                    return
                errors.append("%s: %s" % (self.labels[i], f.getErrorMessage()))
                try_one(k + 1)

            d.addCallbacks(connected, failed)

        try_one(0)
        return result


class _Silent:
    """The client a probe connection reports to: it wants nothing."""

    def _invalidated(self, proto, tid, oids):
        pass

    def _connection_lost(self, proto, reason):
        pass


class WritableProbe:
    """While a ``read_only_fallback`` client sits on a read-only server, look
    for a writable one every ``interval`` seconds (a throwaway connection and
    a writable Register); when one answers, tell the client to move."""

    def __init__(self, client, interval: float):
        self._client = client
        self._interval = interval
        self._call = None
        self._stopped = False

    def schedule(self) -> None:
        if self._stopped or (self._call is not None and self._call.active()):
            return
        self._call = self._client.reactor.callLater(self._interval, self._run)

    def stop(self) -> None:
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()

    def _run(self) -> None:
        from zeotwist.client.protocol import ClientFactory
        client = self._client
        if not (client.is_connected and client.server_read_only):
            return
        endpoints = list(getattr(client.endpoint, "endpoints", [client.endpoint]))
        factory = ClientFactory(_Silent())

        def try_index(i):
            if i == len(endpoints):
                self.schedule()
                return
            d = endpoints[i].connect(factory)
            d.addCallback(lambda proto: self._try_register(proto, i))
            d.addErrback(lambda f: False)
            d.addCallback(lambda found: None if found else try_index(i + 1))

        try_index(0)

    def _try_register(self, proto, index):
        client = self._client
        d = client._send_register(proto, False)

        def done(result):
            if proto.transport is not None:
                proto.transport.loseConnection()
            if isinstance(result, dict):
                client._writable_server_found(index)
                return True
            return False

        return d.addBoth(done)
