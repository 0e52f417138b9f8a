"""One client connection to the server: AMP responders and its transaction.

A session decodes a command, calls the :class:`StorageServer` or the
storage, and encodes the answer.  Every way a connection can end - the
peer closes or dies, a protocol violation, the handshake or transaction
timeout - goes through :meth:`ServerSession.connectionLost`, which aborts
this session's transaction and releases (or withdraws from) the commit lock.

Runs on the reactor thread; ``_*_in_thread`` methods run in the storage's
worker thread and touch nothing but the storage and the transaction.
"""
from collections import deque

from ZODB.Connection import TransactionMetaData
from ZODB.POSException import (
    ConflictError, ReadConflictError, ReadOnlyError, StorageTransactionError)
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger

from ZODB.POSException import POSKeyError, UndoError

from zeotwist.errors import (
    ProtocolVersionError, RemoteProtocolError, TransactionTooLarge, UnknownStorage)
from zeotwist.server.auth import AuthResponders
from zeotwist.server.blobs import BLOB_RECORD_HANDLERS, BLOB_VOTE_ERRORS, BlobResponders
from zeotwist.server.limits import (
    DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_PENDING_OUTPUT, ConnectionLimiter, RefusedConnection,
    pending_output)
from zeotwist.server.storageapi import RECORD_HANDLERS as STORAGE_API_RECORD_HANDLERS
from zeotwist.server.storageapi import StorageAPIResponders
from zeotwist.server.txnbuffer import TransactionBuffer
from zeotwist.tls import use_clock
from zeotwist.wire.records import CHECK, STORE
from zeotwist.wire import commands as C
from zeotwist.wire.framing import BoundedAMP, frame as _frame

_log = Logger()

MAX_NEW_OIDS = 1000
_MAX_VALUE = 0xFFFF


class _Txn:
    """Server-side state of one client transaction.

    ``state`` moves open -> locking -> voting -> voted -> finishing -> done,
    or to ``aborted`` from any state before finishing.
    """

    def __init__(self, meta, buffer, read_only):
        self.meta = meta
        self.buffer = buffer
        self.read_only = read_only
        self.state = "open"
        self.begun = False      # storage.tpc_begin was called (worker thread)
        self.oids: list = []
        self.tid, self.status = None, " "   # restore: explicit tid and status
        self.undone: list = []          # oids undone in this transaction


