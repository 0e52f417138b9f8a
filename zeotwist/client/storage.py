"""ClientStorage: the blocking ZODB storage, a thin adapter over :class:`Client`.

ZODB's ``DB`` and its connections call this from ordinary threads.  Each
method either answers locally (the cache, the oid pool, last tid) or hands a
Deferred-returning :class:`Client` call to the reactor thread and waits,
with a timeout, through :func:`~zeotwist.client.reactorthread.blocking_call`.
Reactor-side code never calls back into this class, except ZODB's own
callbacks (``db.invalidate``, the ``tpc_finish`` callback), which run on the
reactor thread under the client's visibility lock.

The two-phase commit is :mod:`zeotwist.client.storagecommit`; the storage API
beyond load and commit :mod:`zeotwist.client.storageapi`, blobs
:mod:`zeotwist.client.blobs`.  One transaction at a time per storage, as in
ZEO.
"""
import threading

import zope.interface
from ZODB import interfaces
from ZODB.POSException import POSKeyError, ReadOnlyError
from ZODB.utils import maxtid

from zeotwist.client.addresses import to_endpoint
from zeotwist.client.blobs import BlobStorageMixin
from zeotwist.client.storagecommit import StorageCommitMixin
from zeotwist.client.storageapi import StorageAPIMixin
from zeotwist.client.cache import ClientCache
from zeotwist.client.persist import DEFAULT_SAVE_INTERVAL, CachePersister
from zeotwist.client.client import Client
from zeotwist.client.resolve import ConflictResolver
from zeotwist.client.reactorthread import blocking_call, default_reactor, in_reactor_thread
from zeotwist import logbridge
from zeotwist.errors import ClientDisconnected, UsageError

DEFAULT_CACHE_SIZE = 20 * 2**20


