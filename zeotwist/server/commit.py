"""The storage side of one client transaction: its state and the storage
calls of the commit.

:class:`ServerTransaction` is what a session keeps of a client transaction
(the metadata, the spooled store stream, the state in
:mod:`~zeotwist.server.txnstate`'s table).  The functions below are the
commit's storage calls: :func:`vote` (``tpc_begin``, every record of the
store stream, ``tpc_vote``), :func:`revote` (after the client resolved the
conflicts :func:`vote` left to it, :mod:`zeotwist.server.resolution`),
:func:`finish` and :func:`abort`.  They run in
the storage's worker thread (``StorageThreads.in_order``), or for a small
transaction on the reactor thread (``StorageServer.commit_call``), while the
session holds the commit lock, so nothing else changes the storage meanwhile.

:data:`RECORD_HANDLERS` is the one registry of store-stream record kinds
(:mod:`zeotwist.wire.records`) and the function that applies each.
"""
from ZODB.Connection import TransactionMetaData
from ZODB.POSException import ConflictError, ReadConflictError, Unsupported
from ZODB.utils import maxtid

from zeotwist.errors import FinishFailed
from zeotwist.server.blobs import apply_blob, apply_restore_blob
from zeotwist.server.storageapi import begin_restore
from zeotwist.server.txnbuffer import TransactionBuffer
from zeotwist.server.txnstate import TxnState
from zeotwist.server.unpickling import decode_extension
from zeotwist.wire.prefetch import MAX_BYTES, record_size
from zeotwist.wire.records import (
    BLOB, CHECK, DELETE, RESTORE, RESTORE_BLOB, STORE, UNDO, decode_restore)


class ClientMetaData(TransactionMetaData):
    """A client's transaction metadata as the storage sees it.

    ``extension_bytes`` are the bytes the client sent, passed on untouched
    (FileStorage writes them as they are); ``extension``, for a storage that
    wants a dict, is decoded by the restricted, bounded unpickler
    (:func:`~zeotwist.server.unpickling.decode_extension`), never by ZODB's.
    """

    def __init__(self, user: bytes, description: bytes, extension: bytes):
        super().__init__(user, description, bytes(extension))
        self._decoded = None

    @property
    def extension(self) -> dict:
        if self._decoded is None:
            self._decoded = decode_extension(self.extension_bytes)  # PickleRefused
        return self._decoded

    @extension.setter
    def extension(self, value: dict) -> None:
        self._decoded = value


class ServerTransaction:
    """Server-side state of one client transaction (reactor thread, except
    where the storage calls below fill ``begun``, ``oids`` and ``undone``)."""

    def __init__(self, meta, buffer: TransactionBuffer, read_only: bool,
                 tid: bytes | None = None, status: str = " ", check_oid=None):
        self.meta = meta
        #: raises OidOutOfRange for an oid a client may not create (OidRange.check)
        self.check_oid = check_oid or _any_oid
        self.buffer = buffer
        self.read_only = read_only
        self.state = TxnState()
        self.tid, self.status = tid, status    # restore: explicit tid and status
        self.begun = False      # storage.tpc_begin was called (worker thread)
        self.oids: list = []                   # oids this transaction changes
        self.undone: list = []                 # oids undone in this transaction
        #: what tpc_finish raised after committing (the commit stands)
        self.finish_error: Exception | None = None
        #: the conflicts left to the client (a Resolution), if it resolves them
        self.resolution = None
        #: the client takes the current records of conflicting objects; the
        #: vote leaves them here, ``[(oid, data, start, None)]``
        self.send_current = False
        self.current: list = []
        self.fixes: TransactionBuffer | None = None   # the client's resolved records

    def close_buffers(self) -> None:
        self.buffer.close()
        if self.fixes is not None:
            self.fixes.close()


def _any_oid(oid: bytes) -> None:
    pass


# -- the commit's storage calls (storage or reactor thread, commit lock held) -----

def vote(storage, txn: ServerTransaction, last_tid: bytes,
         decode_extension: bool = False) -> tuple:
    """``(resolved, conflicts, to_resolve)``: tpc_begin, the records, then tpc_vote.

    ``conflicts`` lists ``oid + committed serial + serial`` per store that
    conflicted (the vote then stops short of tpc_vote; the caller aborts).
    With ``txn.resolution``, conflicting stores are left to the client
    instead: ``to_resolve`` lists them, the vote stops short of tpc_vote and
    the storage transaction stays begun for :func:`revote`.
    ``decode_extension``: the storage unpickles the extension (in tpc_finish,
    for MappingStorage), so decode it now: one it refuses fails the vote
    (PickleRefused) before the storage has begun anything, not tpc_finish.
    """
    if decode_extension:
        txn.meta.extension
    if txn.tid is None and txn.status == " ":
        storage.tpc_begin(txn.meta)
    else:
        begin_restore(storage, txn, last_tid)
    txn.begun = True
    conflicts, resolution = [], txn.resolution
    for kind, oid, serial, payload in txn.buffer.records(RECORD_HANDLERS):
        try:
            RECORD_HANDLERS[kind](storage, txn, oid, serial, payload)
        except ConflictError as e:
            if isinstance(e, ReadConflictError):
                raise
            committed = (e.serials or (None, None))[0] or b"\0" * 8
            if resolution is not None and kind == STORE and e.serials:
                resolution.add(storage, oid, serial, committed, payload)
            else:
                conflicts.append(oid + committed + serial)
    if conflicts:
        if txn.send_current:
            txn.current = current_records(storage, conflicts)
        return (), conflicts, ()
    if resolution:            # left to the client: it re-votes, the lock held
        return (), (), resolution.items()
    return _tpc_vote(storage, txn)


