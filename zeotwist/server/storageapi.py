"""Responders for the storage API beyond load and commit: history, undo,
pack, iteration, restore, deleteObject, prefetch.

A mixin of :class:`~zeotwist.server.session.ServerSession` (it uses the
session's ``server``, ``read_only`` and transaction state).  Runs on the
reactor thread.  Short reads (``GetTid``, ``RecordIternext``, ``Prefetch``)
are served there, as loads are; anything that may read a lot
(``History``, ``UndoLog``, iterator batches) and ``Pack`` run in the
reactor's thread pool, *not* in the storage's worker thread, so a long pack
or a big undo log never holds up commits (FileStorage lets transactions
commit while it packs: its packer takes the storage's commit lock only to
copy the transactions that arrived meanwhile, at the end).

Undo, restore and deleteObject are records of the store stream
(:mod:`zeotwist.wire.records`), applied in the storage thread during the
vote (:mod:`zeotwist.server.commit`).

Transaction extensions are never unpickled here: history and undo log
entries are read as :mod:`zeotwist.server.history` reads them.
"""
import datetime
import time as _time
import itertools
from collections import OrderedDict

from twisted.logger import Logger
from twisted.protocols import amp
from ZODB.Connection import TransactionMetaData
from ZODB.POSException import (
    POSKeyError, ReadOnlyError, StorageError, StorageTransactionError, Unsupported)

from zeotwist.errors import PackFailed, PackStopped
from zeotwist.server.pack import PackRun, pack_storage
from zeotwist.server.history import history_entries, undo_log_entries
from zeotwist.wire import commands as C

_log = Logger()

#: Open iterators one session may hold; opening one more closes the least
#: recently used (a later IteratorNext on it fails with StorageError).
MAX_ITERATORS = 16
#: An iterator batch stops once it holds this many bytes of records ...
ITERATOR_BATCH_BYTES = 2**20
#: ... or this many items (transaction headers and records).
ITERATOR_BATCH_ITEMS = 2000
#: Undo log entries answered per UndoLog request (the client pages).
MAX_UNDO_LOG = 1000
#: History entries answered per History request.
MAX_HISTORY = 10000
#: Oids per Prefetch request, and the bytes of records one answer carries
#: (oids past that are left out; the client loads them one by one).
MAX_PREFETCH = 1000
PREFETCH_BYTES = 4 * 2**20
#: Transaction statuses a restoring client may give.
RESTORE_STATUSES = (" ", "p", "u")


