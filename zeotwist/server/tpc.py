"""The two-phase commit's responders: TpcBegin, StoreData, Vote, Finish, Abort.

A mixin of :class:`~zeotwist.server.session.ServerSession` (it uses the
session's ``server``, ``_txn``, ``budgets`` and ``prefetcher``).  Every
move of the session's transaction goes through its state table
(:mod:`zeotwist.server.txnstate`); the storage calls are in
:mod:`zeotwist.server.commit`.  :meth:`TransactionResponders._abort_txn` is
the one abort path, which the session also takes when its connection ends.

Runs on the reactor thread; the storage calls of the commit run in the
storage's worker thread, or here for a small one (``server.commit_call``).
"""
from ZODB.POSException import (
    ConflictError, POSKeyError, ReadOnlyError, StorageTransactionError, UndoError)
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from zeotwist.errors import (
    FinishFailed, PickleRefused, RemoteProtocolError, TransactionStateError, TransactionTooLarge)
from zeotwist.server import commit
from zeotwist.server.blobs import BLOB_VOTE_ERRORS
from zeotwist.server.commit import ClientMetaData, ServerTransaction
from zeotwist.server.resolution import Resolution
from zeotwist.server.txnbuffer import TransactionBuffer
from zeotwist.server.txnstate import IN_STORAGE, Event, State
from zeotwist.twistedcompat import value_now
from zeotwist.wire import commands as C
from zeotwist.wire import prefetch

#: the session's namespace: these lines were the session's, and logging
#: configurations and tests select them by it
_log = Logger(namespace="zeotwist.server.session")


class TransactionResponders(amp.CommandLocator):
    """The session's transaction, from TpcBegin to Finish or Abort."""

    #: the connection has ended: a vote refused now keeps no turn (CommitLock)
    gone = False

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
        if txn is not None and txn.state.state is State.OPEN:    # every commit's
            if not txn.read_only:       # a read-only vote fails: spool nothing
                txn.buffer.append(data)
            return {}
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
        granted = value_now(self.server.lock.acquire(self, txn.buffer.oids))
        if not isinstance(granted, Deferred):       # the lock was free: no callbacks
            return self._lock_granted(None, txn)
        return granted.addCallbacks(self._lock_granted, self._vote_failed,
                                    (txn,), None, (txn,))

    def _lock_granted(self, _, txn):
        """The lock is held: the storage's vote.  Its answer (or failure),
        computed here when the storage ran the call inline, else a Deferred."""
        server = self.server
        try:
            txn.state.move(Event.LOCK_GRANTED)
            voted = value_now(server.commit_call(
                commit.vote, txn, server.last_tid, server.reads_extension))
        except Exception:
            return self._vote_failed(Failure(), txn)
        if isinstance(voted, Deferred):
            self.send_later()       # output: no answer at once to carry them
            return voted.addCallbacks(self._voted, self._vote_failed, (txn,), None, (txn,))
        return self._voted(voted, txn)

    def awaits_lock(self) -> bool:
        """Whether this client's vote waits for the commit lock: the
        invalidations sent to it meanwhile wait for its answer
        (output.send_frame), which follows the grant at once."""
        txn = self._txn
        return txn is not None and txn.state.state is State.LOCKING

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
            refused = [c[:8] for c in conflicts]    # CommitLock: its turn is kept
            return self._abort_txn(refused).addCallback(lambda _: answer)
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
        refused = [failure.value.oid] if failure.check(ConflictError) and failure.value.oid else ()
        d = self._abort_txn(refused) if txn.state.can(Event.ABORT) else succeed(None)
        if failure.check(RemoteProtocolError):
            self.protocolViolation("malformed store stream: %s" % failure.value)
        return d.addCallback(lambda _: failure)

    @C.Finish.responder
    def finish(self, answer_now=None):
        """``answer_now(tid)`` (the fast path's): writes the answer at once,
        for a commit finished here (see :meth:`_finished`); then None."""
        txn = self._txn
        if txn is None or not txn.state.can(Event.FINISH):
            raise TransactionStateError("Finish without a voted transaction")
        txn.state.move(Event.FINISH)
        tid = value_now(self.server.commit_call(commit.finish, txn))
        if isinstance(tid, Deferred):
            return tid.addCallbacks(self._finished, self._finish_failed, (txn,), None, (txn,))
        return self._finished(tid, txn, answer_now)     # (tpc_finish ran inline: it returned)

    def _finished(self, tid, txn, answer_now=None):
        """tpc_finish returned ``tid``: fan it out, release the lock; the
        answer.  With ``answer_now``, when no voter waiting for the lock
        kept this commit's invalidation back (a lone writer's every
        commit), the answer is written first and the lock passes on after
        it (None returned): the committer does not wait for the release,
        and every other client was sent the invalidation before it."""
        txn.state.move(Event.FINISHED)
        if txn.finish_error is not None:
            _log.error("zeotwist: tpc_finish of storage {name!r} raised after committing "
                       "{tid}: {err}; the commit stands", name=self.server.name,
                       tid=tid.hex(), err=repr(txn.finish_error))
        # a Deferred when the feed announces our commit among others' (RelStorage)
        try:
            fanned = self.server.committed(tid, txn.oids, self)
        except Exception:
            self._release_lock(None)
            raise
        if fanned is None:
            if answer_now is not None and not self.server.kept_back:
                try:
                    answer_now(tid)
                finally:                # whatever the write raised: the lock passes on
                    self._release_lock(None)
                return None
            self._release_lock(None)
            return dict(tid=tid)
        fanned.addBoth(self._release_lock)
        return fanned.addCallback(lambda _: dict(tid=tid))

    def _release_lock(self, result):
        """The commit is fanned out: the lock passes on, and what voters
        still waiting for it kept back goes out before this answer."""
        self.server.lock.release(self)
        self.server.send_kept_back()
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

    def _abort_txn(self, refused=()):
        """The one abort path: discard, tpc_abort if begun, release the lock
        (``refused``: the oids the vote was refused for; CommitLock.release)."""
        txn = self._txn
        if txn is None or not txn.state.can(Event.ABORT):
            return succeed(None)      # none, over, or finishing (the finish ends it)
        return self._discard(txn, txn.state.move(Event.ABORT), refused)

    def _discard(self, txn, left: State, refused=()):
        """Undo what ``txn`` holds, having left state ``left``."""
        server = self.server
        server.stats["aborts"] += 1
        self.send_later()           # output: what waited for the vote's answer
        if left not in IN_STORAGE:
            # (or withdraws a queued request)
            server.lock.release(self, refused, committed=False)
            txn.close_buffers()
            return succeed(None)
        # The storage thread runs calls in order, so this tpc_abort runs
        # after any vote still in progress (an inline call runs only when
        # nothing is in progress there).
        d = server.commit_call(commit.abort, txn)
        d.addErrback(lambda f: _log.failure("tpc_abort failed", f))
        d.addBoth(lambda _: server.lock.release(self, () if self.gone else refused,
                                                committed=False))
        return d

