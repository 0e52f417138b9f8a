"""One client connection to the server: AMP responders and its transaction.

A session decodes a command, calls the :class:`StorageServer` or the
storage, and encodes the answer.  Every way a connection can end - the
peer closes or dies, a protocol violation, the handshake or transaction
timeout - goes through :meth:`ServerSession.connectionLost`, which aborts
this session's transaction and releases (or withdraws from) the commit lock.

The session is assembled from mixins, one concern each:

* :mod:`zeotwist.server.zeoprobe`: the ZEO probe and the look at the first bytes;
* :mod:`zeotwist.server.output`: output counting and the pause of a client
  that does not read;
* :mod:`zeotwist.server.fastpath`: loads and the commit's commands without
  AMP's dispatch;
* :mod:`zeotwist.server.tpc`: the two-phase commit's responders (the
  transaction's states and moves are the table in
  :mod:`zeotwist.server.txnstate`; its storage calls are in
  :mod:`zeotwist.server.commit`);
* :mod:`zeotwist.server.guards`, :mod:`~zeotwist.server.auth`,
  :mod:`~zeotwist.server.storageapi`, :mod:`~zeotwist.server.blobs`: limits,
  login, the rest of the storage API, blobs.

This module keeps the connection's life, the handshake and the reads.

Runs on the reactor thread; the storage calls of the commit run in the
storage's worker thread, or here for a small one (``server.commit_call``).
"""
from ZODB.POSException import ReadOnlyError, StorageTransactionError
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.protocols import amp

from zeotwist.errors import ProtocolVersionError, UnknownStorage
from zeotwist.server.auth import AuthResponders
from zeotwist.server.blobs import BlobResponders
from zeotwist.server.budgets import DEFAULT_MAX_SPOOL, DEFAULT_MEMORY_BUDGET, MemoryBudget
from zeotwist.server.commit import ServerTransaction
from zeotwist.server.fastpath import FastAnswers
from zeotwist.server.guards import DEFAULT_VOTE_TIMEOUT, ResourceGuards
from zeotwist.server.iterators import (
    DEFAULT_ITERATOR_TIMEOUT, DEFAULT_MAX_ITERATORS, IteratorTable)
from zeotwist.server.limits import (
    DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_PENDING_OUTPUT, ConnectionLimiter, RateLimitedLog,
    RefusedConnection)
from zeotwist.server.output import OutputBudget
from zeotwist.server.prefetch import Prefetcher
from zeotwist.server.storageapi import StorageAPIResponders
from zeotwist.server.tpc import TransactionResponders
from zeotwist.server.txnstate import Event
from zeotwist.server.zeoprobe import ZeoProbe, probe_delay
from zeotwist.tls import use_clock
from zeotwist.wire import commands as C
from zeotwist.wire.framing import BoundedAMP, peer_text

_log = Logger()

MAX_NEW_OIDS = 1000
#: protocol violations (one line per connection) logged per interval, server-wide
VIOLATION_LOG_BURST, VIOLATION_LOG_INTERVAL = 20, 10.0


