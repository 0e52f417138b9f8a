"""The client's pool of new object ids, topped up a batch ahead.

ZEO's client asks its server for 100 oids whenever its pool is empty, so a
thread allocating oids steadily waits for a round trip once per 100.  Here,
once the pool holds less than a batch, the next batch is asked for in the
background (``NewOids`` through the reactor): such a thread takes its oids
from the pool and never waits.  Oids are never handed out twice across
servers or restarts: the pool is emptied at every registration
(:meth:`OidPool.clear`), and a batch answered on a connection that is no
longer the current one is dropped.

:meth:`OidPool.take` runs in any thread; the rest on the reactor thread.
"""
from collections import deque

from twisted.internet.defer import Deferred, succeed

from zeotwist.wire import commands as C

#: Oids asked for per NewOids.
OID_BATCH = 100


class OidPool:
    """The oids of one :class:`~zeotwist.client.client.Client`.

    :param reactor: where a background refill is scheduled from another thread.
    :param protocol: ``protocol()``: the current connection's protocol, or None.
    :param call: ``call(command, **kw)``: a Deferred of the answer, once connected.
    """

    def __init__(self, reactor, protocol, call):
        self._reactor, self._protocol, self._call = reactor, protocol, call
        self._oids: deque = deque()
        #: a NewOids to top the pool up is on its way
        self.refilling = False

    def __len__(self) -> int:
        return len(self._oids)

    def __iter__(self):
        """The oids in the pool now (a copy)."""
        return iter(list(self._oids))

    def clear(self) -> None:
        """Forget every oid in the pool (at a registration)."""
        self._oids.clear()

    def take(self) -> bytes | None:
        """An oid from the pool, or None when it is empty (any thread);
        under a batch left, the next one is asked for in the background."""
        try:
            oid = self._oids.popleft()
        except IndexError:
            return None
        if len(self._oids) < OID_BATCH and not self.refilling:   # inline: per oid
            self._top_up(self._reactor.callFromThread)
        return oid

    def _top_up(self, schedule) -> None:
        """Under a batch left in the pool: ``schedule(refill)`` once."""
        if len(self._oids) < OID_BATCH and not self.refilling:
            self.refilling = True
            schedule(self.refill)

    def refill(self) -> None:
        """Top the pool up by one batch (reactor thread).  Oids answered on
        a connection that is no longer the current one are dropped."""
        proto = self._protocol()
        if proto is None:
            self.refilling = False
            return

        def got(answer):
            if self._protocol() is proto:
                self._oids.extend(answer["oids"])

        def done(_):
            self.refilling = False

        proto.call(C.NewOids, count=OID_BATCH).addCallbacks(got, lambda f: None) \
            .addBoth(done)

    def new_oid(self) -> Deferred:
        """A fresh oid: from the pool, else from the server (one batch)."""
        if self._oids:
            return succeed(self._oids.popleft())
        d = self._call(C.NewOids, count=OID_BATCH)

        def got(r):
            self._oids.extend(r["oids"])
            oid = self._oids.popleft()
            self._top_up(lambda refill: refill())     # on the reactor thread already
            return oid

        return d.addCallback(got)
