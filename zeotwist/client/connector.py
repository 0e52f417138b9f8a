"""The connection lifecycle of one :class:`~zeotwist.client.client.Client`.

A :class:`Connector` keeps one *registered* connection to the server: it
owns a :class:`~zeotwist.client.reconnect.Reconnector` (capped exponential
backoff, injected clock), and runs the handshake as its ``handshake`` step:
Login (with credentials), Register, then Verify when the cache already
covers some transactions.  :attr:`Connector.protocol` is set only once the
cache is up to date, under the client's visibility lock, together with the
cache's last tid.  It also owns the read-only fallback (try the other
servers, then register read-only); :class:`~zeotwist.client.fallback.WritableProbe`
moves it back to a writable server.

The connector is the owner every :class:`~zeotwist.client.protocol.ClientProtocol`
reports to (``invalidated``, ``connection_lost``); it hands the client only
the invalidations of the registered connection.

Runs on the reactor thread.
"""
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from ZODB.POSException import ReadOnlyError

from zeotwist.client.events import Invalidation
from zeotwist.client.fallback import WritableProbe
from zeotwist.client.protocol import ClientFactory, peer_text
from zeotwist.client.reconnect import Reconnector
from zeotwist.errors import (
    ProtocolVersionError, ServerOlderThanCache, Unauthorized, UnknownStorage, WrongServer)
from zeotwist.tls import describe_error
from zeotwist.wire import commands as C

#: registration failures that retrying the same server cannot cure
PERMANENT = (UnknownStorage, ReadOnlyError, Unauthorized, WrongServer, ProtocolVersionError)

_log = Logger()


