"""Several server addresses for one client, tried in turn.

:class:`FailoverEndpoint` is an ``IStreamClientEndpoint`` over a list of
endpoints: ``connect`` tries them in order, starting at :attr:`start`, and
fails only when every one has failed (Twisted's ``ClientService`` then backs
off and tries again).  The client moves :attr:`start` past a server that
accepted the TCP connection but refused the handshake (for instance a
read-only server when the client wants to write), so the next attempt goes
to the next server.  (The probe that looks for a writable server while
fallen back to a read-only one is in :mod:`zeotwist.client.connector`.)

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
        cancelled = []

        def cancel(_):
            cancelled.append(True)      # the next address is not tried
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
                if result.called:        # cancelled while this attempt connected
                    if proto.transport is not None:
                        proto.transport.loseConnection()
                    return
                self.current = i
                result.callback(proto)

            def failed(f):
                if result.called or cancelled:
                    return
                errors.append("%s: %s" % (self.labels[i], f.getErrorMessage()))
                try_one(k + 1)

            d.addCallbacks(connected, failed)

        try_one(0)
        return result
