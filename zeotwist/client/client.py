"""Client: the Deferred API to one storage on a zeotwist server.

Every method returns a Deferred (or a plain value where nothing needs the
network).  The connection lifecycle (reconnection, Login, Register, Verify,
read-only fallback) belongs to :mod:`zeotwist.client.connector`, so
``when_connected`` fires only for a registered connection whose cache is up
to date.  Invalidations reach subscribers through :attr:`Client.events`
(:mod:`zeotwist.client.events`), the one subscription mechanism.

Visibility rule: a transaction id becomes this client's
``last_transaction()`` only *after* the cache and every listener (ZODB's DB)
have applied its invalidations, all under :attr:`Client.visibility_lock`;
otherwise a ZODB connection could start a snapshot at that tid and still
hold stale objects (:meth:`Client.make_visible`).

Runs on the reactor thread (the two-phase commit is in
:mod:`zeotwist.client.transaction`).
"""
from threading import RLock

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure
from ZODB.POSException import POSKeyError, ReadOnlyError
from ZODB.utils import maxtid, z64

from zeotwist.client.cache import ClientCache
from zeotwist.client.connector import Connector
from zeotwist.client.events import Invalidation, InvalidationEvents
from zeotwist.client.oids import OidPool
from zeotwist.client.reactorthread import in_reactor_thread
from zeotwist.client.reconnect import backoff
from zeotwist.client.storagecalls import StorageCallsMixin
from zeotwist.client.transaction import ClientTransaction
from zeotwist.errors import ClientDisconnected, UsageError
from zeotwist.twistedcompat import calls_pending
from zeotwist.tls import describe_error
from zeotwist.wire import commands as C


def _from_connector(name: str, doc: str | None = None) -> property:
    """A read-only attribute of the client kept by its connector."""
    return property(lambda self: getattr(self.connector, name), doc=doc)


def open_db(client: "Client", storage_factory, **kw) -> Deferred:
    """``ZODB.DB(storage_factory(client), **kw)`` built in a worker thread
    (``ZODB.DB`` reads the root while it is built)."""
    import time

    import ZODB
    from twisted.internet.threads import deferToThreadPool
    from ZODB.POSException import ConflictError
    storage = storage_factory(client)

    def build():
        # Processes opening an empty database together race to create
        # its root: the losers get a conflict and simply try again.
        for attempt in range(10):
            try:
                return ZODB.DB(storage, **kw)
            except ConflictError:
                if attempt == 9:
                    raise
                time.sleep(0.02 * (attempt + 1))     # backoff, in a worker thread

    def failed(failure):
        storage.close()
        return failure

    reactor = client.reactor
    return deferToThreadPool(reactor, reactor.getThreadPool(), build).addErrback(failed)