class Connector:
    """Keeps ``client`` registered with storage ``client.storage_name``."""

    def __init__(self, client, endpoint, retry_policy, *, credentials: tuple | None = None,
                 read_only_fallback: bool = False, fallback_check_interval: float = 5.0,
                 on_register=None, allow_older_server: bool = False):
        self.reactor = client.reactor
        self._client = client
        self.endpoint = endpoint
        #: (username, password) sent in Login before every Register
        self.credentials = credentials
        self.read_only_fallback = read_only_fallback
        #: use a server older than the cache (dropping the cache) instead of refusing it
        self.allow_older_server = allow_older_server
        self.fallback_check_interval = fallback_check_interval
        self._on_register = on_register or (lambda: None)
        self._refusals = 0           # read-only refusals since the last success
        self._probe = None
        #: a connection loss we asked for (stop, new address): not a warning
        self._leaving = False
        #: the registered, verified protocol, or None
        self.protocol = None
        #: why the last attempt failed (reported by ``when_connected``)
        self.last_error: BaseException | None = None
        #: the permanent refusal every server gave since the last success
        #: (``when_connected`` fails with it at once), or None
        self.refused: BaseException | None = None
        self._refusing: set = set()  # servers (indexes) that refused permanently
        self._waiting: list = []     # when_connected Deferreds, failed by a refusal
        self._unreachable_said = False   # "cannot connect" is logged once per outage
        #: registrations so far
        self.connections = 0
        #: the server's Register answer: its name, read-only flag, interfaces
        self.server_name = None
        self.server_read_only = client.read_only
        self.server_interfaces: tuple = ()
        self.supports_undo = False
        #: keeps the connection: attempts, the handshake (:meth:`_register`), retries
        self.keeper = Reconnector(endpoint, ClientFactory(self), self._register, retry_policy,
                                  self.reactor, self.unreachable)

    # -- the connection ------------------------------------------------------------
    def start(self) -> None:
        self._leaving = False
        self.keeper.start()

    def stop(self) -> Deferred:
        self._leaving = True
        if self._probe is not None:
            self._probe.stop()
        for d in list(self._waiting):
            d.cancel()
        return self.keeper.stop()

    def set_endpoint(self, endpoint) -> Deferred:
        """Drop the current connection and connect to ``endpoint`` from now on;
        fires once the old connection is closed and the next attempt begun."""
        self.endpoint = endpoint
        self._leaving = True
        d = self.keeper.stop()
        self.keeper.endpoint = endpoint
        d.addCallback(lambda _: self.start())
        return d

    def when_connected(self) -> Deferred:
        """A Deferred of the next registered protocol (no timeout); it fails
        with the refusal once every server refused this client permanently,
        and is cancelled when the client stops.

        The connector keeps these itself: only it knows when a connection is
        registered and its cache verified."""
        if self.protocol is not None:
            return succeed(self.protocol)
        if self.refused is not None:
            return fail(self.refused)
        d = Deferred(lambda d: self._waiting.remove(d) if d in self._waiting else None)
        self._waiting.append(d)
        return d

    def _wake_waiting(self, result, proto):
        """The handshake is over: hand ``proto`` to the waiting callers."""
        if proto is self.protocol:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(proto)
        return result

    # -- failed attempts -----------------------------------------------------------
    def unreachable(self, error: BaseException) -> None:
        """A connection attempt failed (nothing listening, unreachable, TLS):
        a retry; said once per outage."""
        self.last_error, self.refused = error, None
        self._refusing.clear()
        if not self._unreachable_said:
            self._unreachable_said = True
            _log.warn("zeotwist: cannot connect to the server for storage {name!r}: {err}; "
                      "retrying", name=self._client.storage_name, err=describe_error(error))

    def _refused(self, error: BaseException, proto) -> BaseException:
        """A registration refusal: the error with what it concerns; once every
        server refused permanently, the waiting calls fail with it now."""
        if not isinstance(error, PERMANENT) or isinstance(error, WrongServer):
            return error
        where = peer_text(proto.transport)
        if isinstance(error, ReadOnlyError):
            text = ("%s on %s: open it with read_only=True (or read_only_fallback=True)"
                    % (error or "storage %r is read-only" % self._client.storage_name, where))
        else:
            text = "%s (server %s)" % (error, where)
        return type(error)(text)

    def _count_refusal(self, error: BaseException) -> None:
        """Refused for good once every server refused permanently (with
        several, one that cannot be reached may yet come back and accept)."""
        if not isinstance(error, PERMANENT):
            self._refusing.clear()
            return
        self._refusing.add(getattr(self.endpoint, "current", None) or 0)
        if len(self._refusing) >= len(getattr(self.endpoint, "endpoints", (None,))):
            self.refused = error
            for d in list(self._waiting):
                d.cancel()            # Client.when_connected reports self.refused

    # -- what every ClientProtocol reports ---------------------------------------------
    def invalidated(self, proto, tid: bytes, oids) -> None:
        if proto is self.protocol:        # else: a handshake's, or a dead connection's
            self._client.apply_invalidation(tid, oids)

    @property
    def events_on_threads(self) -> bool:
        """Every ``before_visible`` subscriber may run on an application
        thread (else the reactor makes every event visible: events.py)."""
        return self._client.events.on_threads

    def invalidated_by_thread(self, proto, tid: bytes, oids, later) -> None:
        """:meth:`invalidated`, read by a thread other than the reactor's
        (zeotwist.client.commitreads): ``later`` has the reactor thread run
        the event's second stage."""
        if proto is self.protocol:
            self._client.apply_invalidation(tid, oids, later)

    def prefetched(self, proto, records: list) -> None:
        if proto is self.protocol:        # as for invalidated: the live connection only
            self._client.store_prefetched(records)

    def connection_lost(self, proto, reason) -> None:
        if proto is self.protocol:
            self.protocol = None
            # a timeout the server announced was said once (a warning) already
            level = (LogLevel.info if self._leaving or proto.timed_out is not None
                     else LogLevel.warn)
            _log.emit(level, "zeotwist client lost its connection: {why}",
                      why=reason.getErrorMessage())
        self.keeper.connection_lost(proto)        # a retry, or the end of a stop

    # -- the handshake -----------------------------------------------------------------
    def _register(self, proto):
        d = self._login(proto).addCallback(
            lambda _: self.send_register(proto, self._client.read_only))
        if self.read_only_fallback:
            d.addErrback(self._maybe_fall_back, proto)
        d.addCallback(self._registered, proto)
        d.addCallback(self._wake_waiting, proto)
        # a failed Register or Verify (a server older than the cache) alike
        d.addErrback(self._register_failed, proto)
        return d

    def _login(self, proto) -> Deferred:
        """Login (when the client has credentials), before Register."""
        if self.credentials is None:
            return succeed(None)
        username, password = self.credentials
        d = proto.call(C.Login, username=username, password=password)
        return d.addCallback(self._logged_in)

    def _logged_in(self, answer):
        if not answer["user"]:
            _log.warn("zeotwist: this server does not authenticate; credentials unused")

    def send_register(self, proto, read_only: bool) -> Deferred:
        """Register on ``proto``; a Deferred of the server's answer."""
        return proto.call(C.Register, protocol=C.PROTOCOL_VERSION,
                          storage=self._client.storage_name, read_only=read_only,
                          prefetch=self._client.reference_prefetch,
                          long_values=True, timeout_notice=True, vote_timeout_notice=True)

    def _maybe_fall_back(self, failure, proto):
        """A read-only server refused a writable client: try the other
        servers first; once each has refused, register read-only here."""
        failure.trap(ReadOnlyError)
        self._refusals += 1
        if self._refusals < len(getattr(self.endpoint, "endpoints", ())):
            return failure
        _log.warn("zeotwist: no writable server; falling back to read-only")
        return self.send_register(proto, True)

    def _registered(self, answer, proto):
        self.connections += 1
        self._refusals = 0
        if hasattr(self.endpoint, "start"):
            self.endpoint.start = 0          # next time, servers in preferred order
        if self.read_only_fallback and answer["read_only"]:
            self._schedule_writable_probe()
        self._on_register()
        proto.long_values = bool(answer.get("long_values"))  # big stores in one piece
        self.server_read_only = answer["read_only"]
        self.server_name = answer["name"]
        self.server_interfaces = tuple(answer["interfaces"])
        self.supports_undo = answer["supports_undo"]
        self.last_error = self.refused = None
        self._refusing.clear()
        self._unreachable_said = False
        _log.info("zeotwist client registered with storage {name!r} (last tid {tid})",
                  name=self._client.storage_name, tid=answer["last_tid"].hex())
        cache = self._client.cache
        if cache.last_tid is None:          # nothing cached, nothing to verify
            self._client.make_visible(answer["last_tid"], None, then=self._use(proto))
            return None
        d = proto.call(C.Verify, tid=cache.last_tid)
        return d.addCallback(self._verified, proto)

    def _use(self, proto):
        def use():
            self.protocol = proto
        return use

    def _verified(self, answer, proto):
        """Bring the cache (and ZODB) up to the server's last transaction.

        Runs before :attr:`protocol` is set, so invalidations pushed
        meanwhile are ignored: they concern transactions this answer
        already covers.
        """
        server_tid, oids = answer["last_tid"], answer["oids"]
        client = self._client
        mine = client.cache.last_tid        # the old connection's threads are done (its loss)
        use = self._use(proto)
        if server_tid < mine and not self.allow_older_server:
            raise ServerOlderThanCache(
                "the server's last transaction %s is older than this client's cache (%s): "
                "its storage was restored from an older copy or is another database; "
                "refusing it rather than going back in time (allow_older_server=True, "
                "allow-older-server on, uses it and drops the cache)"
                % (server_tid.hex(), mine.hex()))
        if server_tid < mine:
            _log.error(
                "zeotwist: the server's last transaction {server} is OLDER than this "
                "client's cache ({mine}); allow-older-server is on: dropping the cache "
                "and going back to the server's state.", server=server_tid.hex(), mine=mine.hex())
        elif not answer["complete"]:
            _log.info("zeotwist: cache too far behind the server to verify; dropping it")
        if server_tid < mine or not answer["complete"]:
            client.make_visible(server_tid, Invalidation(server_tid, (), reset=True),
                                client.cache.clear, then=use)
        elif server_tid > mine:
            def invalidate():
                for oid in oids:
                    client.cache.invalidate_after(oid, mine)
            client.make_visible(server_tid, Invalidation(server_tid, tuple(oids)),
                                invalidate, then=use)
        else:
            client.make_visible(server_tid, None, then=use)
        _log.info("zeotwist cache verified: {n} objects changed while disconnected",
                  n=len(oids))

    def _register_failed(self, failure, proto):
        error = self.last_error = self._refused(failure.value, proto)
        if error is not failure.value:
            failure = Failure(error)
        if self._leaving:           # the program stopped the client mid-handshake
            _log.info("zeotwist: handshake abandoned: the client is stopping")
        elif isinstance(error, ServerOlderThanCache):
            _log.error("zeotwist: {err}", err=str(error))
        else:
            _log.warn("zeotwist registration failed: {err}", err=str(error))
        self._count_refusal(error)
        if hasattr(self.endpoint, "skip_current"):
            self.endpoint.skip_current()     # the next attempt tries the next server
        return failure                       # the keeper closes the connection, retries

    # -- read-only fallback ------------------------------------------------------------
    def _schedule_writable_probe(self) -> None:
        if self._probe is None:
            self._probe = WritableProbe(self, self.fallback_check_interval)
        self._probe.schedule()

    def writable_server_found(self, index: int) -> None:
        """The probe found a writable server: reconnect there."""
        if hasattr(self.endpoint, "start"):
            self.endpoint.start = index
        proto = self.protocol
        if proto is not None and self.server_read_only and proto.transport is not None:
            _log.info("zeotwist: a writable server is back; reconnecting to it")
            proto.transport.loseConnection()
