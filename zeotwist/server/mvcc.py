"""Serving an IMVCCStorage (RelStorage): one storage instance per thread.

An IMVCCStorage such as RelStorage is a factory of instances that are not
thread-safe: each holds its own database connections and its own snapshot.
The server uses its storage from the reactor thread (loads), the storage's
worker thread (commits) and the reactor's thread pool (history, undo,
iteration, pack), so :class:`PerThreadStorage` stands where the server
expects one storage and gives each thread its own instance
(``new_instance()``), made on first use and released on :meth:`close`.

Snapshots.  An instance reads in the snapshot of its open database
transaction.  The server must never answer from a snapshot older than a
transaction it has already announced to clients, so the feed calls
:meth:`PerThreadStorage.advance` whenever ``last_tid`` moves; every instance
then starts its next call with ``sync()`` (a new snapshot).  An instance in
the middle of a commit (``tpc_begin`` .. ``tpc_finish``/``tpc_abort``) is
never synced.  :meth:`PerThreadStorage.sweep` ends the database transaction
of every instance idle at the time (item: no PostgreSQL transaction stays
open while the server is idle); the feed calls it once per poll interval.

Every method runs in the calling thread on that thread's instance, under the
instance's lock (taken without waiting by the sweep, from the reactor).
"""
import threading
import time

import zope.interface

#: The storage methods served through the calling thread's instance, where
#: the root storage has them (``hasattr`` on this object answers as on it).
METHODS = (
    "__len__", "getName", "getSize", "history", "isReadOnly", "lastTransaction",
    "load", "loadBefore", "loadSerial", "getTid", "new_oid", "pack", "sortKey",
    "store", "checkCurrentSerialInTransaction", "tpc_begin", "tpc_vote",
    "tpc_finish", "tpc_abort", "supportsUndo", "undo", "undoLog", "undoInfo",
    "iterator", "record_iternext", "restore", "deleteObject", "loadBlob",
    "openCommittedBlobFile", "storeBlob", "restoreBlob", "temporaryDirectory",
)
_TPC_START, _TPC_END = ("tpc_begin",), ("tpc_finish", "tpc_abort")
#: the methods of a commit (their errors reach the client through the vote)
COMMIT_METHODS = ("store", "tpc_begin", "tpc_vote", "tpc_finish", "tpc_abort",
           "checkCurrentSerialInTransaction", "undo", "restore", "deleteObject",
           "storeBlob", "restoreBlob")


class _Instance:
    """One thread's storage instance and what the sweep needs to know."""

    def __init__(self, storage, generation: int):
        self.storage = storage
        self.lock = threading.Lock()
        self.generation = generation
        self.in_tpc = False
        self.used = time.monotonic()


class PerThreadStorage:
    """One instance of ``root`` per calling thread (see the module doc).

    ``translate(exc, method)`` may return an exception to raise instead of
    ``exc`` (RelStorage's stale-snapshot errors become ConflictErrors);
    ``prepare(instance)`` is called on each new instance.
    """

    def __init__(self, root, translate=None, prepare=None):
        self.root = root
        self._translate = translate
        self._prepare = prepare
        self._local = threading.local()
        self._instances: list = []
        self._lock = threading.Lock()
        self._closed = False
        #: bumped by advance(): instances synced at an older one sync first
        self.generation = 0
        #: translated errors of reads (ReadConflictErrors; commits' conflicts
        #: are counted by the session that votes)
        self.read_conflicts = 0
        zope.interface.directlyProvides(self, zope.interface.providedBy(root))
        for name in METHODS:
            if hasattr(root, name) and name != "__len__":
                setattr(self, name, self._delegate(name))
        if hasattr(root, "tryToResolveConflict"):
            #: the server's conflict policy (zeotwist.server.conflicts installs
            #: it); the storage's own resolution is routed to it (relstorage.py)
            self.tryToResolveConflict = None

    def __len__(self) -> int:
        return self._call("__len__", (), {})

    def instance(self) -> _Instance:
        """The calling thread's instance, made on first use."""
        inst = getattr(self._local, "instance", None)
        if inst is None:
            if self._closed:
                from ZODB.POSException import StorageError
                raise StorageError("the storage is closed")
            storage = self.root.new_instance()
            if self._prepare is not None:
                self._prepare(storage)
            inst = self._local.instance = _Instance(storage, self.generation)
            with self._lock:
                self._instances.append(inst)
        return inst

    def _delegate(self, name: str):
        def call(*args, **kw):
            return self._call(name, args, kw)
        call.__name__ = name
        return call

    def _call(self, name: str, args, kw):
        inst = self.instance()
        with inst.lock:
            if inst.generation != self.generation and not inst.in_tpc:
                inst.storage.sync()
                inst.generation = self.generation
            if name in _TPC_START:
                inst.in_tpc = True
            try:
                return getattr(inst.storage, name)(*args, **kw)
            except Exception as e:
                if name in _TPC_START:
                    inst.in_tpc = False     # no transaction began: nothing to abort
                other = self._translate(e, name) if self._translate else None
                if other is not None:
                    if name not in COMMIT_METHODS:
                        self.read_conflicts += 1     # (any thread; an estimate under races)
                    raise other from e
                raise
            finally:
                if name in _TPC_END:
                    inst.in_tpc = False
                inst.used = time.monotonic()

    # -- snapshots ----------------------------------------------------------------
    def advance(self) -> None:
        """A later transaction was announced: every instance takes a new
        snapshot before its next call (any thread)."""
        self.generation += 1

    def sweep(self, idle: float = 0.0) -> int:
        """End the database transaction of each instance that is not
        committing and has not been used for ``idle`` seconds; returns how
        many were ended.  Never waits for a busy instance."""
        now, swept = time.monotonic(), 0
        with self._lock:
            instances = list(self._instances)
        for inst in instances:
            if inst.in_tpc or now - inst.used < idle or not inst.lock.acquire(False):
                continue
            try:
                if not inst.in_tpc:
                    inst.storage.sync()
                    inst.generation = self.generation
                    swept += 1
            except Exception:
                pass        # a dead connection: the next call reconnects
            finally:
                inst.lock.release()
        return swept

    # -- life ---------------------------------------------------------------------
    def instances(self) -> int:
        return len(self._instances)

    def close(self) -> None:
        """Release every instance, then close the root storage."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            instances, self._instances = self._instances, []
        for inst in instances:
            with inst.lock:
                try:
                    inst.storage.release()
                except Exception:
                    pass
        self.root.close()
