"""Client: the Deferred API to one storage on a zeotwist server.

Every method returns a Deferred (or a plain value where nothing needs the
network).  The connection is kept by Twisted's ``ClientService`` with a
capped exponential backoff; the Register handshake runs as its
``prepareConnection`` step (Login, Register, then Verify when the cache
already covers some transactions), so ``when_connected`` fires only for a
registered connection whose cache is up to date.

Visibility rule: a transaction id becomes this client's
``last_transaction()`` only *after* the cache and every listener (ZODB's DB)
have applied its invalidations, all under :attr:`Client.visibility_lock`;
otherwise a ZODB connection could start a snapshot at that tid and still
hold stale objects.

Runs on the reactor thread (the two-phase commit is in
:mod:`zeotwist.client.transaction`).
"""
import random
from collections import deque
from threading import RLock

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from ZODB.POSException import ConflictError, POSKeyError, ReadOnlyError
from ZODB.utils import maxtid, z64

from zeotwist.client.cache import ClientCache
from zeotwist.client.events import Invalidation, InvalidationEvents
from zeotwist.client.protocol import ClientFactory
from zeotwist.client.transaction import ClientTransaction
from zeotwist.errors import ClientDisconnected
from zeotwist.tls import describe_error
from zeotwist.wire import commands as C

_log = Logger()

OID_BATCH = 100
#: Oids per Prefetch request (the server's limit).
PREFETCH_BATCH = 1000


def _description(entry: dict, key: str) -> dict:
    """A ZODB history (``key="tid"``) or undo log (``key="id"``) dict from a
    wire entry; the extension, stored pickled, is unpickled here (the
    client trusts its server; the server never unpickles it)."""
    from ZODB._compat import loads
    try:
        extension = loads(entry["extension"]) if entry["extension"] else {}
    except Exception:
        extension = {}
    if not isinstance(extension, dict):
        extension = {}
    d = {key: entry[key], "time": entry["time"], "user_name": entry["user_name"],
         "description": entry["description"]}
    if entry["size"] is not None:
        d["size"] = entry["size"]
    if key == "tid":          # as FileStorage.history: standard keys win
        extension.update(d)
        return extension
    d.update(extension)       # as FileStorage.undoLog: extension keys win
    return d


class _ErrorKeepingEndpoint:
    """The endpoint ClientService connects through: a failed attempt (refused,
    unreachable, a TLS failure before the connection is up) becomes the
    client's last error, which ``when_connected`` reports."""

    def __init__(self, endpoint, client):
        self._endpoint, self._client = endpoint, client

    def connect(self, factory):
        d = self._endpoint.connect(factory)
        d.addErrback(self._failed)
        return d

    def _failed(self, failure):
        self._client._last_error = failure.value
        return failure


