"""ClientStorage methods for the storage API beyond load and commit:
history, undo, pack, iteration, restore, deleteObject, prefetch.

A mixin of :class:`~zeotwist.client.storage.ClientStorage`; every method
blocks the calling thread on a :class:`~zeotwist.client.client.Client` call
through ``self._call``, except :meth:`StorageAPIMixin.prefetch`, which only
sends.  Undo, restore and deleteObject add records to the transaction's
store stream; the server applies them at the vote, so an undo that cannot
be done raises ``UndoError`` from ``tpc_vote`` (as with ZEO), and the undone
oids come back from ``tpc_vote``.
"""
import time
import weakref
from collections import deque

import zope.interface
from ZODB import interfaces
from ZODB.BaseStorage import DataRecord, TransactionRecord, copy
from ZODB.POSException import ReadOnlyError, StorageError
from twisted.logger import Logger

from zeotwist.client.reactorthread import in_reactor_thread
from zeotwist.errors import UsageError

_log = Logger()

#: Undo log entries asked per request (the server answers at most 1000).
UNDO_LOG_PAGE = 1000


@zope.interface.implementer(interfaces.IPrefetchStorage)
class StorageAPIMixin:
    #: undo/undoLog/undoInfo go to the server (supportsUndo() reads it)
    _undo_implemented = True
    #: seconds ``pack`` waits for the server to finish packing
    pack_timeout = 24 * 3600.0

    # -- history, undo log ---------------------------------------------------------
    def history(self, oid, size=1):
        return self._call(self._client.history, oid, size)

    def getTid(self, oid):
        return self._call(self._client.get_tid, oid)

    def undoLog(self, first=0, last=-20, filter=None):
        """ZODB's undoLog; ``filter`` runs here, on the client (ZEO ignores
        it), on entries fetched from the server a page at a time."""
        if last < 0:
            last = first - last
        return self._undo_entries(first, last, filter)

    def undoInfo(self, first=0, last=-20, specification=None):
        if not specification:
            return self.undoLog(first, last)
        spec = list(specification.items())

        def matches(d):
            return all(d.get(k) == v for k, v in spec)
        return self.undoLog(first, last, matches)

    def _undo_entries(self, first, last, keep):
        """Entries ``first <= i < last`` of the undo log, counting only
        those ``keep`` accepts (all when ``keep`` is None)."""
        results, i = [], 0
        pos = first if keep is None else 0          # index in the server's log
        while (pos if keep is None else i) < last:
            end = min(last, pos + UNDO_LOG_PAGE) if keep is None else pos + UNDO_LOG_PAGE
            entries, complete = self._call(self._client.undo_log, pos, end)
            for d in entries:
                if keep is None:
                    results.append(d)
                elif keep(d):
                    if i >= first:
                        results.append(d)
                    i += 1
                    if i >= last:
                        return results
            pos += len(entries)
            if complete or not entries:
                break
        return results

    def undo(self, transaction_id, transaction):
        """Undo ``transaction_id`` in ``transaction``; returns None: the
        undone oids are returned by ``tpc_vote``."""
        if self.isReadOnly():
            raise ReadOnlyError()
        self._check_trans(transaction, "undo").undo(transaction_id)

    # -- pack ----------------------------------------------------------------------
    def pack(self, t=None, referencesf=None, gc=None, days=0, wait=True):
        """Pack the storage on the server as of ``t`` (default: now) less
        ``days`` days, and wait for the server to finish (up to
        :attr:`pack_timeout`; with ``wait=False``, as ZEO's, return at once
        and only log a failure).  ``referencesf`` is ignored: the server uses
        ZODB's.  ``gc=None`` keeps the server storage's GC setting.  A
        read-only client may pack only a server started with
        ``--allow-read-only-pack``."""
        if t is None:
            t = time.time()
        t -= days * 86400
        if wait:
            self._call(self._client.pack, t, gc, timeout=self.pack_timeout)
        elif not self._closed:
            self._reactor.callFromThread(_pack_in_background, self._client, t, gc)

    # -- iteration -----------------------------------------------------------------
    def iterator(self, start=None, stop=None):
        """The transactions from ``start`` to ``stop`` (inclusive), read from
        the server in batches.  ``close()`` it (or drop it) to release the
        server's iterator early."""
        return TransactionIterator(self, start, stop)

    def record_iternext(self, next=None):
        return self._call(self._client.record_iternext, next)

    def copyTransactionsFrom(self, other, verbose=0):
        """Copy every transaction of ``other`` here (with restore)."""
        if self.fshelper is not None:     # with a blob directory: blob files too
            import ZODB.blob
            return ZODB.blob.copyTransactionsFromTo(other, self)
        copy(other, self, verbose)

    # -- restore, deleteObject --------------------------------------------------------
    def restore(self, oid, serial, data, version, prev_txn, transaction):
        if self.isReadOnly():
            raise ReadOnlyError()
        if version:
            raise UsageError("versions are not supported")
        self._check_trans(transaction, "restore").restore(oid, serial, data, prev_txn)

    def deleteObject(self, oid, oldserial, transaction):
        if self.isReadOnly():
            raise ReadOnlyError()
        self._check_trans(transaction, "deleteObject").delete_object(oid, oldserial)

    # -- prefetch ----------------------------------------------------------------------
    def prefetch(self, oids, tid):
        """Start loading ``oids`` as of before ``tid`` into the cache, many
        per round trip (ZODB's ``Connection.prefetch``); does not wait.  A
        load of one of them made before the answer waits for it."""
        oids = list(oids)
        if not oids or self._closed:
            return
        if in_reactor_thread(self._reactor):
            _prefetch(self._client, oids, tid)
        else:
            self._reactor.callFromThread(_prefetch, self._client, oids, tid)


