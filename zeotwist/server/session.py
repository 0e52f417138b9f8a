"""One client connection to the server: AMP responders and its transaction.

A session decodes a command, calls the :class:`StorageServer` or the
storage, and encodes the answer.  Every way a connection can end - the
peer closes or dies, a protocol violation, the handshake or transaction
timeout - goes through :meth:`ServerSession.connectionLost`, which aborts
this session's transaction and releases (or withdraws from) the commit lock.

The transaction's states and moves are the table in
:mod:`zeotwist.server.txnstate`; its storage calls are in
:mod:`zeotwist.server.commit`.

Runs on the reactor thread; the storage calls of the commit run in the
storage's worker thread, or here for a small one (``server.commit_call``).
"""
from collections import deque

from ZODB.POSException import (
    ConflictError, POSKeyError, ReadOnlyError, StorageTransactionError, UndoError)
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from zeotwist.errors import (
    FinishFailed, PickleRefused, ProtocolVersionError, RemoteProtocolError, TransactionStateError,
    TransactionTooLarge, UnknownStorage)
from zeotwist.server.auth import AuthResponders
from zeotwist.server import commit
from zeotwist.server.blobs import BLOB_VOTE_ERRORS, BlobResponders
from zeotwist.server.budgets import DEFAULT_MAX_SPOOL, DEFAULT_MEMORY_BUDGET, MemoryBudget
from zeotwist.server.commit import ClientMetaData, ServerTransaction
from zeotwist.server.guards import DEFAULT_VOTE_TIMEOUT, ResourceGuards
from zeotwist.server.iterators import (
    DEFAULT_ITERATOR_TIMEOUT, DEFAULT_MAX_ITERATORS, IteratorTable)
from zeotwist.server.limits import (
    DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_PENDING_OUTPUT, ConnectionLimiter, RateLimitedLog,
    RefusedConnection, pending_output)
from zeotwist.server.resolution import Resolution
from zeotwist.server.prefetch import Prefetcher, may_reference
from zeotwist.server.storageapi import StorageAPIResponders
from zeotwist.server.txnbuffer import TransactionBuffer
from zeotwist.server.txnstate import IN_STORAGE, Event, State
from zeotwist.tls import use_clock
from zeotwist.wire import commands as C
from zeotwist.wire import fast
from zeotwist.wire import prefetch
from zeotwist.wire import zeo
from zeotwist.wire.framing import BULK_MIN, BoundedAMP, peer_text

_log = Logger()

MAX_NEW_OIDS = 1000
#: protocol violations (one line per connection) logged per interval, server-wide
VIOLATION_LOG_BURST, VIOLATION_LOG_INTERVAL = 20, 10.0


def probe_delay(handshake_timeout: float) -> float:
    """Seconds of silence after which a connection gets the ZEO probe: one
    second before the handshake timeout drops it (half of it, if shorter).
    A zeotwist client speaks at once, a ZEO client waits for a ZEO server;
    a peer silent that long is about to be dropped anyway, so the probe's
    bytes cannot upset a client that would otherwise have been served."""
    return max(handshake_timeout / 2, handshake_timeout - 1.0)


