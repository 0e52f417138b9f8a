"""StorageServer: one per served storage.

It owns the storage, the commit lock, the thread that runs the storage's
commit calls, and the fan-out of invalidations to every connected session.
Commits are serialised by the :class:`CommitLock`; the storage's
``tpc_*``/``store`` calls run in one dedicated worker thread so the reactor
does not wait on a big transaction or a disk flush (a small transaction on
a local storage runs them on the reactor thread: :meth:`StorageServer.commit_call`),
while loads (short, page-cache reads) are served on the reactor thread.  Serving loads on the reactor thread is also what
keeps a load reply and an invalidation in order on each connection: a reply
computed before a commit's invalidation is always written before it.

Every transaction reaches the sessions through :meth:`StorageServer.fan_out`,
called by the storage's *feed* (:mod:`zeotwist.server.external`) in tid
order: its own commits, and those of other writers where the storage has
them (a RelStorage database shared by several servers, a ClientStorage of
another server; docs/scale-out.md).

Runs on the reactor thread, except the functions passed to ``threads``.
"""
import sys
import time

from twisted.logger import Logger
from ZODB.POSException import StorageError
from twisted.protocols import amp

from zeotwist.server.commitlock import DEFAULT_RETRY_WAIT, DEFAULT_TURN_AFTER, CommitLock
from zeotwist.server.conflicts import DEFAULT_ALLOWED, RestrictedResolver, refuse_resolution
from zeotwist.server.external import DEFAULT_POLL_INTERVAL, served_storage, start_feed
from zeotwist.server.invalidations import RecentInvalidations
from zeotwist.server.oids import OidRange, OidReservation, allocate, storage_counter
from zeotwist.server.stats import traffic_counters
from zeotwist.server.storagecalls import StorageThreads
from zeotwist.server.storagesafety import components, reads_extension
from zeotwist.server.unpickling import guard_zodb
from zeotwist.wire import commitframes
from zeotwist.wire.commands import Invalidate

_log = Logger()

DEFAULT_TRANSACTION_TIMEOUT = 60.0
DEFAULT_INVALIDATION_QUEUE_SIZE = 100
#: A commit whose store stream is at most this many bytes runs its storage
#: calls on the reactor thread, on a local storage (see StorageServer.commit_call).
DEFAULT_INLINE_COMMIT_BYTES = 64 * 1024
#: Reference prefetch: records and bytes at most per LoadBefore answer.
DEFAULT_PREFETCH_COUNT = 250
DEFAULT_PREFETCH_BYTES = 60_000