def current_records(storage, conflicts: list) -> list:
    """The current records ``[(oid, data, start, None)]`` of the objects in
    ``conflicts`` (``oid committed serial`` entries), at most
    ``prefetch.MAX_BYTES`` in all: what a client retrying the transaction
    will load.  Read with the commit lock held, so each is current until a
    later transaction, whose invalidation reaches the client after the answer."""
    out, size, seen = [], 0, set()
    for conflict in conflicts:
        oid = conflict[:8]
        if oid in seen:
            continue
        seen.add(oid)
        try:
            r = storage.loadBefore(oid, maxtid)
        except Exception:           # deleted, or a storage that cannot: none
            continue
        if r is None or r[2] is not None:
            continue
        size += record_size(r[0])
        if size > MAX_BYTES:
            break
        out.append((oid, r[0], r[1], None))
    return out


def revote(storage, txn: ServerTransaction) -> tuple:
    """Store the client's resolved records (exactly one per conflict left to
    it, else RemoteProtocolError), then tpc_vote; as :func:`vote` answers."""
    txn.resolution.apply(txn.fixes.records((STORE,)),
                         lambda oid, serial, data: apply_store(storage, txn, oid, serial, data))
    return _tpc_vote(storage, txn)


def _tpc_vote(storage, txn: ServerTransaction) -> tuple:
    resolved = storage.tpc_vote(txn.meta) or ()
    return (list(resolved) + txn.undone if txn.undone else resolved), (), ()


def finish(storage, txn: ServerTransaction) -> bytes:
    """tpc_finish; the new transaction's tid.

    If tpc_finish raises, the storage is asked whether the transaction is
    committed anyway (it called back with the tid and reports it as its
    last transaction): then the tid is returned and ``txn.finish_error``
    keeps the error, else FinishFailed says it is not committed.  Either
    way tpc_abort is called, so a storage that raised half-way releases its
    own commit lock (MappingStorage does; see docs/security.md).
    """
    tids = []
    try:
        storage.tpc_finish(txn.meta, tids.append)
    except Exception as e:
        committed = bool(tids) and _last_transaction(storage) == tids[0]
        _release(storage, txn)
        if not committed:
            raise FinishFailed("tpc_finish failed; the transaction was not committed: "
                               "%s: %s" % (type(e).__name__, e)) from e
        txn.finish_error = e
    txn.close_buffers()
    return tids[0]


def _last_transaction(storage):
    try:
        return storage.lastTransaction()
    except Exception:            # closed by its own failure (FileStorage)
        return None


def _release(storage, txn: ServerTransaction) -> None:
    """tpc_abort after a failed tpc_finish, so the storage lets go of its lock."""
    txn.begun = False            # the abort path must not call it again
    try:
        storage.tpc_abort(txn.meta)
    except Exception:
        pass


def abort(storage, txn: ServerTransaction) -> None:
    """tpc_abort if the storage began the transaction; drop its buffer."""
    try:
        if txn.begun:
            storage.tpc_abort(txn.meta)
    finally:
        txn.close_buffers()


# -- the store stream's records ---------------------------------------------------

def _storage_method(storage, name):
    method = getattr(storage, name, None)
    if method is None:
        raise Unsupported("the storage has no %s" % name)
    return method


def apply_store(storage, txn, oid, serial, data):
    txn.check_oid(oid)
    storage.store(oid, serial, data, "", txn.meta)
    txn.oids.append(oid)


def apply_check(storage, txn, oid, serial, payload):
    storage.checkCurrentSerialInTransaction(oid, serial, txn.meta)


def apply_undo(storage, txn, oid, serial, payload):
    result = _storage_method(storage, "undo")(payload, txn.meta)
    if result:
        oids = list(result[1])
        txn.oids.extend(oids)
        txn.undone.extend(oids)


def apply_restore(storage, txn, oid, serial, payload):
    data, prev_txn = decode_restore(payload)
    txn.check_oid(oid)
    _storage_method(storage, "restore")(oid, serial, data, "", prev_txn, txn.meta)
    txn.oids.append(oid)


def apply_delete(storage, txn, oid, serial, payload):
    _storage_method(storage, "deleteObject")(oid, serial, txn.meta)
    txn.oids.append(oid)


#: record kind -> handler(storage, txn, oid, serial, payload): every kind a
#: store stream may carry.  A kind not here is a protocol violation.
RECORD_HANDLERS = {
    STORE: apply_store,
    CHECK: apply_check,
    UNDO: apply_undo,
    RESTORE: apply_restore,
    DELETE: apply_delete,
    BLOB: apply_blob,
    RESTORE_BLOB: apply_restore_blob,
}