@zope.interface.implementer(interfaces.IStorage, interfaces.IMultiCommitStorage)
class ClientStorage(StorageCommitMixin, StorageAPIMixin, BlobStorageMixin):
    """A ZODB storage served by a zeotwist server.

    :param addr: ``(host, port)``, ``"host:port"``, a Unix socket path, a
        Twisted endpoint string or an endpoint object; or a list of these
        (several servers, tried in turn).
    :param storage: the name of the storage on the server (default ``"1"``).
    :param wait_timeout: seconds to wait for a connection, at construction
        (with ``wait=True``) and for any call made while disconnected, before
        raising :class:`~zeotwist.errors.ClientDisconnected`.
    :param timeout: seconds a call waits for its answer once sent.
    :param reference_prefetch: ask the server for reference prefetch: LoadBefore answers
        also bring records of the objects the loaded record references
        (default True; docs/performance.md).
    :param read_only_fallback: if no writable server answers, use a
        read-only one (the storage is then read-only) and move back to a
        writable server when one appears.
    :param allow_older_server: use a server whose last transaction is older
        than this client's cache (a storage restored from a backup): the
        cache is dropped and the application goes back to the server's
        state.  By default such a server is refused
        (:class:`~zeotwist.errors.ServerOlderThanCache`, logged; calls
        fail with ClientDisconnected naming it) and other addresses are tried.
    :param fallback_check_interval: seconds between the checks for a
        writable server while fallen back to a read-only one.
    :param reactor: the reactor to use; default: the global one if it is
        running, else a private reactor in a daemon thread.
    :param blob_dir: the blob cache directory (or, with ``shared_blob_dir``,
        the server's blob directory seen through a shared file system);
        without it the storage has no blob support.  ``blob_cache_size``
        bounds the cache (bytes), checked after every
        ``blob_cache_size_check`` percent of it is loaded (docs/blobs.md).
    :param username: log in as this user of the server's password file,
        with ``password``; without a password, with the TLS client
        certificate (docs/tls-auth.md).
    :param tls: connect with TLS: ``True`` (the system's CAs), a dict
        (``ca``: PEM file or directory of CAs to trust; ``cert``/``key``:
        the client certificate; ``hostname``: the name the server's
        certificate must carry, default the address's host), or a Twisted
        ``IOpenSSLClientConnectionCreator``.
    """

    def __init__(self, addr, storage: str = "1", cache_size: int = DEFAULT_CACHE_SIZE,
                 name: str = "", read_only: bool = False, wait_timeout: float = 30.0,
                 wait: bool = True, timeout: float = 300.0, server_sync: bool = False,
                 reactor=None, read_only_fallback: bool = False, client: str | None = None,
                 var: str | None = None, cache_path: str | None = None,
                 cache_save_interval: float = DEFAULT_SAVE_INTERVAL,
                 fallback_check_interval: float = 5.0, blob_dir: str | None = None,
                 shared_blob_dir: bool = False, blob_cache_size: int | None = None,
                 blob_cache_size_check: int = 10, username: str | None = None,
                 password: str | None = None, tls=None, allow_older_server: bool = False,
                 reference_prefetch: bool = True,
                 **unsupported):
        ignored = {k for k, v in unsupported.items() if v not in (None, False, 0, "")}
        if ignored:
            raise UsageError("ClientStorage does not support %s yet" % ", ".join(sorted(ignored)))
        logbridge.install()      # our log lines reach Python's logging (docs/logging.md)
        reactor = reactor or default_reactor()
        cache = ClientCache(cache_size)
        persister = None
        if client is not None or cache_path is not None:
            from zeotwist.client.cachefile import cache_path as persistent_cache_path
            persister = CachePersister(
                cache, cache_path or persistent_cache_path(client, var, storage),
                cache_save_interval)
        credentials = None if username is None and password is None else (username, password)
        connection = Client(reactor, to_endpoint(reactor, addr, tls), storage=storage,
                            read_only=read_only, cache=cache, wait_timeout=wait_timeout,
                            read_only_fallback=read_only_fallback,
                            fallback_check_interval=fallback_check_interval,
                            credentials=credentials, allow_older_server=allow_older_server,
                            reference_prefetch=reference_prefetch,
                            storage_factory=ClientStorage.from_client)
        self._setup(connection, addr, name, timeout, server_sync, owns_client=True)
        self._tls = tls
        self._blob_setup(blob_dir, shared_blob_dir, blob_cache_size, blob_cache_size_check)
        self._persister = persister
        if persister is not None:
            reactor.callFromThread(persister.start, reactor)
        if in_reactor_thread(reactor):
            self._start_and_declare()
        elif not wait:
            reactor.callFromThread(self._start_and_declare)
        else:
            reactor.callFromThread(connection.start)
            try:
                self._call(connection.when_connected)
            except BaseException:
                self.close()     # else the client goes on reconnecting forever
                raise
            self._declare_interfaces()

    def _start_and_declare(self) -> None:
        """Start connecting without waiting; declare the served storage's
        interfaces once the first registration is done (reactor thread)."""
        self._client.start()
        d = self._client.connector.when_connected()
        d.addCallbacks(lambda _: self._declare_interfaces(), lambda f: None)

    def _declare_interfaces(self) -> None:
        """Provide exactly the optional interfaces the served storage has
        (and this class implements)."""
        for name in self._client.server_interfaces:
            iface = getattr(interfaces, name, None)
            if iface is not None and all(hasattr(self, m) for m in iface.names()):
                zope.interface.alsoProvides(self, iface)

    @classmethod
    def from_client(cls, client: Client, name: str = "", timeout: float = 300.0,
                    server_sync: bool = False) -> "ClientStorage":
        """A ClientStorage over an existing :class:`Client` (from
        :func:`zeotwist.connect`): one connection and one cache for the
        Deferred API and ZODB's DB.  Closing the storage leaves the client
        running; whoever made the client stops it."""
        self = cls.__new__(cls)
        self._setup(client, client.endpoint, name, timeout, server_sync, owns_client=False)
        return self

    def _setup(self, client, addr, name, timeout, server_sync, owns_client):
        self._addr = addr
        self._storage = client.storage_name
        self._name = name or "%s:%s" % (addr, client.storage_name)
        self._read_only = client.read_only
        self._timeout = timeout
        self._server_sync = server_sync
        self._reactor = client.reactor
        self._db = None
        self._resolver = ConflictResolver()
        self._tpc_cond = threading.Condition()
        self._transaction = None      # the ZODB transaction being committed
        self._txn = None              # its ClientTransaction
        self._closed = False
        self._persister = None
        self._owns_client = owns_client
        self._tls = None
        self._client = client
        self._subscription = client.events.subscribe(self._invalidate_db,
                                                     before_visible=True, idempotent=True,
                                                     any_thread=True)

    # -- plumbing --------------------------------------------------------------
    def _call(self, f, *args, timeout=None):
        if self._closed:
            raise ClientDisconnected("this ClientStorage is closed")
        return blocking_call(self._reactor, f, *args,
                             timeout=timeout or self._timeout, on_timeout=self._timed_out)

    def _ask_from_thread(self, ask, fallback, *args):
        """A round trip this thread sends itself when it can (``ask(*args)``:
        a ThreadAnswer or ThreadLoad, or None; zeotwist.client.threadwrites), else
        ``fallback(*args)`` through the reactor thread (None without one)."""
        reactor = self._reactor
        if not self._closed and reactor.running and not in_reactor_thread(reactor):
            proto = self._client.protocol
            try:
                answer = ask(*args)
                if answer is not None:
                    try:
                        return answer.wait(self._timeout)
                    except TimeoutError:
                        raise self._timed_out() from None
            except BaseException:
                if proto is not None:
                    proto.reader_gone()     # cut short before its read began
                raise
        return None if fallback is None else self._call(fallback, *args)

    def _timed_out(self):
        return ClientDisconnected("no answer from the zeotwist server within %g s" % self._timeout)

    @property
    def client(self) -> Client:
        """The Deferred-API client under this storage (same connection and cache)."""
        return self._client

    def _invalidate_db(self, event) -> None:
        """Tell ZODB's DB of other clients' transactions, before their tid
        is visible (the DB learns of our own through tpc_finish's callback).
        Idempotent: called again if an exception cut it short; it never
        calls the storage, so it may run on a thread holding the send lock."""
        db = self._db
        if db is None or event.local:
            return
        if event.reset:
            db.invalidateCache()
        else:
            db.invalidate(event.tid, event.oids)

    # -- ZEO-style status --------------------------------------------------------
    def is_connected(self, test: bool = False) -> bool:
        if test and self._client.is_connected:
            try:
                self._call(self._client.ping)
            except ClientDisconnected:
                return False
        return self._client.is_connected

    def new_addr(self, addr) -> None:
        """Switch to other server address(es) (as ZEO's ``new_addr``): the
        client drops its connection and connects there; calls made
        meanwhile wait for the new connection up to ``wait_timeout``."""
        endpoint = to_endpoint(self._reactor, addr, self._tls)
        self._addr = addr
        self._call(self._client.set_endpoint, endpoint)

    def ping(self) -> None:
        """One round trip to the server (ZEO's ``ping``): raises
        ClientDisconnected if it does not answer; every invalidation it sent
        before has arrived when this returns."""
        self._call(self._client.ping)

    @property
    def _cache(self):
        """The client cache under ZEO's name, for tools written for ZEO: its
        ``clear()`` empties it (the next loads go to the server), as
        zodbshootout does before its "cold" reads; ``len()``,
        ``getLastTid()``, ``load(oid)`` and ``loadBefore(oid, tid)`` work
        as on ZEO's cache (docs/differences.md)."""
        return self._client.cache

    def server_status(self) -> dict:
        return dict(self._call(self._client.info))

    def sync(self, force: bool = True) -> None:
        """With ``server_sync=True``, make sure every invalidation sent so far
        has arrived (one round trip); otherwise nothing to do."""
        if self._server_sync:
            self._call(self._client.ping)

    # -- IStorage: identity and metadata ----------------------------------------
    def getName(self) -> str:
        return self._name

    def sortKey(self) -> str:
        return "%s:%s" % (self._addr, self._storage)

    def getSize(self) -> int:
        return self._call(self._client.info)["size"]

    def __len__(self) -> int:
        return self._call(self._client.info)["length"]

    def isReadOnly(self) -> bool:
        return self._read_only or self._client.server_read_only

    def supportsUndo(self) -> bool:
        return self._client.supports_undo and self._undo_implemented

    def lastTransaction(self) -> bytes:
        """ZODB asks this as every transaction starts (its snapshot):
        whatever the server has sent so far is handled first, also while a
        loading thread has parked the socket (threadreads)."""
        self._client.catch_up(self._timeout)
        return self._client.last_transaction()

    def registerDB(self, db) -> None:
        self._db = db
        # as ZODB's ConflictResolvingStorage: resolve through the wrapper's
        # record transforms (identity for a plain DB)
        self._resolver = ConflictResolver.for_wrapper(db)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._tpc_cond:          # wake threads waiting in tpc_begin: they fail
            self._tpc_cond.notify_all()
        self._subscription.cancel()
        if not self._owns_client:
            return
        if self._reactor.running and not in_reactor_thread(self._reactor):
            try:
                blocking_call(self._reactor, self._client.stop, timeout=10)
            except Exception:
                pass
        elif self._reactor.running:
            self._client.stop()
        if self._persister is not None:
            if self._reactor.running:
                self._reactor.callFromThread(self._persister.stop)
            self._persister.close()

    # -- reads -------------------------------------------------------------------
    def loadBefore(self, oid: bytes, tid: bytes):
        client = self._client
        r = client.cache.loadBefore(oid, tid)
        if r is not None:
            return r
        # A cache miss: this thread sends the request itself when it can
        # (zeotwist.client.threadwrites), else through the reactor thread.
        reactor = self._reactor
        if (len(oid) != 8 or len(tid) != 8) and not self._closed and reactor.running \
                and not in_reactor_thread(reactor):
            raise ValueError("oids and tids are 8 bytes")
        return self._ask_from_thread(client.load_from_thread, client.fetch_before, oid, tid)

    def load(self, oid: bytes, version: str = ""):
        r = self.loadBefore(oid, maxtid)
        if r is None:
            raise POSKeyError(oid)
        return r[:2]

    def loadSerial(self, oid: bytes, serial: bytes) -> bytes:
        return self._call(self._client.load_serial, oid, serial)

    def new_oid(self) -> bytes:
        client = self._client
        if self._read_only or client.server_read_only:     # isReadOnly, inline: per oid
            raise ReadOnlyError()
        pool = client.oids
        oid = pool.take()
        if oid is None:     # an empty pool: this thread asks (threadwrites) when it can
            oid = self._ask_from_thread(pool.from_thread, None)
        return oid if oid is not None else self._call(self._client.new_oid)


    def __repr__(self):
        return "<ClientStorage %s storage %r%s>" % (
            self._addr, self._storage, "" if self._client.is_connected else " (disconnected)")