class StorageAPIResponders(amp.CommandLocator):
    #: iid -> _ServerIterator, least recently used first (created lazily)
    _iterators = None
    _iterator_ids = None
    #: the server-wide IteratorTable (zeotwist.server.iterators), set by the
    #: factory; None: only the per-session cap applies
    iterator_table = None

    def connectionLost(self, reason):
        self._close_iterators()
        super().connectionLost(reason)

    # -- history and undo log ------------------------------------------------
    @C.History.responder
    def history(self, oid, size):
        size = max(0, min(size, MAX_HISTORY))
        d = self.server.threads.in_pool(history_entries, self.server.storage, oid, size)
        return d.addCallback(lambda entries: dict(entries=entries))

    @C.UndoLog.responder
    def undo_log(self, first, last):
        first = max(0, first)
        last = min(max(first, last), first + MAX_UNDO_LOG)
        d = self.server.threads.in_pool(undo_log_entries, self.server.storage, first, last)
        return d.addCallback(lambda r: dict(entries=r[0], complete=r[1]))

    @C.GetTid.responder
    def get_tid(self, oid):
        return dict(tid=self.server.storage.getTid(oid))

    # -- pack ------------------------------------------------------------------
    @C.Pack.responder
    def pack(self, time, gc):
        server = self.server
        if self.read_only and (not getattr(server, "allow_read_only_pack", False)
                               or self.access == "ro"):     # a read-only user never packs
            raise ReadOnlyError("read-only connections may not pack this server "
                                "(see its --allow-read-only-pack option)")
        started = _time.time()
        _log.info("zeotwist: pack of storage {name!r} started at {now}, removing history "
                  "before {t}", name=server.name, now=_iso(started), t=_iso(time))
        run = PackRun()
        server.packs.add(run)
        d = self.server.threads.in_pool(pack_storage, server.storage, time, gc, run)
        d.addCallbacks(lambda _: _log.info(
            "zeotwist: pack of storage {name!r} ended at {now} ({seconds:.1f} s)",
            name=server.name, now=_iso(_time.time()), seconds=_time.time() - started),
            self._pack_failed)
        d.addBoth(lambda result: server.packs.discard(run) or run.ended(result))
        return d.addCallback(lambda _: {})

    def _pack_failed(self, failure):
        """One log line and a PackFailed that says why (never an empty error)."""
        why = failure.value
        if isinstance(why, PackStopped):
            _log.info("zeotwist: pack of {name!r} stopped: {why}", name=self.server.name, why=why)
            raise why
        if not isinstance(why, PackFailed):
            why = PackFailed("%s: %s" % (type(why).__name__, why))
        _log.error("zeotwist: pack of {name!r} failed: {why}", name=self.server.name, why=why)
        raise why

    # -- iteration -------------------------------------------------------------
    @C.IteratorStart.responder
    def iterator_start(self, start, stop):
        storage = self.server.storage
        if not hasattr(storage, "iterator"):
            raise Unsupported("the storage cannot iterate")
        if self._iterators is None:
            self._iterators = OrderedDict()
            self._iterator_ids = itertools.count(1)
        iid = next(self._iterator_ids)
        table = self.iterator_table
        if table is not None:
            table.reserve(self, iid)        # server-wide cap, descriptor slot

        def opened(source):
            iterators = self._iterators
            if self.transport is None or iterators is None:    # gone meanwhile
                _ServerIterator(source).close()
                raise StorageError("connection closed")
            iterators[iid] = _ServerIterator(source)
            while len(iterators) > MAX_ITERATORS:
                self._drop_iterator(next(iter(iterators)))
            return dict(iid=iid)

        def failed(failure):
            if table is not None:
                table.discard(self, iid)
            return failure

        d = self.server.threads.in_pool(storage.iterator, start, stop)
        return d.addCallback(opened).addErrback(failed)

    @C.IteratorNext.responder
    def iterator_next(self, iid):
        it = (self._iterators or {}).get(iid)
        if it is None:
            raise StorageError("no iterator %d (finished, closed or expired)" % iid)
        if it.busy:
            raise StorageTransactionError("iterator %d is busy" % iid)
        self._iterators.move_to_end(iid)
        if self.iterator_table is not None:
            self.iterator_table.touch(self, iid)
        it.busy = True

        def done(result):
            it.busy = False
            if it.closing:                # closed while the batch was read
                it.close()
            items, finished = result
            if finished:
                self._drop_iterator(iid)
            return dict(items=items, done=finished)

        def failed(failure):
            it.busy = False
            self._drop_iterator(iid)
            return failure

        return self.server.threads.in_pool(it.batch).addCallbacks(done, failed)

    @C.IteratorClose.responder
    def iterator_close(self, iid):
        self._drop_iterator(iid)
        return {}

    def _drop_iterator(self, iid):
        it = (self._iterators or {}).pop(iid, None)
        if it is not None:
            it.close()
        if self.iterator_table is not None:
            self.iterator_table.discard(self, iid)

    close_iterator = _drop_iterator     # the IteratorTable's name for it

    def iterator_idle(self, iid) -> bool:
        """Whether iterator ``iid`` is open and not reading a batch."""
        it = (self._iterators or {}).get(iid)
        return it is not None and not it.busy

    def _close_iterators(self):
        iterators, self._iterators = self._iterators, None
        for iid, it in (iterators or {}).items():
            it.close()
            if self.iterator_table is not None:
                self.iterator_table.discard(self, iid)

    @C.RecordIternext.responder
    def record_iternext(self, next):
        storage = self.server.storage
        if not hasattr(storage, "record_iternext"):
            raise Unsupported("the storage has no record_iternext")
        oid, tid, data, next_oid = storage.record_iternext(next)
        return dict(oid=oid, tid=tid, data=data, next=next_oid)

    # -- prefetch ----------------------------------------------------------------
    @C.Prefetch.responder
    def prefetch(self, oids, tid):
        if len(oids) > MAX_PREFETCH:
            raise StorageError("at most %d oids per Prefetch" % MAX_PREFETCH)
        load_before = self.server.storage.loadBefore
        records, size = [], 0
        for oid in oids:
            try:
                r = load_before(oid, tid)
            except POSKeyError:
                continue                  # left out: the client loads it alone
            if r is None:
                records.append(dict(oid=oid))
                continue
            data, start, end = r
            records.append(dict(oid=oid, data=data, start=start, end=end))
            size += len(data)
            if size >= PREFETCH_BYTES:
                break
        self.server.stats["loads"] += len(records)
        return dict(records=records)