class ServerSession(ResourceGuards, AuthResponders, StorageAPIResponders, BlobResponders,
                    BoundedAMP):
    def __init__(self, servers: dict, clock, handshake_timeout: float = 5.0):
        super().__init__()
        self._servers = servers
        self._clock = clock
        self._handshake_timeout = handshake_timeout
        self._handshake_timer = None
        self.server = None          # the StorageServer, once registered
        self.read_only = True
        self.long_values = False    # the client reads long entries (wire.fast)
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

    # -- a ZEO client? (zeotwist.wire.zeo) ----------------------------------------
    _probe_timer = None
    _first = b""            # the first bytes, until they show AMP or a ZEO frame

    def _probe_zeo(self):
        self._probe_timer = None
        if not self._heard and self.transport is not None and not self._violated:
            self.emit(zeo.PROBE)

    def _first_bytes(self, data: bytes) -> bytes | None:
        """Look at the connection's first bytes: the data to parse as AMP,
        or None (more bytes needed, or a ZEO frame: the connection is
        dropped, naming a ZEO client)."""
        data = self._first + data
        if len(data) < 2 or zeo.starts_zeo_frame(data) and zeo.first_message(data) is None:
            self._first = data
            return None
        self._first = None
        if not zeo.starts_zeo_frame(data):
            return data
        version = zeo.protocol_version(zeo.first_message(data))
        if version is not None:
            self.protocolViolation(
                "a ZEO client (it answered in ZEO protocol %s): this is a zeotwist server; "
                "point the client at a ZEO server, or use zeotwist's ClientStorage" % version)
        else:
            self.protocolViolation("not a zeotwist client (it sent %r first)" % data[:16])
        return None

    def connectionLost(self, reason):
        for timer in (self._handshake_timer, self._grace_timer, self._probe_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._handshake_timer = self._grace_timer = self._probe_timer = None
        if self.server is not None:
            self.server.unregister(self)
            self._abort_txn()
        self.release_budgets()                      # guards: budgets and timers
        if self._output_check is not None and self._output_check.active():
            self._output_check.cancel()
        self._output_check = self._held = None
        factory = getattr(self, "factory", None)
        if factory is not None:
            factory.limiter.release()
        _log.info("zeotwist: connection from {peer} closed", peer=self.peer)
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
            else:
                self.after_output(pending)          # guards: the server's budget

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
        if self._first is not None:
            data = self._first_bytes(data)
            if data is None:
                return
        if self.server is not None:
            self.server.traffic["bytes_in"] += len(data)
        if self.transport is not None:
            self._unread = 0
            self._budget = self.burst_budget(pending_output(self.transport) + self._reserved)
            if self._budget <= 0 and self._held is None and self.server is not None:
                # No room: this burst waits, its boxes held, rather than
                # having its first answer (a 10 MB record?) written anyway:
                # else N connections each hold one, whatever the budget.
                self._pause_reading()
        super().dataReceived(data)
        self.after_input()                  # guards: the server's budgets

    def emit(self, frame: bytes) -> None:
        if not self._closing:
            self._count_out(len(frame))
            super().emit(frame)

    def emit_parts(self, head: bytes, value: bytes, tail: bytes) -> None:
        if not self._closing:   # as emit: a blob chunk the worker read after the notice
            self._count_out(len(head) + len(value) + len(tail))
            super().emit_parts(head, value, tail)

    def _count_out(self, size: int) -> None:
        self._unread += size
        if self.server is not None:
            self.server.traffic["bytes_out"] += size

    def protocolViolation(self, why: str) -> None:
        if not self._violated:
            counters = self.server.traffic if self.server is not None else getattr(
                getattr(self, "factory", None), "unregistered", None)
            if counters is not None:
                counters["protocol_violations"] += 1
        super().protocolViolation(why)

    #: bytes of answers still being computed in another thread (a blob
    #: chunk read by the storage's worker), counted as output meanwhile
    _reserved = 0

    def reserve_output(self, nbytes: int, answer: Deferred) -> None:
        """``answer`` will write about ``nbytes`` once it fires, after this
        burst: count them now, so that requests pipelined behind it pause
        within the budget instead of all queueing their answers."""
        self._reserved += nbytes
        self._unread += nbytes
        answer.addBoth(self._reserved_done, nbytes)

    def _reserved_done(self, result, nbytes: int):
        self._reserved -= nbytes
        return result

    def _pause_reading(self) -> None:
        self._held = deque()
        self.transport.pauseProducing()
        self._output_check = self._clock.callLater(
            self.OUTPUT_CHECK_INTERVAL, self._check_output)

    def _check_output(self) -> None:
        self._output_check = None
        if self.transport is None or self._violated:
            return
        pending = pending_output(self.transport) + self._reserved
        if pending > self.max_pending_output // 2 or not self.may_resume():
            self._output_check = self._clock.callLater(
                self.OUTPUT_CHECK_INTERVAL, self._check_output)
            return
        held, self._held = self._held, None
        self._unread, self._budget = 0, self.burst_budget(pending)
        while held and self._held is None and self.transport is not None \
                and not self._violated:
            self.ampBoxReceived(held.popleft())
        if self._held is not None:          # paused again: keep the order
            held.extend(self._held)
            self._held = held
        elif self.transport is not None and not self._violated:
            self.transport.resumeProducing()
        self.output_settled()               # guards: the server's budget

    def ampBoxReceived(self, box):
        if self._held is not None:
            self._held.append(box)
            return
        # The hot path: a well-formed LoadBefore whose record fits one AMP
        # value is answered here, without AMP's Deferred and argument
        # machinery.  Anything unusual (bad sizes, errors, big records) takes
        # the ordinary path below, which validates and maps errors.
        if not (self.server is not None and (
                self._fast_load(box) or self._fast_store(box) or self._fast_begin(box)
                or self._fast_ask(box))):
            super().ampBoxReceived(box)
        self._pause_if_over_budget()

    def _pause_if_over_budget(self) -> None:
        if self._unread > self._budget and self.transport is not None \
                and not self._violated:
            self._pause_reading()

    def fast_frame(self, buf: bytes, off: int) -> int:
        """The hottest path (see BoundedAMP._parse): a LoadBefore question
        read straight from the bytes, without a box; 0 for anything else."""
        if self._held is not None or self.server is None:
            return 0
        request = fast.match_load_before_request(buf, off)
        if request is None or not self._answer_load(*request[:3]):
            return 0                         # the box is read as usual
        self._pause_if_over_budget()
        return request[3]

    def _fast_load(self, box) -> bool:
        request = fast.read_load_before_request(box)
        return request is not None and self._answer_load(*request)

    def _answer_load(self, ask: bytes, oid: bytes, tid: bytes) -> bool:
        """Answer LoadBefore ``ask``; False when AMP's path must (an error to
        map, a record too big for one value to this client)."""
        try:
            r = self.server.storage.loadBefore(oid, tid)
        except Exception:
            return False
        if r is not None and len(r[0]) > (
                fast.MAX_LONG_VALUE if self.long_values else fast.MAX_VALUE):
            return False                     # AMP's path splits it (and prefetches)
        prefetched = self._prefetch(oid, r, tid)
        self.server.stats["loads"] += 1
        if r is None or len(r[0]) < BULK_MIN:
            self.emit(fast.load_before_answer(ask, r, prefetched, self.long_values))
        else:           # a big record is written from its own object, not copied
            self.emit_parts(*fast.load_before_answer_parts(ask, r, prefetched, self.long_values))
        return True

    def _prefetch(self, oid: bytes, r: tuple, tid: bytes) -> bytes | None:
        """The ``prefetch`` value to add to the answer ``r`` (zeotwist.server.prefetch)."""
        prefetcher = self.prefetcher
        if prefetcher is None or r is None:
            return None
        prefetcher.answered(oid, r[2])
        if not may_reference(r[0]):
            return None             # a leaf record (most of them): nothing to look for
        before = prefetcher.records
        value = prefetcher.collect(self.server.storage.loadBefore, oid, r[0], tid)
        self.server.traffic["prefetched"] += prefetcher.records - before
        return value

    def _fast_store(self, box) -> bool:
        """A plain StoreData, handled without AMP's dispatch (every commit)."""
        data = fast.read_store_data(box)
        return data is not None and self._one_way(self.store_data, data)

    def _fast_begin(self, box) -> bool:
        """A plain TpcBegin (no restore tid or status), likewise."""
        fields = fast.read_tpc_begin(box)
        return fields is not None and self._one_way(self.tpc_begin, *fields)

    def _fast_ask(self, box) -> bool:
        """A plain Vote or Finish question (every commit), answered without
        AMP's dispatch and its Deferreds: the same answer and error boxes
        as AMP's path (``makeResponse``; the code of the command's first
        error class that matches), anything unusual left to that path."""
        name = box.get(amp.COMMAND)
        if name == C.Finish.commandName and len(box) == 2:
            command, call, args = C.Finish, self.finish, ()
        elif name == C.Vote.commandName and (len(box) == 2 or len(box) == 3 and box.get(
                b"can_resolve") in (b"True", b"False")):
            command, call = C.Vote, self.vote
            args = (box.get(b"can_resolve") == b"True",)
        else:
            return False
        tag = box.get(amp.ASK)
        if tag is None:
            return False
        try:
            d = call(*args)
        except (RemoteProtocolError, KeyError, TypeError, ValueError) as e:   # as guarded
            self.protocolViolation("bad arguments to %s: %s" % (name.decode("ascii"), e))
            return True
        except Exception:
            d = fail()
        d.addCallbacks(self._fast_answer, self._fast_error, (command, tag), None, (command, tag))
        d.addErrback(self.unhandledError)
        return True

    def _fast_answer(self, result: dict, command, tag: bytes) -> None:
        answer = command.makeResponse(result, self)
        answer[amp.ANSWER] = tag
        self._send_answer(answer)

    def _fast_error(self, failure, command, tag: bytes) -> None:
        for error, code in command.allErrors.items():
            if failure.check(error):
                break
        else:
            return failure          # as AMP's path: logged, the link dropped
        answer = amp.QuitBox() if error in command.fatalErrors else amp.AmpBox()
        answer[amp.ERROR] = tag
        answer[amp.ERROR_CODE] = code
        answer[amp.ERROR_DESCRIPTION] = str(failure.value).encode("utf-8", "replace")
        self._send_answer(answer)

    def _send_answer(self, answer) -> None:
        try:
            self.sendBox(answer)
        except (amp.ProtocolSwitched, amp.ConnectionLost):   # as AMP's _safeEmit
            pass

    def _one_way(self, responder, *args) -> bool:
        try:
            responder(*args)
        except Exception:           # as AMP's path: a one-way command failed
            self.unhandledError(Failure())
        return True

    #: seconds a timed-out client has to read the TransactionTimedOut notice
    #: before its connection is aborted anyway
    NOTICE_GRACE = 5.0
    #: the client understands TransactionTimedOut (its Register said so)
    timeout_notice = False
    _closing = False        # the notice is out: nothing more is written
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
        self._violated = True           # nothing more is read from it
        txn, transport = self._txn, self.transport
        aborting = txn is not None and txn.state.can(Event.ABORT)
        self._abort_txn()
        if transport is None:
            return
        if not (aborting and self.timeout_notice):
            getattr(transport, "abortConnection", transport.loseConnection)()
            return
        self.callRemote(C.TransactionTimedOut, timeout=timeout)
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
                 timeout_notice=None):
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

    # -- two-phase commit ------------------------------------------------------
    # Every move of the transaction goes through its state table
    # (zeotwist.server.txnstate); the storage calls are in zeotwist.server.commit.
    @C.TpcBegin.responder
    def tpc_begin(self, user, description, extension, tid=None, status=None):
        if self._txn is not None and not self._txn.state.final:
            self.protocolViolation("TpcBegin inside a transaction")
            return {}
        meta = ClientMetaData(user, description, extension)
        buffer = TransactionBuffer(max_bytes=self.server.max_transaction_bytes,
                                   budgets=self.budgets)
        self._txn = ServerTransaction(meta, buffer, self.read_only, tid, status or " ",
                                      self.server.oid_range.check)
        self.transaction_opened(self._txn)      # guards: --vote-timeout
        return {}

    @C.StoreData.responder
    def store_data(self, data):
        txn = self._txn
        if txn is not None and txn.state.can(Event.STORE_RESOLVED):
            txn.state.move(Event.STORE_RESOLVED)
            txn.fixes.append(data)          # the client's resolved records
            return {}
        if txn is None or not txn.state.can(Event.STORE):
            self.protocolViolation("StoreData outside a transaction")
            return {}
        if not txn.read_only:       # a read-only vote fails: spool nothing
            txn.buffer.append(data)
        return {}

    @C.Vote.responder
    def vote(self, can_resolve=None):
        txn = self._txn
        if txn is None or not txn.state.can(Event.VOTE):
            raise TransactionStateError("Vote without an open transaction")
        self.transaction_voting()
        if txn.read_only:
            self._abort_txn()
            raise ReadOnlyError()
        if txn.state.move(Event.VOTE) is State.RESOLVING:
            return self._revote(txn)
        if can_resolve and self.server.client_conflict_resolution:
            txn.resolution = Resolution()
        txn.send_current = self.prefetcher is not None
        d = self.server.lock.acquire(self)
        d.addCallback(self._lock_granted, txn)
        d.addCallbacks(self._voted, self._vote_failed, (txn,), None, (txn,))
        return d

    def _lock_granted(self, _, txn):
        txn.state.move(Event.LOCK_GRANTED)
        server = self.server
        return server.commit_call(commit.vote, txn, server.last_tid, server.reads_extension)

    def _revote(self, txn):
        """The client sent its resolved records: store them and vote (lock held)."""
        d = self.server.commit_call(commit.revote, txn)
        d.addCallbacks(self._voted, self._vote_failed, (txn,), None, (txn,))
        return d

    def _voted(self, result, txn):
        resolved, conflicts, to_resolve = result
        if not txn.state.can(Event.VOTED):
            # aborted meanwhile (transaction timeout, Abort, lost link): if
            # anyone still hears this answer, it must not read as a vote
            raise TransactionStateError("the transaction was aborted while it voted")
        if conflicts:
            self.server.stats["conflicts"] += len(conflicts)
            answer = dict(resolved=[], conflicts=b"".join(conflicts))
            # records of tids already fanned out to this client, so no
            # later invalidation can be one it has not seen yet
            current = [r for r in txn.current if r[2] <= self.server.last_tid]
            if current:
                answer["current"] = prefetch.encode(current)
                self.server.traffic["prefetched"] += len(current)
            return self._abort_txn().addCallback(lambda _: answer)
        if to_resolve:          # the client resolves; the lock stays ours meanwhile
            txn.state.move(Event.CONFLICTS_LEFT)
            self.server.stats["client_resolutions"] += 1
            txn.fixes = TransactionBuffer(max_bytes=self.server.max_transaction_bytes,
                                          budgets=self.budgets)     # guards: spool budgets
            return dict(resolved=[], conflicts=b"", to_resolve=to_resolve)
        txn.state.move(Event.VOTED)
        return dict(resolved=list(resolved), conflicts=b"")

    _EXPECTED = (ConflictError, ReadOnlyError, StorageTransactionError,
                 POSKeyError, TransactionTooLarge, RemoteProtocolError, UndoError,
                 PickleRefused)
    _EXPECTED += BLOB_VOTE_ERRORS

    def _vote_failed(self, failure, txn):
        if failure.check(ConflictError):
            self.server.stats["conflicts"] += 1
        if not failure.check(*self._EXPECTED):
            _log.failure("vote failed", failure)
        # locking or voting: this is still the session's transaction
        d = self._abort_txn() if txn.state.can(Event.ABORT) else succeed(None)
        if failure.check(RemoteProtocolError):
            self.protocolViolation("malformed store stream: %s" % failure.value)
        return d.addCallback(lambda _: failure)

    @C.Finish.responder
    def finish(self):
        txn = self._txn
        if txn is None or not txn.state.can(Event.FINISH):
            raise TransactionStateError("Finish without a voted transaction")
        txn.state.move(Event.FINISH)
        d = self.server.commit_call(commit.finish, txn)
        d.addCallbacks(self._finished, self._finish_failed, (txn,), None, (txn,))
        return d

    def _finished(self, tid, txn):
        txn.state.move(Event.FINISHED)
        if txn.finish_error is not None:
            _log.error("zeotwist: tpc_finish of storage {name!r} raised after committing "
                       "{tid}: {err}; the commit stands", name=self.server.name,
                       tid=tid.hex(), err=repr(txn.finish_error))
        # a Deferred when the feed announces our commit among others' (RelStorage)
        d = maybeDeferred(self.server.committed, tid, txn.oids, self)
        d.addBoth(self._release_lock)
        return d.addCallback(lambda _: dict(tid=tid))

    def _release_lock(self, result):
        self.server.lock.release(self)
        return result

    def _finish_failed(self, failure, txn):
        if failure.check(FinishFailed):       # the storage raised; not committed
            _log.error("zeotwist: storage {name!r}: {why}", name=self.server.name,
                       why=failure.value)
        else:
            _log.failure("tpc_finish failed; aborting", failure)
        left = txn.state.move(Event.FINISH_FAILED)
        return self._discard(txn, left).addCallback(lambda _: failure)

    @C.Abort.responder
    def abort(self):
        return self._abort_txn().addCallback(lambda _: {})

    def _abort_txn(self):
        """The one abort path: discard, tpc_abort if begun, release the lock."""
        txn = self._txn
        if txn is None or not txn.state.can(Event.ABORT):
            return succeed(None)      # none, over, or finishing (the finish ends it)
        return self._discard(txn, txn.state.move(Event.ABORT))

    def _discard(self, txn, left: State):
        """Undo what ``txn`` holds, having left state ``left``."""
        server = self.server
        server.stats["aborts"] += 1
        if left not in IN_STORAGE:
            server.lock.release(self)     # withdraws a queued request
            txn.close_buffers()
            return succeed(None)
        # The storage thread runs calls in order, so this tpc_abort runs
        # after any vote still in progress (an inline call runs only when
        # nothing is in progress there).
        d = server.commit_call(commit.abort, txn)
        d.addErrback(lambda f: _log.failure("tpc_abort failed", f))
        d.addBoth(lambda _: server.lock.release(self))
        return d


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