class ServerSession(AuthResponders, StorageAPIResponders, BlobResponders, BoundedAMP):
    def __init__(self, servers: dict, clock, handshake_timeout: float = 5.0):
        super().__init__()
        self._servers = servers
        self._clock = clock
        self._handshake_timeout = handshake_timeout
        self._handshake_timer = None
        self.server = None          # the StorageServer, once registered
        self.read_only = True
        self._txn: _Txn | None = None

    # -- connection life -----------------------------------------------------
    def connectionMade(self):
        super().connectionMade()
        use_clock(self.transport, self._clock)      # TLS: see zeotwist.tls
        self._handshake_timer = self._clock.callLater(
            self._handshake_timeout, self._handshake_expired)

    def _handshake_expired(self):
        self._handshake_timer = None
        why = "no handshake within %g s" % self._handshake_timeout
        if not self._heard:         # ZEO clients wait for a ZEO server's greeting
            why += "; not one byte received: a ZEO client? (it needs a ZEO server)"
        self.protocolViolation(why)

    def connectionLost(self, reason):
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None
        if self.server is not None:
            self.server.unregister(self)
            self._abort_txn()
        if self._output_check is not None and self._output_check.active():
            self._output_check.cancel()
        self._output_check = self._held = None
        factory = getattr(self, "factory", None)
        if factory is not None:
            factory.limiter.release()
        super().connectionLost(reason)

    #: a client that leaves more than this unread is dropped
    max_pending_output = DEFAULT_MAX_PENDING_OUTPUT

    def send_frame(self, frame: bytes) -> None:
        if self.transport is not None and not self._violated:
            self.emit(frame)
            pending = pending_output(self.transport)
            if pending > self.max_pending_output:
                self.protocolViolation(
                    "client is not reading: %d bytes of invalidations pending" % pending)

    # A client that sends requests but does not read the answers: once more
    # than max_pending_output waits for it, the session stops reading it and
    # holds the requests already read, until the client has taken half of
    # that; answers are never dropped, and the client only waits.
    _held = None            # a deque of boxes while reading is paused
    _output_check = None    # the timer that looks at the output again meanwhile
    _unread = 0             # bytes emitted since this burst of input began
    _budget = 2**62         # bytes the burst may emit before reading pauses
    OUTPUT_CHECK_INTERVAL = 0.05

    _heard = False          # any byte received yet (see _handshake_expired)

    def dataReceived(self, data: bytes) -> None:
        self._heard = True
        if self.transport is not None:
            self._unread = 0
            self._budget = self.max_pending_output - pending_output(self.transport)
        super().dataReceived(data)

    def emit(self, frame: bytes) -> None:
        self._unread += len(frame)
        super().emit(frame)

    def _pause_reading(self) -> None:
        self._held = deque()
        self.transport.pauseProducing()
        self._output_check = self._clock.callLater(
            self.OUTPUT_CHECK_INTERVAL, self._check_output)

    def _check_output(self) -> None:
        self._output_check = None
        if self.transport is None or self._violated:
            return
        pending = pending_output(self.transport)
        if pending > self.max_pending_output // 2:
            self._output_check = self._clock.callLater(
                self.OUTPUT_CHECK_INTERVAL, self._check_output)
            return
        held, self._held = self._held, None
        self._unread, self._budget = 0, self.max_pending_output - pending
        while held and self._held is None and self.transport is not None \
                and not self._violated:
            self.ampBoxReceived(held.popleft())
        if self._held is not None:          # paused again: keep the order
            held.extend(self._held)
            self._held = held
        elif self.transport is not None and not self._violated:
            self.transport.resumeProducing()

    def ampBoxReceived(self, box):
        if self._held is not None:
            self._held.append(box)
            return
        # The hot path: a well-formed LoadBefore whose record fits one AMP
        # value is answered here, without AMP's Deferred and argument
        # machinery.  Anything unusual (bad sizes, errors, big records) takes
        # the ordinary path below, which validates and maps errors.
        if not (box.get(b"_command") == b"LoadBefore" and self.server is not None
                and self._fast_load(box)):
            super().ampBoxReceived(box)
        if self._unread > self._budget and self.transport is not None \
                and not self._violated:
            self._pause_reading()

    def _fast_load(self, box) -> bool:
        ask, oid, tid = box.get(b"_ask"), box.get(b"oid"), box.get(b"tid")
        if ask is None or oid is None or tid is None or len(oid) != 8 \
                or len(tid) != 8 or len(box) != 4:
            return False
        try:
            r = self.server.storage.loadBefore(oid, tid)
        except Exception:
            return False
        if r is None:
            frame = _frame(b"_answer", ask, b"found", b"False")
        else:
            data, start, end = r
            if len(data) > _MAX_VALUE:
                return False
            if end is None:
                frame = _frame(b"_answer", ask, b"data", data, b"found", b"True",
                               b"start", start)
            else:
                frame = _frame(b"_answer", ask, b"data", data, b"end", end,
                               b"found", b"True", b"start", start)
        self.server.stats["loads"] += 1
        self.emit(frame)
        return True

    def transaction_timed_out(self):
        _log.warn("transaction of {peer} held the commit lock too long; "
                  "disconnecting it", peer=self.transport and self.transport.getPeer())
        self.protocolViolation("transaction timeout")

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
    def register(self, protocol, storage, read_only):
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
        server.register(self)
        return dict(last_tid=server.last_tid, read_only=self.read_only,
                    supports_undo=server.supports_undo, name=server.storage.getName(),
                    interfaces=server.interfaces)

    @C.Verify.responder
    def verify(self, tid):
        server = self.server
        if tid > server.last_tid:
            changed = None
        else:
            changed = server.invalidations.since(tid)
        return dict(last_tid=server.last_tid, complete=changed is not None,
                    oids=sorted(changed or ()))

    # -- reads -------------------------------------------------------------------
    @C.LoadBefore.responder
    def load_before(self, oid, tid):
        self.server.stats["loads"] += 1
        r = self.server.storage.loadBefore(oid, tid)
        if r is None:
            return dict(found=False)
        data, start, end = r
        if end is None:
            return dict(found=True, data=data, start=start)
        return dict(found=True, data=data, start=start, end=end)

    @C.LoadSerial.responder
    def load_serial(self, oid, serial):
        return dict(data=self.server.storage.loadSerial(oid, serial))

    @C.LastTransaction.responder
    def last_transaction(self):
        return dict(tid=self.server.last_tid)

    @C.Info.responder
    def info(self):
        return self.server.info()

    @C.NewOids.responder
    def new_oids(self, count):
        if self.read_only:
            raise ReadOnlyError()
        return dict(oids=self.server.new_oids(max(1, min(count, MAX_NEW_OIDS))))

    # -- two-phase commit ------------------------------------------------------
    @C.TpcBegin.responder
    def tpc_begin(self, user, description, extension, tid=None, status=None):
        if self._txn is not None and self._txn.state not in ("done", "aborted"):
            self.protocolViolation("TpcBegin inside a transaction")
            return {}
        meta = TransactionMetaData(user, description, extension)
        buffer = TransactionBuffer(max_bytes=self.server.max_transaction_bytes)
        self._txn = _Txn(meta, buffer, self.read_only)
        self._txn.tid, self._txn.status = tid, status or " "
        return {}

    @C.StoreData.responder
    def store_data(self, data):
        txn = self._txn
        if txn is None or txn.state != "open":
            self.protocolViolation("StoreData outside a transaction")
            return {}
        txn.buffer.append(data)
        return {}

    @C.Vote.responder
    def vote(self):
        txn = self._txn
        if txn is None or txn.state != "open":
            raise StorageTransactionError("Vote without an open transaction")
        if txn.read_only:
            self._abort_txn()
            raise ReadOnlyError()
        txn.state = "locking"
        d = self.server.lock.acquire(self)
        d.addCallback(self._lock_granted, txn)
        d.addCallbacks(self._voted, self._vote_failed, (txn,), None, (txn,))
        return d

    def _lock_granted(self, _, txn):
        txn.state = "voting"
        return self.server.call(self._vote_in_thread, txn)

    def _vote_in_thread(self, txn):
        storage, meta = self.server.storage, txn.meta
        self._tpc_begin_in_thread(storage, txn)     # storageapi: optional tid/status
        txn.begun = True
        conflicts = []
        handlers = self.record_handlers
        for kind, oid, serial, payload in txn.buffer.records(handlers):
            try:
                handlers[kind](self, storage, txn, oid, serial, payload)
            except ConflictError as e:
                if isinstance(e, ReadConflictError):
                    raise
                committed = (e.serials or (None, None))[0] or b"\0" * 8
                conflicts.append(oid + committed + serial)
        if conflicts:
            return (), conflicts
        resolved = storage.tpc_vote(meta) or ()
        return (list(resolved) + txn.undone if txn.undone else resolved), ()

    def _apply_store(self, storage, txn, oid, serial, data):
        storage.store(oid, serial, data, "", txn.meta)
        txn.oids.append(oid)

    def _apply_check(self, storage, txn, oid, serial, payload):
        storage.checkCurrentSerialInTransaction(oid, serial, txn.meta)

    #: record kind -> handler(session, storage, txn, oid, serial, payload),
    #: run in the storage thread during the vote.  Mixins add their kinds.
    record_handlers = {STORE: _apply_store, CHECK: _apply_check, **STORAGE_API_RECORD_HANDLERS}
    record_handlers.update(BLOB_RECORD_HANDLERS)

    def _voted(self, result, txn):
        resolved, conflicts = result
        if txn.state != "voting":      # aborted meanwhile: nobody is listening
            return dict(resolved=[], conflicts=b"")
        if conflicts:
            self.server.stats["conflicts"] += len(conflicts)
            d = self._abort_txn()
            return d.addCallback(lambda _: dict(resolved=[], conflicts=b"".join(conflicts)))
        txn.state = "voted"
        return dict(resolved=list(resolved), conflicts=b"")

    _EXPECTED = (ConflictError, ReadOnlyError, StorageTransactionError,
                 POSKeyError, TransactionTooLarge, RemoteProtocolError, UndoError)
    _EXPECTED += BLOB_VOTE_ERRORS

    def _vote_failed(self, failure, txn):
        if not failure.check(*self._EXPECTED):
            _log.failure("vote failed", failure)
        d = self._abort_txn() if txn.state in ("locking", "voting") else succeed(None)
        if failure.check(RemoteProtocolError):
            self.protocolViolation("malformed store stream: %s" % failure.value)
        return d.addCallback(lambda _: failure)

    @C.Finish.responder
    def finish(self):
        txn = self._txn
        if txn is None or txn.state != "voted":
            raise StorageTransactionError("Finish without a voted transaction")
        txn.state = "finishing"
        d = self.server.call(self._finish_in_thread, txn)
        d.addCallbacks(self._finished, self._finish_failed, (txn,), None, (txn,))
        return d

    def _finish_in_thread(self, txn):
        tids = []
        self.server.storage.tpc_finish(txn.meta, tids.append)
        txn.buffer.close()
        return tids[0]

    def _finished(self, tid, txn):
        txn.state = "done"
        self.server.committed(tid, txn.oids, self)
        self.server.lock.release(self)
        return dict(tid=tid)

    def _finish_failed(self, failure, txn):
        _log.failure("tpc_finish failed; aborting", failure)
        txn.state = "voted"
        return self._abort_txn().addCallback(lambda _: failure)

    @C.Abort.responder
    def abort(self):
        return self._abort_txn().addCallback(lambda _: {})

    def _abort_txn(self):
        """The one abort path: discard, tpc_abort if begun, release the lock."""
        txn, server = self._txn, self.server
        if txn is None or txn.state in ("done", "aborted", "finishing"):
            return succeed(None)
        state, txn.state = txn.state, "aborted"
        server.stats["aborts"] += 1
        if state in ("open", "locking"):
            server.lock.release(self)     # withdraws a queued request
            txn.buffer.close()
            return succeed(None)
        # voting or voted: the worker thread runs calls in order, so this
        # tpc_abort runs after any vote still in progress.
        d = server.call(self._abort_in_thread, txn)
        d.addErrback(lambda f: _log.failure("tpc_abort failed", f))
        d.addBoth(lambda _: server.lock.release(self))
        return d

    def _abort_in_thread(self, txn):
        try:
            if txn.begun:
                self.server.storage.tpc_abort(txn.meta)
        finally:
            txn.buffer.close()


class SessionFactory(ServerFactory):
    """Builds a :class:`ServerSession` per connection, sharing the servers."""

    #: a twisted.cred Portal when clients must log in (zeotwist.server.auth)
    portal = None

    def __init__(self, servers: dict, clock, handshake_timeout: float = 5.0,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 max_pending_output: int = DEFAULT_MAX_PENDING_OUTPUT):
        self.servers = servers
        self.clock = clock
        self.handshake_timeout = handshake_timeout
        self.limiter = ConnectionLimiter(clock, max_connections)
        self.max_pending_output = max_pending_output

    def buildProtocol(self, addr):
        if not self.limiter.admit(addr):
            return RefusedConnection()   # aborted at once
        session = ServerSession(self.servers, self.clock, self.handshake_timeout)
        session.factory = self
        session.portal = self.portal
        session.max_pending_output = self.max_pending_output
        return session
