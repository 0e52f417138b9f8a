"""ClientStorage's two-phase commit: ZODB's ``tpc_*`` and ``store`` calls.

A mixin of :class:`~zeotwist.client.storage.ClientStorage`, called from the
committing thread.  One transaction at a time per storage, as in ZEO:
``tpc_begin`` waits while another thread's transaction is in progress
(``_tpc_cond``).  Each transaction is a
:class:`~zeotwist.client.transaction.ClientTransaction`, which runs on the
reactor thread (what is stored is handed to it through ``_dispatch``); the
vote and the finish are sent by the committing thread itself when it can
(zeotwist.client.threadwrites), else through the reactor.  Conflicts the
server leaves to the client are resolved here, in the committing thread,
with the application's classes.  The other mixins' transactional methods
(undo, restore, storeBlob) find the transaction through ``_check_trans``.
"""
import threading

from ZODB.POSException import ConflictError, ReadOnlyError, StorageTransactionError

from zeotwist.client.reactorthread import in_reactor_thread
from zeotwist.errors import ClientDisconnected, UsageError


def _status(status) -> str:
    """A transaction status as one character (restore may pass bytes)."""
    return status.decode("ascii") if isinstance(status, bytes) else (status or " ")


class StorageCommitMixin:
    """``tpc_begin``, ``store``, ``checkCurrentSerialInTransaction``,
    ``tpc_vote``, ``tpc_finish``, ``tpc_abort`` of a ClientStorage (its
    ``_client``, ``_call``, ``_ask_from_thread``, ``_resolver``, blobs'
    ``_blobs_done``; ``_transaction``, ``_txn`` and ``_tpc_cond`` set by its
    ``_setup``)."""

    _tpc_thread = None      # the thread whose transaction is _transaction

    def tpc_transaction(self):
        return self._transaction

    def tpc_begin(self, transaction, tid=None, status=" "):
        if self.isReadOnly():
            raise ReadOnlyError()
        if not self._client.is_connected:
            # Wait (up to wait_timeout) here, not at the vote: pieces stored
            # while disconnected would be lost and fail the transaction.
            self._call(self._client.when_connected)
        with self._tpc_cond:
            while True:
                if self._closed:     # close() wakes a thread waiting here
                    raise ClientDisconnected("this ClientStorage is closed")
                if self._transaction is None:
                    break
                if self._transaction is transaction:
                    raise StorageTransactionError(
                        "Duplicate tpc_begin calls for same transaction")
                if self._tpc_thread == threading.get_ident():
                    self._abandoned()
                    break
                self._tpc_cond.wait(30)
            txn = self._client.transaction(transaction, self._dispatch)
            txn.resolver = self._resolver
            txn.tid, txn.status = tid, _status(status)      # restore
            # All at once: a transaction half begun (a signal handler's
            # exception between two) would never end, tpc_abort finding
            # no _txn, and every later tpc_begin would wait for it.
            self._transaction, self._txn, self._tpc_thread = \
                transaction, txn, threading.get_ident()

    def _abandoned(self) -> None:
        """Under ``_tpc_cond``: this thread begins a transaction while its
        previous one never ended (an exception a signal handler raised cut
        its tpc_abort or tpc_finish short before it ended it; the thread
        would wait for itself): that one is aborted, on the server after
        what it sent, and forgotten."""
        txn = self._txn
        if txn is not None:
            self._reactor.callFromThread(txn.abort)
        self._blobs_done(None)
        self._transaction = self._txn = self._tpc_thread = None

    def _dispatch(self, f, *args):
        if in_reactor_thread(self._reactor):
            f(*args)
        else:
            self._reactor.callFromThread(f, *args)

    def _check_trans(self, transaction, method):
        if transaction is not self._transaction or self._txn is None:
            raise StorageTransactionError(
                "%s called with a transaction that is not being committed" % method)
        return self._txn

    def store(self, oid, serial, data, version, transaction):
        if self.isReadOnly():
            raise ReadOnlyError()
        if version:
            raise UsageError("versions are not supported")
        self._check_trans(transaction, "store").store(oid, serial, data)

    def checkCurrentSerialInTransaction(self, oid, serial, transaction):
        self._check_trans(transaction, "checkCurrentSerialInTransaction") \
            .check_current_serial(oid, serial)

    def tpc_vote(self, transaction):
        txn = self._check_trans(transaction, "tpc_vote")
        try:
            to_resolve = self._ask_from_thread(txn.vote_from_thread, txn.vote_once)
        except ConflictError as e:
            # Raised from this frame alone: the transaction package formats
            # the failed commit's traceback, at about 45 us a frame.
            raise e.with_traceback(None)
        if to_resolve:
            # Conflicts left to this client: resolved here, in the committing
            # thread, with the application's classes; the server holds the
            # commit lock until the second vote (or the abort ZODB sends
            # when the ConflictError propagates).
            self._call(txn.revote, txn.resolve(to_resolve))
        return txn.resolved

    def tpc_finish(self, transaction, f=None):
        txn = self._check_trans(transaction, "tpc_finish")
        tid = None
        try:
            tid = self._ask_from_thread(txn.finish_from_thread, txn.finish, f)
            return tid
        except BaseException:
            # Not finished here (a signal handler's exception, the wait's
            # timeout, an error): ZODB's tpc_abort after this finds no
            # transaction, so an Abort goes now, after the Finish if that
            # went (then it ends nothing), else the server's transaction
            # would hold the commit lock until its transaction-timeout.
            self._reactor.callFromThread(txn.abort)
            raise
        finally:
            try:
                self._blobs_done(tid)
            finally:        # also when an exception cuts that short
                self._end_transaction()

    def tpc_abort(self, transaction, timeout=None):
        if transaction is not self._transaction or self._txn is None:
            return
        try:
            if not self._txn.ended:     # else the server aborted it already
                self._call(self._txn.abort, timeout=timeout)
        except ClientDisconnected:
            pass    # the server aborts it when the link drops
        finally:
            try:
                self._blobs_done(None)
            finally:        # also when an exception cuts that short
                self._end_transaction()

    def _end_transaction(self):
        with self._tpc_cond:
            self._transaction = self._txn = self._tpc_thread = None
            self._tpc_cond.notify_all()