class Client:
    def __init__(self, reactor, endpoint, *, storage: str = "1", read_only: bool = False,
                 cache: ClientCache | None = None, cache_size: int = 20 * 2**20,
                 wait_timeout: float = 30.0, retry_policy=None,
                 read_only_fallback: bool = False, fallback_check_interval: float = 5.0,
                 credentials: tuple | None = None):
        self.reactor = reactor
        #: (username, password) sent in Login before every Register; a None
        #: password logs in with the TLS client certificate (docs/tls-auth.md)
        self.credentials = credentials
        self.endpoint = endpoint
        self.storage_name = storage
        self.read_only = read_only
        self.server_read_only = read_only
        #: connect read-only to a read-only server when no writable one answers,
        #: and move back to a writable server when one appears
        self.read_only_fallback = read_only_fallback and not read_only
        self.fallback_check_interval = fallback_check_interval
        self._refusals = 0           # read-only refusals since the last success
        self._probe = None
        self.cache = cache if cache is not None else ClientCache(cache_size)
        self.wait_timeout = wait_timeout
        self.visibility_lock = RLock()
        self.connections = 0
        self.server_name = None
        #: optional ZODB interfaces of the served storage (from Register)
        self.server_interfaces: tuple = ()
        self.supports_undo = False
        self._proto = None
        #: a connection loss we asked for (stop, new address): not a warning
        self._leaving = False
        self._last_error = None
        self._oids: deque = deque()
        self._loads: dict = {}
        self._invalidation_listeners: list = []
        #: Every transaction this client learns of, for reactor programs.
        self.events = InvalidationEvents()
        self._reset_listeners: list = []
        # capped exponential backoff; up to 0.25 s of jitter spreads out
        # many clients reconnecting to a restarted server
        self._retry_policy = retry_policy or backoffPolicy(
            initialDelay=0.05, maxDelay=5.0, jitter=lambda: random.random() * 0.25)
        self._service = self._make_service(endpoint)

    def _make_service(self, endpoint) -> ClientService:
        return ClientService(
            _ErrorKeepingEndpoint(endpoint, self), ClientFactory(self),
            retryPolicy=self._retry_policy, clock=self.reactor,
            prepareConnection=self._register)

    def set_endpoint(self, endpoint) -> Deferred:
        """Use other server address(es) from now on (ZEO's ``new_addr``):
        drop the current connection and connect to ``endpoint``; the cache
        is verified against the new server as after any reconnection.
        Fires once the old connection is closed and the new service runs."""
        old, self.endpoint = self._service, endpoint
        self._service = self._make_service(endpoint)
        self._leaving = True
        d = old.stopService()
        d.addCallback(lambda _: self.start())
        return d

    # -- connection ------------------------------------------------------------
    def start(self) -> None:
        self._leaving = False
        self._service.startService()

    def stop(self) -> Deferred:
        self._leaving = True
        if self._probe is not None:
            self._probe.stop()
        return self._service.stopService()

    @property
    def is_connected(self) -> bool:
        return self._proto is not None

    def when_connected(self, timeout: float | None = None) -> Deferred:
        """The registered protocol, or ClientDisconnected after ``timeout``."""
        if self._proto is not None:
            return succeed(self._proto)
        timeout = self.wait_timeout if timeout is None else timeout
        d = self._service.whenConnected()
        d.addTimeout(timeout, self.reactor)
        d.addErrback(self._not_connected, timeout)
        return d

    def _not_connected(self, failure, timeout):
        last = self._last_error
        why = " (last error: %s)" % describe_error(last) if last else ""
        raise ClientDisconnected(
            "no connection to the zeotwist server within %g s%s" % (timeout, why)) from last

    def _register(self, wrapper):
        # ClientService hands us its proxy around our protocol; we keep the
        # protocol itself, since that is what calls back into this client.
        proto = getattr(wrapper, "_protocol", wrapper)
        d = self._login(proto).addCallback(
            lambda _: self._send_register(proto, self.read_only))
        if self.read_only_fallback:
            d.addErrback(self._maybe_fall_back, proto)
        d.addCallbacks(self._registered, self._register_failed, (proto,), None,
                       (proto, wrapper))
        return d

    def _login(self, proto):
        """Login (when the client has credentials), before Register."""
        if self.credentials is None:
            return succeed(None)
        username, password = self.credentials
        d = proto.call(C.Login, username=username, password=password)
        return d.addCallback(self._logged_in)

    def _logged_in(self, answer):
        if not answer["user"]:
            _log.warn("zeotwist: this server does not authenticate; credentials unused")

    def _send_register(self, proto, read_only):
        return proto.call(C.Register, protocol=C.PROTOCOL_VERSION,
                          storage=self.storage_name, read_only=read_only)

    def _maybe_fall_back(self, failure, proto):
        """A read-only server refused a writable client: try the other
        servers first; once each has refused, register read-only here."""
        failure.trap(ReadOnlyError)
        self._refusals += 1
        if self._refusals < len(getattr(self.endpoint, "endpoints", ())):
            return failure
        _log.warn("zeotwist: no writable server; falling back to read-only")
        return self._send_register(proto, True)

    def _registered(self, answer, proto):
        self.connections += 1
        self._refusals = 0
        if hasattr(self.endpoint, "start"):
            self.endpoint.start = 0          # next time, servers in preferred order
        if self.read_only_fallback and answer["read_only"]:
            self._schedule_writable_probe()
        self._oids.clear()           # never hand out an oid twice across servers/restarts
        self.server_read_only = answer["read_only"]
        self.server_name = answer["name"]
        self.server_interfaces = tuple(answer["interfaces"])
        self.supports_undo = answer["supports_undo"]
        self._last_error = None
        _log.info("zeotwist client registered with storage {name!r} (last tid {tid})",
                  name=self.storage_name, tid=answer["last_tid"].hex())
        if self.cache.last_tid is None:          # nothing cached, nothing to verify
            with self.visibility_lock:
                self.cache.last_tid = answer["last_tid"]
                self._proto = proto
            return None
        d = proto.call(C.Verify, tid=self.cache.last_tid)
        return d.addCallback(self._verified, proto)

    def _verified(self, answer, proto):
        """Bring the cache (and ZODB) up to the server's last transaction.

        Runs before ``_proto`` is set, so invalidations pushed meanwhile are
        ignored: they concern transactions this answer already covers.
        """
        server_tid, oids = answer["last_tid"], answer["oids"]
        with self.visibility_lock:
            cache = self.cache
            mine = cache.last_tid
            reset = server_tid < mine or not answer["complete"]
            if server_tid < mine:
                _log.error(
                    "zeotwist: the server's last transaction {server} is OLDER than this "
                    "client's cache ({mine}); its storage was restored from an older copy. "
                    "Dropping the cache rather than serving data the server does not have.",
                    server=server_tid.hex(), mine=mine.hex())
            elif reset:
                _log.info("zeotwist: cache too far behind the server to verify; dropping it")
            if reset:
                cache.clear()
                self._notify(self._reset_listeners)
            elif server_tid > mine:
                for oid in oids:
                    cache.invalidate_after(oid, mine)
                self._notify(self._invalidation_listeners, server_tid, oids)
            cache.last_tid = server_tid
            self._proto = proto
        if reset:
            self.events.publish(Invalidation(server_tid, (), reset=True))
        elif server_tid > mine:
            self.events.publish(Invalidation(server_tid, tuple(oids)))
        _log.info("zeotwist cache verified: {n} objects changed while disconnected",
                  n=len(oids))

    def _register_failed(self, failure, proto, wrapper):
        self._last_error = failure.value
        _log.warn("zeotwist registration failed: {err}", err=failure.getErrorMessage())
        if hasattr(self.endpoint, "skip_current"):
            self.endpoint.skip_current()     # the next attempt tries the next server
        # ClientService (Twisted 26.10) has no transition for a connection
        # lost while it is still "connecting" (our handshake): it raises
        # NoTransition.  A failed handshake is reported through the returned
        # failure instead, so silence the proxy's lost-notification first.
        if hasattr(wrapper, "_lostNotification"):
            wrapper._lostNotification = lambda reason: None
        if proto.transport is not None:
            proto.transport.loseConnection()
        return failure

    def _schedule_writable_probe(self):
        from zeotwist.client.failover import WritableProbe
        if self._probe is None:
            self._probe = WritableProbe(self, self.fallback_check_interval)
        self._probe.schedule()

    def _writable_server_found(self, index):
        """The probe found a writable server: reconnect there."""
        if hasattr(self.endpoint, "start"):
            self.endpoint.start = index
        proto = self._proto
        if proto is not None and self.server_read_only and proto.transport is not None:
            _log.info("zeotwist: a writable server is back; reconnecting to it")
            proto.transport.loseConnection()

    def _connection_lost(self, proto, reason):
        if proto is self._proto:
            self._proto = None
            level = LogLevel.info if self._leaving else LogLevel.warn
            _log.emit(level, "zeotwist client lost its connection: {why}",
                      why=reason.getErrorMessage())

    # -- listeners ---------------------------------------------------------------
    def add_invalidation_listener(self, listener) -> None:
        """``listener(tid, oids)`` is called (reactor thread) for other clients' commits."""
        self._invalidation_listeners.append(listener)

    def add_reset_listener(self, listener) -> None:
        """``listener()`` is called when the whole cache had to be dropped."""
        self._reset_listeners.append(listener)

    def remove_listeners(self, *listeners) -> None:
        """Withdraw listeners added by the two methods above."""
        for group in (self._invalidation_listeners, self._reset_listeners):
            group[:] = [l for l in group if l not in listeners]

    def _notify(self, listeners, *args) -> None:
        for listener in list(listeners):
            try:
                listener(*args)
            except Exception:
                _log.failure("zeotwist listener {l!r} failed", l=listener)

    def _invalidated(self, proto, tid, oids):
        if proto is not self._proto:
            return
        with self.visibility_lock:
            invalidate = self.cache.invalidate
            for oid in oids:
                invalidate(oid, tid)
            self._notify(self._invalidation_listeners, tid, oids)
            self.cache.last_tid = tid
        self.events.publish(Invalidation(tid, tuple(oids)))

    def _committed(self, tid, written: dict, resolved, callback):
        with self.visibility_lock:
            cache = self.cache
            changed = [oid for oid in resolved if oid not in written]   # undone
            try:
                for oid, data in written.items():
                    cache.invalidate(oid, tid)
                    if data is not None and oid not in resolved:
                        cache.store(oid, tid, None, data)
                for oid in changed:
                    cache.invalidate(oid, tid)
                if callback is not None:
                    callback(tid)
            finally:
                cache.last_tid = tid
        self.events.publish(Invalidation(tid, tuple(written) + tuple(changed), local=True))

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
        proto = self._proto
        if proto is None:
            return self.when_connected().addCallback(lambda _: self.fetch_before(oid, tid))
        self._loads[key] = []        # later requests for the same revision wait here
        return proto.load_before(oid, tid).addBoth(self._loaded, oid, key)

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
        return self._call(C.LoadSerial, oid=oid, serial=serial).addCallback(
            lambda r: r["data"])

    def info(self) -> Deferred:
        return self._call(C.Info)

    def ping(self) -> Deferred:
        """One round trip; every invalidation sent before it has arrived after it."""
        return self._call(C.LastTransaction).addCallback(lambda r: r["tid"])

    def new_oid(self) -> Deferred:
        if self._oids:
            return succeed(self._oids.popleft())
        d = self._call(C.NewOids, count=OID_BATCH)

        def got(r):
            self._oids.extend(r["oids"])
            return self._oids.popleft()

        return d.addCallback(got)

    def new_oids(self, count: int) -> Deferred:
        """A list of ``count`` fresh object ids (from the pool, then the server)."""
        from twisted.internet.defer import gatherResults
        return gatherResults([self.new_oid() for _ in range(count)], consumeErrors=True)

    def _call(self, command, **kw) -> Deferred:
        proto = self._proto
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
        import time

        import ZODB
        from twisted.internet.threads import deferToThreadPool
        from zeotwist.client.storage import ClientStorage
        storage = ClientStorage.from_client(self)

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

        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                 build).addErrback(failed)

    # -- storage API: history, undo log, pack, iteration, prefetch ---------------
    def history(self, oid: bytes, size: int = 1) -> Deferred:
        """Up to ``size`` revisions of ``oid``, newest first, as ZODB's
        history dicts (``tid``, ``time``, ``user_name``, ``description``,
        ``size`` and the transaction's extension keys)."""
        d = self._call(C.History, oid=oid, size=size)
        return d.addCallback(lambda r: [_description(e, "tid") for e in r["entries"]])

    def undo_log(self, first: int, last: int) -> Deferred:
        """``(entries, complete)``: the undoable transactions ``first`` to
        ``last`` (exclusive, newest first; the server answers at most 1000 at
        a time) as ZODB's undo log dicts; ``complete`` when none is older."""
        d = self._call(C.UndoLog, first=first, last=last)
        return d.addCallback(
            lambda r: ([_description(e, "id") for e in r["entries"]], r["complete"]))

    def get_tid(self, oid: bytes) -> Deferred:
        """The tid of the current revision of ``oid`` (asks the server)."""
        return self._call(C.GetTid, oid=oid).addCallback(lambda r: r["tid"])

    def pack(self, t: float, gc: bool | None = None) -> Deferred:
        """Pack the storage as of time ``t``; fires when the server is done.
        ``gc=None`` leaves garbage collection to the storage's setting."""
        return self._call(C.Pack, time=float(t), gc=gc).addCallback(lambda _: None)

    def iterator_start(self, start: bytes | None = None, stop: bytes | None = None) -> Deferred:
        """Open an iterator over transactions ``start``..``stop`` on the server.

        Fires with a token for :meth:`iterator_next` and :meth:`iterator_close`;
        the iterator lives in this connection's session (the server drops it
        when the connection ends, or when too many are open).
        """
        proto = self._proto
        if proto is None:
            return self.when_connected().addCallback(
                lambda _: self.iterator_start(start, stop))
        d = proto.call(C.IteratorStart, start=start, stop=stop)
        return d.addCallback(lambda r: (proto, r["iid"]))

    def iterator_next(self, token) -> Deferred:
        """``(items, done)``: the next batch of the iterator; each item is a
        transaction header (``status`` set) or a record (``oid`` set) of the
        last header, in order."""
        proto, iid = token
        if proto is not self._proto:
            return fail(ClientDisconnected("connection lost during iteration"))
        return proto.call(C.IteratorNext, iid=iid).addCallback(
            lambda r: (r["items"], r["done"]))

    def iterator_close(self, token) -> None:
        """Release an iterator the caller abandons before its end."""
        proto, iid = token
        if proto is self._proto and proto.transport is not None:
            proto.send(C.IteratorClose, iid=iid)

    def record_iternext(self, next: bytes | None = None) -> Deferred:
        """``(oid, tid, data, next_oid)``: the first object at or after ``next``."""
        d = self._call(C.RecordIternext, next=next)
        return d.addCallback(lambda r: (r["oid"], r["tid"], r["data"], r["next"]))

    def prefetch(self, oids, tid: bytes) -> Deferred:
        """Load the revisions of ``oids`` valid before ``tid`` into the cache,
        up to 1000 per round trip.  A load of one of them made meanwhile waits
        for this answer instead of asking again.  Fires with the number of
        records received; nothing is done while disconnected."""
        proto = self._proto
        if proto is None:
            return succeed(0)
        wanted = []
        for oid in oids:
            key = oid + tid
            if key in self._loads or self.cache.loadBefore(oid, tid) is not None:
                continue
            self._loads[key] = []
            wanted.append(oid)
        ds = []
        for i in range(0, len(wanted), PREFETCH_BATCH):
            chunk = wanted[i:i + PREFETCH_BATCH]
            d = proto.call(C.Prefetch, oids=chunk, tid=tid)
            ds.append(d.addBoth(self._prefetched, chunk, tid))
        from twisted.internet.defer import gatherResults
        return gatherResults(ds).addCallback(sum)

    def _prefetched(self, result, oids, tid) -> int:
        answered = {}
        if isinstance(result, Failure):
            _log.info("zeotwist prefetch failed: {err}", err=result.getErrorMessage())
        else:
            answered = {rec["oid"]: rec for rec in result["records"]}
        for oid in oids:
            key = oid + tid
            rec = answered.get(oid)
            if rec is not None:
                data = rec["data"]
                self._loaded(None if data is None else (data, rec["start"], rec["end"]),
                             oid, key)
            elif not self._loads.get(key):
                self._loads.pop(key, None)          # left out and nobody waits
            elif self._proto is not None:           # left out: load it alone
                self._proto.load_before(oid, tid).addBoth(self._loaded, oid, key) \
                    .addErrback(lambda f: None)     # the waiters have it
            else:
                self._loaded(Failure(ClientDisconnected("connection lost")), oid, key)
        return len(answered)

    # -- blobs ---------------------------------------------------------------------
    def fetch_blob(self, oid: bytes, serial: bytes, f,
                   idle_timeout: float | None = None) -> Deferred:
        """Download blob (``oid``, ``serial``) into the binary file object ``f``.

        The chunks are pulled 16 at a time and written to ``f`` in order,
        on the reactor thread, as they arrive; fires with the blob's size,
        or fails with POSKeyError if the server has no such blob.
        Cancelling the Deferred stops the writes; with ``idle_timeout`` it
        fails with ClientDisconnected after that many seconds without progress.
        """
        from zeotwist.client.blobtransfer import BlobDownload
        proto = self._proto
        if proto is None:
            return self.when_connected().addCallback(
                lambda _: self.fetch_blob(oid, serial, f, idle_timeout))
        return BlobDownload(proto, oid, serial, f, reactor=self.reactor,
                            idle_timeout=idle_timeout).start()