class StorageServer:
    def __init__(self, storage, name: str = "1", *, reactor, read_only: bool = False,
                 transaction_timeout: float | None = DEFAULT_TRANSACTION_TIMEOUT,
                 conflict_retry_wait: float = DEFAULT_RETRY_WAIT,
                 conflict_turn_after: float = DEFAULT_TURN_AFTER,
                 max_transaction_bytes: int = 2**31, threads=None,
                 invalidation_queue_size: int = DEFAULT_INVALIDATION_QUEUE_SIZE,
                 oid_reservation_path: str | None = "auto",
                 conflict_classes=(), client_conflict_resolution: bool = False,
                 poll_interval: float = DEFAULT_POLL_INTERVAL,
                 prefetch_count: int = DEFAULT_PREFETCH_COUNT,
                 prefetch_bytes: int = DEFAULT_PREFETCH_BYTES,
                 inline_commit_bytes: int = DEFAULT_INLINE_COMMIT_BYTES):
        storage = served_storage(storage)       # IMVCC: one instance per thread
        self.storage = storage
        #: small commits on the reactor thread: the store stream's bytes at
        #: most (0: never); only for storages local to this process
        self.inline_commit_bytes = inline_commit_bytes if local_storage(storage) else 0
        #: reference prefetch bounds per LoadBefore answer (0 records: off)
        self.prefetch_count, self.prefetch_bytes = prefetch_count, prefetch_bytes
        self.name = name
        self.read_only = read_only or storage.isReadOnly()
        self.reactor = reactor
        self.max_transaction_bytes = max_transaction_bytes
        self.sessions: set = set()
        #: sessions keeping an invalidation back for their vote's answer
        #: (output.send_frame), until the committer releases the lock
        self.kept_back: list = []
        self.lock = CommitLock(reactor, transaction_timeout, self._lock_timed_out,
                               conflict_retry_wait, conflict_turn_after)
        self.last_tid = storage.lastTransaction()
        #: ZODB storage interfaces the served storage provides, by name; the
        #: client declares exactly these (see OPTIONAL_INTERFACES)
        self.interfaces = provided_interfaces(storage)
        self.supports_undo = bool(getattr(storage, "supportsUndo", lambda: False)())
        self._oids = None
        if oid_reservation_path == "auto":     # beside a FileStorage's file
            name = getattr(storage, "_file_name", None)
            oid_reservation_path = name + ".oids" if isinstance(name, str) else None
        if oid_reservation_path is not None and not self.read_only:
            self._oids = OidReservation(storage, oid_reservation_path)
        #: the oids a client may store (none near the top of the oid space)
        self.oid_range = OidRange(max(storage_counter(storage),
                                      self._oids.mark if self._oids is not None else 0))
        #: conflicts are left to clients that resolve them (zeotwist.server.resolution)
        self.client_conflict_resolution = client_conflict_resolution
        guard_zodb()        # ZODB's ConflictError(data=) names a class without unpickling
        #: whether the storage may unpickle a transaction's extension (the
        #: vote then decodes it, restricted and bounded, before tpc_begin)
        self.reads_extension = reads_extension(storage)
        for part in components(storage):    # a DemoStorage's, a BlobStorage's too
            if not hasattr(part, "tryToResolveConflict"):
                continue
            if client_conflict_resolution:
                refuse_resolution(part)         # no client record unpickled at all
            else:       # never ZODB's unrestricted unpickler on client records
                RestrictedResolver(part, DEFAULT_ALLOWED + tuple(conflict_classes)).install()
        self.invalidations = RecentInvalidations(invalidation_queue_size)
        self.invalidations.fill_from(storage, self.last_tid)
        self.stats = dict(commits=0, aborts=0, conflicts=0, client_resolutions=0, loads=0)
        #: more counters for --metrics (zeotwist.server.metrics)
        self.traffic = traffic_counters()
        self.start_time = time.time()
        #: packs under way (zeotwist.server.pack.PackRun)
        self.packs: set = set()
        #: how storage calls leave the reactor thread (zeotwist.server.storagecalls);
        #: in-memory tests inject SynchronousCalls
        self.threads = threads or StorageThreads(reactor, "zeotwist-storage-%s" % self.name)
        #: where others' commits come from (zeotwist.server.external)
        self.feed = start_feed(self, storage, poll_interval)

    def new_oids(self, count: int) -> list:
        """``count`` fresh oids, never handed out before, even across a crash
        (when the server keeps an oid reservation file)."""
        try:
            if self._oids is not None:
                oids = self._oids.new_oids(count)
            else:
                oids = allocate(self.storage, count)
        except OverflowError:       # a storage written before oids were bounded
            raise StorageError("storage %r has no oids left: an oid near 2**64 was "
                               "stored in it" % self.name) from None
        self.oid_range.issued(oids)
        return oids

    # -- sessions ------------------------------------------------------------
    def register(self, session) -> None:
        self.sessions.add(session)

    def unregister(self, session) -> None:
        self.sessions.discard(session)
        self.lock.forget(session)

    def commit_call(self, f, txn, *args):
        """``f(storage, txn, *args)``, one of the commit's storage calls
        (:mod:`zeotwist.server.commit`), with the commit lock held; a Deferred.

        A small transaction (store stream and resolved records of at most
        ``inline_commit_bytes``, not a restore) on a storage local to this
        process runs it on the reactor thread when the worker is idle
        (``threads.inline_or_in_order``), as ZEO runs every storage call:
        two thread hand-offs fewer per call.  Its work is bounded by its
        size, except ``tpc_finish``'s fsync, which the thread seam times.
        Everything else goes to the storage's worker thread.
        """
        limit = self.inline_commit_bytes
        if limit and txn.tid is None and txn.buffer.size <= limit and (
                txn.fixes is None or txn.fixes.size <= limit):
            return self.threads.inline_or_in_order(f, self.storage, txn, *args)
        return self.threads.in_order(f, self.storage, txn, *args)

    def committed(self, tid: bytes, oids: list, committer):
        """Our transaction ``tid`` is durable: the feed fans it out in tid
        order among others' commits.  None once done, or a Deferred that
        fires when it is (the committer answers then).

        Called while ``committer`` still holds the commit lock, so the next
        transaction's invalidation can only be written after this one.
        """
        return self.feed.own_commit(tid, oids, committer)

    def fan_out(self, tid: bytes, oids: list, committer) -> None:
        """Transaction ``tid`` (ours or another writer's) is the newest:
        remember it and send its invalidations to every session but
        ``committer``.  Only feeds call this, in tid order."""
        self.last_tid = tid
        self.invalidations.append(tid, oids)
        self.stats["commits"] += 1
        others = []
        for session in self.sessions:
            prefetcher = getattr(session, "prefetcher", None)
            if prefetcher is not None:        # its copies are no longer current
                prefetcher.forget(oids)
            if session is not committer:
                others.append(session)
        if not others:
            return
        frame = commitframes.invalidate(tid, oids)
        if frame is None:           # over 64 KiB of oids: AMP's split form
            box = amp.AmpBox(Invalidate.makeArguments({"tid": tid, "oids": oids}, None))
            box[amp.COMMAND] = Invalidate.commandName
            frame = box.serialize()
        for session in others:      # (a session dropped meanwhile leaves the set)
            session.send_frame(frame)
            self.traffic["invalidations"] += 1
        if committer is None or self.lock.holder is not committer:
            self.send_kept_back()       # no release of the lock follows: now

    def send_kept_back(self) -> None:
        """The commit fanned out last is announced to its committer now
        (it released the lock; ``fan_out`` for others' commits): what
        sessions whose vote still waits for the lock kept back goes out
        first (the next holder's vote answer took its own along)."""
        kept, self.kept_back = self.kept_back, []
        for session in kept:
            session.send_later()

    def reset_history(self, tid: bytes) -> None:
        """Others' commits up to ``tid`` are unknown: no cache can be
        verified against older tids any more."""
        self.last_tid = max(self.last_tid, tid)
        self.invalidations.forget(self.last_tid)

    def verify(self, tid: bytes):
        """The Verify answer for a client whose cache is at ``tid``.  A
        client that knows a later transaction than this server (it was on
        another server) first waits, bounded, for this server to catch up."""
        if tid > self.last_tid:
            return self.feed.catch_up(tid).addCallback(lambda _: self._verify_now(tid))
        return self._verify_now(tid)

    def last_transaction(self):
        """The LastTransaction answer (a client's ``ping`` and, with
        ``server_sync``, every transaction's start): where others write
        through other servers, after a fresh look at the database, so a
        transaction begun after a commit anywhere returned sees it."""
        return self.feed.fresh().addCallback(lambda _: dict(tid=self.last_tid))

    def _verify_now(self, tid: bytes) -> dict:
        changed = None if tid > self.last_tid else self.invalidations.since(tid)
        return dict(last_tid=self.last_tid, complete=changed is not None,
                    oids=sorted(changed or ()))

    def _lock_timed_out(self, session) -> None:
        self.traffic["transaction_timeouts"] += 1
        session.transaction_timed_out()

    def info(self) -> dict:
        storage = self.storage
        stats = dict(self.stats)
        # reads refused for a stale snapshot (RelStorage), counted where they happen
        stats["conflicts"] += getattr(storage, "read_conflicts", 0)
        return dict(
            name=storage.getName(), size=int(storage.getSize()),
            length=len(storage), last_tid=self.last_tid,
            connections=len(self.sessions), waiting=self.lock.waiting(),
            start_time=self.start_time, **stats)

    def stop_packs(self):
        """Ask the packs under way to stop (at service stop, before
        :meth:`close`); a Deferred that fires once they have ended."""
        from twisted.internet.defer import gatherResults
        ended = [run.stop() for run in list(self.packs)]
        if ended:
            _log.info("zeotwist: stopping the pack of storage {name!r} before closing it (a "
                      "pack that already writes its packed copy is waited for)", name=self.name)
        return gatherResults(ended)

    def close(self) -> None:
        """Stop the feed and the worker thread, close the storage (at service stop)."""
        self.feed.close()
        self.threads.stop()
        self.storage.close()


#: Optional ZODB interfaces a client may mirror, when the served storage has them.
OPTIONAL_INTERFACES = (
    "IStorageUndoable", "IStorageIteration", "IStorageRestoreable",
    "IStorageCurrentRecordIteration", "IExternalGC", "IBlobStorage",
    "IBlobStorageRestoreable",
)


def local_storage(storage) -> bool:
    """Whether ``storage`` keeps its data in this process's files or memory
    (FileStorage, MappingStorage): no network round trip in its calls.
    ``ZODB.MappingStorage`` is looked for, not imported: a storage of a
    class whose module was never imported cannot exist (storagesafety)."""
    from ZODB.FileStorage import FileStorage
    mapping = sys.modules.get("ZODB.MappingStorage")
    return isinstance(storage, FileStorage) or (
        mapping is not None and isinstance(storage, mapping.MappingStorage))


def provided_interfaces(storage) -> list:
    from ZODB import interfaces
    return [name for name in OPTIONAL_INTERFACES
            if getattr(interfaces, name).providedBy(storage)]
