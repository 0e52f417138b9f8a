"""The client's pool of new object ids.

ZEO's client asks its server for 100 oids whenever its pool is empty, so a
thread allocating oids steadily waits for a round trip once per 100,
through ZEO's I/O thread.  Here the thread takes its oids from the pool,
and when the pool is empty it asks for the next batch itself and reads the
answer itself (:meth:`OidPool.from_thread`, threadwrites and threadreads:
no other thread woken), at the cost of a cold load; each such batch is
twice the last, up to 1,000 (reset at a registration).  Through the reactor
(the Deferred API, or a transport a thread may not write to), the batch
that answers an empty pool is followed by one more asked in the background
(``NewOids`` through the reactor).  A background refill of a pool that
threads drain (``callFromThread`` at each low-water mark, as before) lost
to the GIL: the reactor thread waited for a thread that never blocked, and
half the batches were waited for anyway (docs/performance.md, "Issue 10,
eighth session").  Oids are never handed out twice across servers or
restarts: the pool is emptied at every registration
(:meth:`OidPool.clear`), and a batch answered on a connection that is no
longer the current one is dropped.

:meth:`OidPool.take` and :meth:`OidPool.from_thread` run in any thread; the
rest on the reactor thread.
"""
from collections import deque

from twisted.internet.defer import Deferred, succeed
from twisted.protocols import amp

from zeotwist.client.threadwrites import ThreadAnswer, answer_matcher, thread_tag
from zeotwist.twistedcompat import calls_pending
from zeotwist.wire import commands as C

#: Oids asked for per NewOids (ZEO's batch); a thread's first ask.
OID_BATCH = 100
#: A thread that empties the pool again asks for twice its last batch, up
#: to this (the server's limit, ``session.MAX_NEW_OIDS``).
OID_BATCH_MAX = 1000


class OidPool:
    """The oids of one :class:`~zeotwist.client.client.Client`.

    :param reactor: the client's reactor.
    :param protocol: ``protocol()``: the current connection's protocol, or None.
    :param call: ``call(command, **kw)``: a Deferred of the answer, once connected.
    """

    def __init__(self, reactor, protocol, call):
        self._reactor, self._protocol, self._call = reactor, protocol, call
        self._oids: deque = deque()
        #: a NewOids to top the pool up is on its way
        self.refilling = False
        #: the next batch a thread asks for (from_thread)
        self.thread_batch = OID_BATCH

    def __len__(self) -> int:
        return len(self._oids)

    def __iter__(self):
        """The oids in the pool now (a copy)."""
        return iter(list(self._oids))

    def clear(self) -> None:
        """Forget every oid in the pool (at a registration); a thread's
        next batch is OID_BATCH again."""
        self._oids.clear()
        self.thread_batch = OID_BATCH

    def take(self) -> bytes | None:
        """An oid from the pool, or None when it is empty (any thread)."""
        try:
            return self._oids.popleft()
        except IndexError:
            return None

    def _top_up(self) -> None:
        """Under a batch left in the pool (reactor thread): one refill at a time."""
        if len(self._oids) < OID_BATCH and not self.refilling:
            self.refilling = True
            self.refill()

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

    def from_thread(self):
        """From a thread other than the reactor's, the pool empty: a
        ``ThreadAnswer`` of a NewOids this thread sends (and may read
        itself, threadreads; its result: one of the batch's oids, the rest
        go to the pool, or None), or None when it may not send it (as
        ``Client.load_from_thread``): then :meth:`new_oid` through the
        reactor.  The batch doubles at each such ask, from OID_BATCH to
        OID_BATCH_MAX, until the next registration: a thread that keeps
        allocating waits for a round trip once per 1,000 oids, and at most
        as many are left unused when the connection ends."""
        proto = self._protocol()
        if proto is None or calls_pending(self._reactor):
            return None
        tag, count = thread_tag(), self.thread_batch
        self.thread_batch = min(2 * count, OID_BATCH_MAX)
        box = C.NewOids.makeArguments({"count": count}, proto)
        box[amp.COMMAND], box[amp.ASK] = C.NewOids.commandName, tag

        def parse(answer_box) -> list:
            return C.NewOids.parseResponse(answer_box, proto)["oids"]

        taken = []

        def then(oids: list):
            """The answer, on the reactor thread or (read by the asking
            thread) under the protocol's send lock: dropped when answered on
            a connection no longer the current one, as a refill's.  Run
            again after a signal handler's exception (ThreadAnswer.retake),
            it adds nothing twice: the rest of the batch may be lost then,
            never handed out twice."""
            if taken or not oids or self._protocol() is not proto:
                return taken[0] if taken else None
            taken.append(oids[0])
            self._oids.extend(oids[1:])
            return oids[0]

        answer = ThreadAnswer(proto, tag, "NewOids", parse, then, _same,
                              (answer_matcher(parse), then))
        return answer if proto.ask_from_thread(box.serialize(), answer, True) else None

    def new_oid(self) -> Deferred:
        """A fresh oid: from the pool, else from the server (one batch)."""
        if self._oids:
            return succeed(self._oids.popleft())
        d = self._call(C.NewOids, count=OID_BATCH)

        def got(r):
            self._oids.extend(r["oids"])
            oid = self._oids.popleft()
            self._top_up()
            return oid

        return d.addCallback(got)


def _same(value):
    return value