def _pack_in_background(client, t, gc):
    d = client.pack(t, gc)
    d.addErrback(lambda f: _log.failure("zeotwist pack failed", f))


def _prefetch(client, oids, tid):
    d = client.prefetch(oids, tid)
    d.addErrback(lambda f: _log.failure("zeotwist prefetch failed", f))


class TransactionIterator:
    """ZODB's storage iterator over a server-side one (IStorageIteration).

    Each transaction is read whole (its records kept in memory) before it is
    returned, so its records can be iterated any number of times.  The
    server's iterator is released when this one ends, is closed, or is
    garbage collected (and when the connection ends).
    """

    def __init__(self, storage, start=None, stop=None):
        self._storage = storage
        client = storage._client
        self._token = storage._call(client.iterator_start, start, stop)
        self._items: deque = deque()
        self._done = False
        self._release = weakref.finalize(
            self, _close_remote, storage._reactor, client, self._token)
        self._release.atexit = False

    def __iter__(self):
        return self

    def iterator(self):
        return self

    def __next__(self):
        header = self._next_item()
        if header is None:
            self.close()
            raise StopIteration
        if header["status"] is None:
            raise StorageError("iterator batch out of order: a record without its transaction")
        records = []
        while True:
            item = self._peek()
            if item is None or item["status"] is not None:
                break
            self._items.popleft()
            records.append(DataRecord(item["oid"], item["tid"], item["data"], item["data_txn"]))
        return _Transaction(header, records)

    def _peek(self):
        while not self._items and not self._done:
            items, done = self._storage._call(self._storage._client.iterator_next, self._token)
            self._items.extend(items)
            if done:
                self._done = True
                self._release.detach()      # the server dropped it already
        return self._items[0] if self._items else None

    def _next_item(self):
        item = self._peek()
        if item is not None:
            self._items.popleft()
        return item

    def close(self):
        self._items.clear()
        self._done = True
        self._release()


def _close_remote(reactor, client, token):
    if reactor.running:
        reactor.callFromThread(client.iterator_close, token)


class _Transaction(TransactionRecord):
    """One transaction from the iterator, with its records."""

    def __init__(self, header, records):
        TransactionRecord.__init__(self, header["tid"], header["status"], header["user"],
                                   header["description"], header["extension"])
        self._records = records

    def __iter__(self):
        return iter(self._records)