class ServerSession(ZeoProbe, OutputBudget, FastAnswers, TransactionResponders, ResourceGuards,
                    AuthResponders, StorageAPIResponders, BlobResponders, BoundedAMP):
    """One client connection (see the module)."""

    def __init__(self, servers: dict, clock, handshake_timeout: float = 5.0):
        super().__init__()
        self._servers = servers
        self._clock = clock
        self._handshake_timeout = handshake_timeout
        self._handshake_timer = None
        self.server = None          # the StorageServer, once registered
        self.read_only = True
        self.long_values = False    # the client reads long entries (wire.boxlayout)
        self._txn: ServerTransaction | None = None
        #: reference prefetch for this client, if it asked and the server allows
        self.prefetcher: Prefetcher | None = None

    # -- connection life -----------------------------------------------------
    #: the other end, for log lines: ``127.0.0.1:53412``, ``[::1]:53412`` or ``unix``
    peer = "-"

    def connectionMade(self):
        super().connectionMade()
        self.peer = peer_text(self.transport)
        _log.info("zeotwist: connection from {peer}", peer=self.peer)
        use_clock(self.transport, self._clock)      # TLS: see zeotwist.tls
        self._handshake_timer = self._clock.callLater(
            self._handshake_timeout, self._handshake_expired)
        self._probe_timer = self._clock.callLater(probe_delay(self._handshake_timeout),
                                                  self._probe_zeo)

    def _handshake_expired(self):
        self._handshake_timer = None
        why = "no handshake within %g s" % self._handshake_timeout
        if not self._heard:
            why += "; not one byte received"
        self.protocolViolation(why)

    def connectionLost(self, reason):
        for timer in (self._handshake_timer, self._grace_timer, self._probe_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._handshake_timer = self._grace_timer = self._probe_timer = None
        if self.server is not None:
            self.server.unregister(self)
            self.gone = True        # an abort still in the storage thread keeps no turn
            self._abort_txn()
        self.release_budgets()                      # guards: budgets and timers
        self._stop_output_check()                   # output
        factory = getattr(self, "factory", None)
        if factory is not None:
            factory.limiter.release()
        _log.info("zeotwist: connection from {peer} closed", peer=self.peer)
        super().connectionLost(reason)

    _heard = False          # any byte received yet (see _handshake_expired)

    def dataReceived(self, data: bytes) -> None:
        self._heard = True
        if self._first is not None:
            data = self._first_bytes(data)
            if data is None:
                return
        if self.server is not None:
            self.server.traffic["bytes_in"] += len(data)
        if self.transport is not None:
            self._begin_burst()                 # output: this burst's budget
        super().dataReceived(data)
        self.after_input()                  # guards: the server's budgets

    def protocolViolation(self, why: str) -> None:
        if not self._violated:
            counters = self.server.traffic if self.server is not None else getattr(
                getattr(self, "factory", None), "unregistered", None)
            if counters is not None:
                counters["protocol_violations"] += 1
        super().protocolViolation(why)

    def ampBoxReceived(self, box):
        if self._held is not None:
            self._held.append(box)
            return
        # The hot path: a well-formed LoadBefore whose record fits one AMP
        # value is answered here, without AMP's Deferred and argument
        # machinery.  Anything unusual (bad sizes, errors, big records) takes
        # the ordinary path below, which validates and maps errors.
        fast = self.FAST_BOXES.get(box.get(amp.COMMAND))
        if not (fast is not None and self.server is not None and fast(self, box)):
            super().ampBoxReceived(box)
        self._pause_if_over_budget()

    #: seconds a timed-out client has to read the TransactionTimedOut notice
    #: before its connection is aborted anyway
    NOTICE_GRACE = 5.0
    #: the client understands TransactionTimedOut (its Register said so)
    timeout_notice = False
    #: ... and its limit "vote" (Register's vote_timeout_notice)
    vote_timeout_notice = False
    _grace_timer = None

    def transaction_timed_out(self):
        """One log line; the transaction is aborted now (the commit lock
        passes on at once) and the connection dropped.  A client that
        understands it is told first (TransactionTimedOut), unless the
        storage is finishing the transaction: then the outcome is the
        storage's, and the client only loses its connection."""
        timeout = float(self.server.lock.timeout or 0)
        _log.warn("transaction timeout: {peer} held the commit lock too long (over "
                  "{timeout:g} s, storage {name!r}); disconnecting it", peer=peer_text(self.transport),
                  name=self.server.name, timeout=timeout)
        self._drop_timed_out(self.timeout_notice, timeout=timeout)

    def vote_timed_out(self):
        """--vote-timeout: the transaction did not vote in time.  As
        :meth:`transaction_timed_out`: one log line, the transaction
        aborted, the client told (limit "vote") if it asked to be, dropped."""
        timeout = float(self.vote_timeout or 0)
        _log.warn("vote timeout: {peer} kept a transaction open for over {timeout:g} s "
                  "without voting (storage {name!r}); disconnecting it",
                  peer=peer_text(self.transport), name=self.server.name, timeout=timeout)
        self._drop_timed_out(self.vote_timeout_notice, timeout=timeout, limit="vote")

    def _drop_timed_out(self, notice: bool, **told) -> None:
        self._violated = True           # nothing more is read from it
        txn, transport = self._txn, self.transport
        aborting = txn is not None and txn.state.can(Event.ABORT)
        self._abort_txn()
        if transport is None:
            return
        if not (aborting and notice):
            getattr(transport, "abortConnection", transport.loseConnection)()
            return
        self.callRemote(C.TransactionTimedOut, **told)
        self._closing = True            # the answer to a Vote in progress stays unsent
        transport.loseConnection()      # once the notice is written
        self._grace_timer = self._clock.callLater(
            self.NOTICE_GRACE, getattr(transport, "abortConnection", transport.loseConnection))

    def locateResponder(self, name):
        refuse = self.auth_gate(name)           # auth: NOT_LOGGED_IN before Login
        if refuse is not None:
            return refuse
        if self.server is None and name not in (C.Register.commandName, C.Login.commandName):
            return self._unregistered
        return super().locateResponder(name)

    def _unregistered(self, box):
        self.protocolViolation("command before Register")
        return Deferred()

    # -- handshake -------------------------------------------------------------
    @C.Register.responder
    def register(self, protocol, storage, read_only, prefetch=False, long_values=None,
                 timeout_notice=None, vote_timeout_notice=None):
        if self.server is not None:
            raise StorageTransactionError("already registered")
        if protocol != C.PROTOCOL_VERSION:
            raise ProtocolVersionError(
                "server speaks %s, client %s" % (C.PROTOCOL_VERSION, protocol))
        access = self.storage_access(storage)   # auth: the user's rights decide
        server = self._servers.get(storage)
        if server is None:
            raise UnknownStorage("no storage named %r" % storage)
        if server.read_only and not read_only:
            raise ReadOnlyError("storage %r is read-only" % storage)
        if access == "ro" and not read_only:
            raise ReadOnlyError("user %r may only read storage %r" % (self.user.name, storage))
        self.access = access
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None
        self.server, self.read_only = server, read_only or server.read_only
        if prefetch and server.prefetch_count > 0:
            self.prefetcher = Prefetcher(server.prefetch_count, server.prefetch_bytes)
        self.long_values = bool(long_values)    # big LoadBefore answers in one piece
        self.timeout_notice = bool(timeout_notice)  # told of its transaction timeout
        self.vote_timeout_notice = bool(vote_timeout_notice)    # ... and vote timeout
        server.register(self)
        self.registered()                       # guards: box size, idle timeout
        # others' commits up to now first (RelStorage: one poll); invalidations
        # sent meanwhile are covered by the answer's last_tid
        return server.feed.fresh().addCallback(lambda _: dict(
            last_tid=server.last_tid, read_only=self.read_only,
            supports_undo=server.supports_undo, name=server.storage.getName(),
            interfaces=server.interfaces, long_values=True))

    @C.Verify.responder
    def verify(self, tid):
        return self.server.verify(tid)

    # -- reads -------------------------------------------------------------------
    @C.LoadBefore.responder
    def load_before(self, oid, tid):
        self.server.stats["loads"] += 1
        r = self.server.storage.loadBefore(oid, tid)
        if r is None:
            return dict(found=False)
        data, start, end = r
        answer = dict(found=True, data=data, start=start)
        if end is not None:
            answer["end"] = end
        more = self._prefetch(oid, r, tid)
        if more is not None:
            answer["prefetch"] = more
        return answer

    @C.LoadSerial.responder
    def load_serial(self, oid, serial):
        return dict(data=self.server.storage.loadSerial(oid, serial))

    @C.LastTransaction.responder
    def last_transaction(self):
        return self.server.last_transaction()

    @C.Info.responder
    def info(self):
        return self.server.info()

    @C.NewOids.responder
    def new_oids(self, count):
        if self.read_only:
            raise ReadOnlyError()
        return dict(oids=self.server.new_oids(max(1, min(count, MAX_NEW_OIDS))))


class SessionFactory(ServerFactory):
    """Builds a :class:`ServerSession` per connection, sharing the servers."""

    #: a twisted.cred Portal when clients must log in (zeotwist.server.auth)
    portal = None

    def __init__(self, servers: dict, clock, handshake_timeout: float = 5.0,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 max_pending_output: int = DEFAULT_MAX_PENDING_OUTPUT,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 max_spool: int = DEFAULT_MAX_SPOOL, idle_timeout: float | None = None,
                 vote_timeout: float | None = DEFAULT_VOTE_TIMEOUT,
                 max_iterators: int = DEFAULT_MAX_ITERATORS,
                 iterator_timeout: float | None = DEFAULT_ITERATOR_TIMEOUT):
        self.servers = servers
        self.clock = clock
        self.handshake_timeout = handshake_timeout
        self.limiter = ConnectionLimiter(clock, max_connections)
        self.max_pending_output = max_pending_output
        self.budgets = MemoryBudget(clock, memory_budget, max_spool)
        self.iterators = IteratorTable(clock, self.limiter, max_iterators, iterator_timeout)
        #: every connection's protocol violations share this log's rate
        self.violation_log = RateLimitedLog(clock, VIOLATION_LOG_INTERVAL, VIOLATION_LOG_BURST)
        self.idle_timeout, self.vote_timeout = idle_timeout or None, vote_timeout or None
        #: counters of connections that never registered (--metrics: storage "")
        self.unregistered = dict(protocol_violations=0)

    def stop(self) -> None:
        """Cancel the factory's timers (at service stop)."""
        self.iterators.stop()

    def buildProtocol(self, addr):
        if not self.limiter.admit(addr):
            return RefusedConnection()   # aborted at once
        session = ServerSession(self.servers, self.clock, self.handshake_timeout)
        session.factory = self
        session.portal = self.portal
        session.max_pending_output = self.max_pending_output
        session.budgets, session.iterator_table = self.budgets, self.iterators
        session.logViolation = self.violation_log.warn
        session.idle_timeout, session.vote_timeout = self.idle_timeout, self.vote_timeout
        return session