# -- transactions with an explicit tid (restore) ------------------------------

def begin_restore(storage, txn, last_tid: bytes) -> None:
    """The storage's tpc_begin for a transaction with an explicit tid or
    status (storage thread, commit lock held)."""
    tid, status = txn.tid, txn.status
    if status not in RESTORE_STATUSES:
        raise StorageTransactionError("invalid transaction status %r" % (status,))
    if tid is not None and tid <= last_tid:
        raise StorageTransactionError(
            "transaction id %s is not later than the last one, %s"
            % (tid.hex(), last_tid.hex()))
    storage.tpc_begin(txn.meta, tid, status)


# -- iterators -------------------------------------------------------------------

class _ServerIterator:
    """One client's storage iterator, read in batches in the thread pool.

    The transactions and their records are flattened into one sequence of
    items (a header, its records, the next header, ...), cut into batches by
    size, so a transaction may span batches.  ``busy`` is set while a batch
    is read; a close requested meanwhile (``closing``) happens after it.
    """

    def __init__(self, source):
        self.source = source
        self.items = _flatten(source)
        self.busy = False
        self.closing = False
        self.closed = False

    def batch(self):
        items, size = [], 0
        for item, n in self.items:
            items.append(item)
            size += n
            if size >= ITERATOR_BATCH_BYTES or len(items) >= ITERATOR_BATCH_ITEMS:
                return items, False
        return items, True

    def close(self):
        if self.busy:
            self.closing = True
            return
        if self.closed:
            return
        self.closed = True
        self.items.close()
        close = getattr(self.source, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                _log.failure("closing a storage iterator failed")


def _flatten(source):
    """``(item, size)`` pairs: each transaction header, then its records."""
    for txn in source:
        status = txn.status
        if isinstance(status, bytes):
            status = status.decode("ascii")
        header = dict(tid=txn.tid, status=status, user=txn.user,
                      description=txn.description, extension=_extension_bytes(txn))
        yield header, 64 + len(txn.user) + len(txn.description) + len(header["extension"])
        for rec in txn:
            data = rec.data
            yield (dict(tid=rec.tid, oid=rec.oid, data=data, data_txn=rec.data_txn),
                   48 + (len(data) if data is not None else 0))


def _extension_bytes(txn) -> bytes:
    """The transaction's extension as the pickle bytes IteratorNext sends.

    FileStorage's records carry them as ``extension_bytes``; the records of
    a MappingStorage (and of a DemoStorage's changes) have only the
    ``extension`` mapping, which for a storage served by zeotwist is the
    plain data decoded at vote: it is pickled again here.
    """
    ext = getattr(txn, "extension_bytes", None)
    if ext is None:
        ext = TransactionMetaData(extension=txn.extension or {}).extension_bytes
    return ext


def _iso(t: float) -> str:
    """A POSIX time as an ISO 8601 UTC text, to the second (log lines)."""
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(
        timespec="seconds")
