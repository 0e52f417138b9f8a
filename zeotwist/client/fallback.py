"""The way back from a read-only fallback.

A client started with ``read_only_fallback`` that could register only
read-only keeps looking for a writable server: :class:`WritableProbe` makes a
throwaway connection to each server in turn every ``interval`` seconds and
asks for a writable Register; the first that accepts is handed to the
:class:`~zeotwist.client.connector.Connector`, which reconnects there.

Runs on the reactor thread.
"""
from zeotwist.client.protocol import ClientFactory


class _Silent:
    """The owner a probe connection reports to: it wants nothing."""

    def __init__(self, reactor):
        self.reactor = reactor

    def invalidated(self, proto, tid, oids) -> None:
        pass

    def connection_lost(self, proto, reason) -> None:
        pass


class WritableProbe:
    """While a ``read_only_fallback`` client sits on a read-only server, look
    for a writable one every ``interval`` seconds (a throwaway connection and
    a writable Register); when one answers, tell the connector to move."""

    def __init__(self, connector, interval: float):
        self._connector = connector
        self._interval = interval
        self._call = None
        self._stopped = False

    def schedule(self) -> None:
        if self._stopped or (self._call is not None and self._call.active()):
            return
        self._call = self._connector.reactor.callLater(self._interval, self._run)

    def stop(self) -> None:
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()

    def _run(self) -> None:
        connector = self._connector
        if not (connector.protocol is not None and connector.server_read_only):
            return
        endpoints = list(getattr(connector.endpoint, "endpoints", [connector.endpoint]))
        factory = ClientFactory(_Silent(connector.reactor))

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
        d = self._connector.send_register(proto, False)

        def done(result):
            if proto.transport is not None:
                proto.transport.loseConnection()
            if isinstance(result, dict):
                self._connector.writable_server_found(index)
                return True
            return False

        return d.addBoth(done)