class Client(StorageCallsMixin):
    """The Deferred API to one storage; its connection is kept by a
    :class:`~zeotwist.client.connector.Connector` (:attr:`connector`)."""

    def __init__(self, reactor, endpoint, *, storage: str = "1", read_only: bool = False,
                 cache: ClientCache | None = None, cache_size: int = 20 * 2**20,
                 wait_timeout: float = 30.0, retry_policy=None,
                 read_only_fallback: bool = False, fallback_check_interval: float = 5.0,
                 credentials: tuple | None = None, storage_factory=None,
                 allow_older_server: bool = False, reference_prefetch: bool = True):
        self.reactor = reactor
        #: ask the server for reference prefetch (records of referenced
        #: objects in LoadBefore answers, stored in the cache by the protocol)
        self.reference_prefetch = reference_prefetch
        self.prefetched = 0          # records so received
        self.storage_name = storage
        self.read_only = read_only
        self.cache = cache if cache is not None else ClientCache(cache_size)
        self.wait_timeout = wait_timeout
        self.visibility_lock = RLock()
        #: Every transaction this client learns of: the one subscription
        #: mechanism, for ZODB's DB (``before_visible``) and reactor programs.
        self.events = InvalidationEvents()
        #: ``storage_factory(client)`` makes the ClientStorage of :meth:`open_db`
        self._storage_factory = storage_factory
        #: new object ids, topped up a batch ahead (:mod:`zeotwist.client.oids`)
        self.oids = OidPool(reactor, lambda: self.connector.protocol, self.call)
        self._loads: dict = {}
        # capped exponential backoff; up to 0.25 s of jitter spreads out
        # many clients reconnecting to a restarted server
        retry_policy = retry_policy or backoff()
        self.connector = Connector(
            self, endpoint, retry_policy, credentials=credentials,
            read_only_fallback=read_only_fallback and not read_only,
            fallback_check_interval=fallback_check_interval, on_register=self.oids.clear,
            allow_older_server=allow_older_server)
        # never hand out an oid twice across servers/restarts: the pool is
        # emptied at every registration (on_register above)

    # -- connection (kept by the connector) ---------------------------------------
    def start(self) -> None:
        self.connector.start()

    def stop(self) -> Deferred:
        return self.connector.stop()

    def set_endpoint(self, endpoint) -> Deferred:
        """Use other server address(es) from now on (ZEO's ``new_addr``):
        drop the current connection and connect to ``endpoint``; the cache
        is verified against the new server as after any reconnection.
        Fires once the old connection is closed and the new service runs."""
        return self.connector.set_endpoint(endpoint)

    endpoint = _from_connector("endpoint", "The server address(es) as an endpoint.")
    credentials = _from_connector(
        "credentials", "(username, password) sent in Login before every Register; a "
        "None password logs in with the TLS client certificate (docs/tls-auth.md).")
    read_only_fallback = _from_connector("read_only_fallback")
    protocol = _from_connector(
        "protocol", "The registered connection's protocol, or None while disconnected.")
    connections = _from_connector("connections", "How many times this client registered.")
    server_name = _from_connector("server_name")
    server_read_only = _from_connector("server_read_only")
    server_interfaces = _from_connector(
        "server_interfaces", "Optional ZODB interfaces of the served storage (Register).")
    supports_undo = _from_connector("supports_undo")

    @property
    def is_connected(self) -> bool:
        return self.connector.protocol is not None

    def when_connected(self, timeout: float | None = None) -> Deferred:
        """The registered protocol, or ClientDisconnected after ``timeout``."""
        proto = self.connector.protocol
        if proto is not None:
            return succeed(proto)
        timeout = self.wait_timeout if timeout is None else timeout
        d = self.connector.when_connected()
        d.addTimeout(timeout, self.reactor)
        d.addErrback(self._not_connected, timeout)
        return d

    def _not_connected(self, failure, timeout):
        refused = self.connector.refused
        if refused is not None:         # permanent: no use waiting for the timeout
            raise refused
        last = self.connector.last_error
        why = " (last error: %s)" % describe_error(last) if last else ""
        raise ClientDisconnected(
            "no connection to the zeotwist server within %g s%s" % (timeout, why)) from last

    # -- visibility: the cache, then ZODB, then last_transaction() ---------------------
    def make_visible(self, tid: bytes, event: Invalidation | None, update=None,
                     then=None, later=None) -> None:
        """Make ``tid`` this client's last transaction: under the visibility
        lock, ``update()`` the cache, deliver ``event`` to the
        ``before_visible`` subscribers, set the cache's last tid and run
        ``then()``; deliver ``event`` to everyone else after (from another
        thread than the reactor's: ``later(stage_two, listened)`` has the
        reactor thread call ``stage_two()``).  The tid becomes visible only
        once the rest is done.  Run again after an exception cut it short
        (a signal handler's, in an application thread applying
        invalidations: commitreads.take_invalidations), it does each step
        once: ``update`` is idempotent for an invalidation, the subscribers
        not called yet are called, ``later`` is given the event once."""
        with self.visibility_lock:
            if update is not None:
                update()
            if event is not None:
                self.events.publish_before_visible(event)
            self.cache.last_tid = tid
            if then is not None:
                then()
        if event is None:
            return
        if later is not None:
            later(self.events.stage_two(event), self.events.listened())
        else:
            self.events.publish(event)

    def apply_invalidation(self, tid: bytes, oids, later=None) -> None:
        """Another client committed ``tid`` changing ``oids`` (pushed by the
        server); ``later``: see :meth:`make_visible`."""
        def invalidate():
            invalidate_one = self.cache.invalidate
            for oid in oids:
                invalidate_one(oid, tid)
        self.make_visible(tid, Invalidation(tid, tuple(oids)), invalidate, later=later)

    def committed(self, tid: bytes, written: dict, resolved, callback, later=None) -> None:
        """This client committed ``tid``: refresh the cache with ``written``
        (oid -> data, None when not kept), invalidate the oids the server
        ``resolved`` without our data (undone), run ZODB's ``callback(tid)``
        (``later``: see :meth:`make_visible`)."""
        changed = [oid for oid in resolved if oid not in written]   # undone

        def refresh():
            cache = self.cache
            for oid, data in written.items():
                cache.invalidate(oid, tid)
                if data is not None and oid not in resolved:
                    cache.store(oid, tid, None, data)
            for oid in changed:
                cache.invalidate(oid, tid)
            if callback is not None:
                callback(tid)

        event = Invalidation(tid, tuple(written) + tuple(changed), local=True)
        self.make_visible(tid, event, refresh, later=later)

    def store_prefetched(self, records: list) -> None:
        """Cache the records that rode along with a LoadBefore answer
        (``[(oid, data, start, end)]``, zeotwist.wire.prefetch), each with
        its exact validity.  Called while the answer's box is handled, so
        before any later Invalidate is applied: one that ends a revision
        stored here finds it in the cache and ends it."""
        self.cache.store_prefetched(records)
        self.prefetched += len(records)

    # -- reads -------------------------------------------------------------------
    def last_transaction(self) -> bytes:
        with self.visibility_lock:
            return self.cache.last_tid or z64

    def load_before(self, oid: bytes, tid: bytes) -> Deferred:
        """``(data, start_tid, end_tid)`` valid just before ``tid``, or None.

        Served from the cache when possible; concurrent requests for the same
        revision share one round trip.
        """
        r = self.cache.loadBefore(oid, tid)
        if r is not None:
            return succeed(r)
        return self.fetch_before(oid, tid)

    def fetch_before(self, oid: bytes, tid: bytes) -> Deferred:
        """``load_before`` after a cache miss: ask the server (requests for
        the same revision in flight share one round trip)."""
        key = oid + tid
        waiters = self._loads.get(key)
        if waiters is not None:
            d = Deferred()
            waiters.append(d)
            return d
        proto = self.connector.protocol
        if proto is None:
            return self.when_connected().addCallback(lambda _: self.fetch_before(oid, tid))
        self._loads[key] = []        # later requests for the same revision wait here
        return proto.load_before(oid, tid).addBoth(self._loaded, oid, key)

    def load_from_thread(self, oid: bytes, tid: bytes):
        """``fetch_before`` from a thread other than the reactor's, sent by
        that thread (:mod:`zeotwist.client.threadwrites`): a ``ThreadLoad``
        to ``wait()`` on, or None when the reactor must send it (not
        connected; a request for the same revision in flight, whose answer
        it should share; calls handed to the reactor before this one, which
        it must not overtake; a transport this thread may not write to)."""
        proto = self.connector.protocol
        if proto is None or oid + tid in self._loads or calls_pending(self.reactor):
            return None
        return proto.load_before_from_thread(oid, tid, self.cache.store, self.cache.make_room)

    def catch_up(self, timeout: float) -> None:
        """From a thread other than the reactor's: handle what the server
        has sent so far before going on (``CommitReads.catch_up``,
        :mod:`zeotwist.client.commitreads`)."""
        proto = self.connector.protocol
        if proto is not None and not in_reactor_thread(self.reactor):
            proto.catch_up(timeout)

    def _loaded(self, result, oid, key):
        """Cache a load's answer and hand it to every waiter; passes it on."""
        waiters = self._loads.pop(key, ())
        if isinstance(result, Failure):
            for d in waiters:
                d.errback(result)
            return result
        if result is not None:
            data, start, end = result
            self.cache.store(oid, start, end, data)
        for d in waiters:
            d.callback(result)
        return result

    def load(self, oid: bytes) -> Deferred:
        """The current revision as ``(data, tid)``; POSKeyError if there is none."""
        def current(r):
            if r is None:
                raise POSKeyError(oid)
            return r[:2]
        return self.load_before(oid, maxtid).addCallback(current)

    def load_serial(self, oid: bytes, serial: bytes) -> Deferred:
        return self.call(C.LoadSerial, oid=oid, serial=serial).addCallback(
            lambda r: r["data"])

    def info(self) -> Deferred:
        return self.call(C.Info)

    def ping(self) -> Deferred:
        """One round trip; every invalidation sent before it has arrived after it."""
        return self.call(C.LastTransaction).addCallback(lambda r: r["tid"])

    def new_oid(self) -> Deferred:
        """A fresh object id (from the pool, :attr:`oids`, else the server)."""
        return self.oids.new_oid()

    def new_oids(self, count: int) -> Deferred:
        """A list of ``count`` fresh object ids (from the pool, then the server)."""
        from twisted.internet.defer import gatherResults
        return gatherResults([self.new_oid() for _ in range(count)], consumeErrors=True)

    def call(self, command, **kw) -> Deferred:
        """Send ``command`` (from :mod:`zeotwist.wire.commands`) once
        connected; a Deferred of its response dict."""
        proto = self.connector.protocol
        if proto is None:
            return self.when_connected().addCallback(lambda p: p.call(command, **kw))
        return proto.call(command, **kw)

    # -- writes ------------------------------------------------------------------
    def transaction(self, meta, dispatch=None) -> "ClientTransaction":
        """The client side of a two-phase commit for ZODB metadata ``meta``."""
        return ClientTransaction(self, meta, dispatch)

    def begin(self, user: str = "", description: str = "", extension=None) -> "ClientTransaction":
        """Start a transaction for the Deferred API: ``store``/``check_current_serial``,
        then ``await vote()``, ``await finish()`` (or ``abort()``)."""
        from ZODB.Connection import TransactionMetaData
        if self.read_only or self.server_read_only:
            raise ReadOnlyError()
        return ClientTransaction(self, TransactionMetaData(user, description, extension))

    def open_db(self, **kw) -> Deferred:
        """A Deferred ZODB ``DB`` whose storage shares this client's connection
        and cache (one connection per storage per process).

        ``ZODB.DB`` reads the root while it is built, so it is built in a
        worker thread; use the DB from worker threads too (for example with
        :class:`~zeotwist.client.interaction.DatabasePool`).
        """
        if self._storage_factory is None:
            raise UsageError("this Client was made without a storage_factory; "
                                   "make it with zeotwist.connect()")
        return open_db(self, self._storage_factory, **kw)

    # -- blobs ---------------------------------------------------------------------
    def fetch_blob(self, oid: bytes, serial: bytes, f,
                   idle_timeout: float | None = None, first: dict | None = None) -> Deferred:
        """Download blob (``oid``, ``serial``) into the binary file object ``f``.

        The chunks (1 MiB, 4 in flight; 120 KB, 16 in flight, from an
        older server) are pulled and written to ``f`` in order, on the
        reactor thread, as they arrive; fires with the blob's size,
        or fails with POSKeyError if the server has no such blob.
        Cancelling the Deferred stops the writes; with ``idle_timeout`` it
        fails with ClientDisconnected after that many seconds without progress.
        ``first``: the answer to the first piece, already received
        (``blobtransfer.first_piece_from_thread``).
        """
        from zeotwist.client.blobtransfer import BlobDownload
        proto = self.connector.protocol
        if proto is None:
            return self.when_connected().addCallback(
                lambda _: self.fetch_blob(oid, serial, f, idle_timeout, first))
        return BlobDownload(proto, oid, serial, f, reactor=self.reactor,
                            idle_timeout=idle_timeout).start(first)

