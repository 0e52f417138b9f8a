"""Several zeotwist servers over one RelStorage database (PostgreSQL).

PostgreSQL stores and serializes (RelStorage takes its commit lock there);
each server pushes to its own clients.  RelStorage reports no one's commits,
so :class:`RelStorageFeed` asks the database which transactions committed
after the server's ``last_tid`` and fans them out in tid order - the
server's own commits included, so both kinds come from one ordered source:

* a poll runs in the storage's worker thread, the thread that commits, so a
  poll and a commit never overtake each other: after ``tpc_finish(X)`` the
  next poll sees X and everything before it, and X's Finish answer goes to
  its client after the invalidations of earlier transactions and before
  those of later ones (:meth:`RelStorageFeed._apply`);
* history-preserving databases give each transaction's exact oids
  (``object_state`` keeps every revision); history-free ones keep only each
  object's current tid, so each announced transaction carries every oid
  changed in the polled window: a client may drop a cached revision early
  (and reload it), never keep a stale one;
* a poll is asked for after every own commit, on a PostgreSQL notification
  (a statement trigger on ``object_state`` that zeotwist installs calls
  ``pg_notify``; the server LISTENs on a connection watched by the reactor),
  and every ``poll_interval`` seconds (commits through plain RelStorage
  clients when the trigger could not be installed, lost notifications).

Each tick also ends the database transaction of every idle storage instance
(:meth:`PerThreadStorage.sweep`), so an idle server holds none open.

RelStorage resolves conflicts during its vote with its own resolver, which
unpickles with ZODB's unrestricted ``find_global``;
:func:`install_resolver_hook` routes it through the served storage's
``tryToResolveConflict`` (zeotwist's allow-list resolver, or the refusal of
``--client-conflict-resolution``) for the instances this server made.

Runs on the reactor thread, except ``_*_in_thread`` (the storage worker).
"""
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from ZODB.POSException import ConflictError, ReadConflictError
from ZODB.utils import p64, u64

from zeotwist.server.conflicts import RestrictedResolver
from zeotwist.server.external import DEFAULT_POLL_INTERVAL, Feed
from zeotwist.server.mvcc import COMMIT_METHODS, PerThreadStorage
from zeotwist.server.pgnotify import CHANNEL, Listener

_log = Logger()


def is_relstorage(storage) -> bool:
    return hasattr(storage, "_adapter") and hasattr(storage, "keep_history")


def translate_error(exc, method: str):
    """RelStorage's cache-consistency failure (a stale snapshot) as the
    retryable error ZODB applications handle: ConflictError in a commit,
    ReadConflictError in a read."""
    from relstorage.cache.interfaces import CacheConsistencyError
    if not isinstance(exc, CacheConsistencyError):
        return None
    cls = ConflictError if method in COMMIT_METHODS else ReadConflictError
    return cls("stale snapshot, retry the transaction: %s" % exc)


def per_thread(root) -> PerThreadStorage:
    """The root RelStorage served through one instance per thread."""
    install_resolver_hook()
    storage = PerThreadStorage(root, translate=translate_error)
    storage._prepare = lambda instance: setattr(instance, "_zeotwist_served_as", storage)
    return storage


# -- conflict resolution -----------------------------------------------------------

def install_resolver_hook() -> None:
    """Make RelStorage's vote resolve conflicts through the served
    storage's ``tryToResolveConflict`` (once per process).  Instances made
    elsewhere keep RelStorage's behaviour."""
    from relstorage.storage.tpc import vote
    base = vote._CachedConflictResolver
    if getattr(base, "_zeotwist_hook", False):
        return

    class ServedResolver(base):
        _zeotwist_hook = True

        def __init__(self, storage, old_states_and_tids):
            super().__init__(storage, old_states_and_tids)
            self._served_as = getattr(storage, "_zeotwist_served_as", None)

        def tryToResolveConflict(self, oid, committed, old, new, committed_data=b""):
            if self._served_as is None:
                return super().tryToResolveConflict(oid, committed, old, new, committed_data)
            resolve = getattr(self._served_as, "tryToResolveConflict", None)
            if resolve is None:          # fail closed: never the unrestricted unpickler
                raise ConflictError(oid=oid, serials=(committed, old))
            restricted = getattr(resolve, "__self__", None)
            if isinstance(restricted, RestrictedResolver):
                # the same allow-list, reading old states from what the vote fetched
                resolve = RestrictedResolver(self, restricted.allowed).resolve
            return resolve(oid, committed, old, new, committed_data)

    vote._CachedConflictResolver = ServedResolver


# -- which transactions committed after a tid -----------------------------------------

class Poller:
    """The database side of the feed: its own connection, opened lazily,
    never left inside a transaction.  Used only in the storage worker thread."""

    def __init__(self, root):
        self.connmanager = root._adapter.connmanager
        self.keep_history = root.keep_history
        self._conn = self._cursor = None

    def changes(self, after: bytes):
        """``(upto, rows)``: the last committed tid and ``(tid, oid)`` rows
        of the objects changed after ``after`` (up to ``upto`` when the
        database keeps history)."""
        cur = self._open()
        try:
            table = "transaction" if self.keep_history else "object_state"
            cur.execute("SELECT COALESCE(MAX(tid), 0) FROM %s" % table)
            upto = cur.fetchone()[0]
            rows = []
            if upto > u64(after) and self.keep_history:
                cur.execute("SELECT tid, zoid FROM object_state WHERE tid > %s AND tid <= %s",
                            (u64(after), upto))
                rows = cur.fetchall()
            elif upto > u64(after):
                cur.execute("SELECT tid, zoid FROM object_state WHERE tid > %s", (u64(after),))
                rows = cur.fetchall()
            self._conn.rollback()
        except Exception:
            self.close()
            raise
        return p64(upto), rows

    def notify(self) -> None:
        """NOTIFY the other servers (where no trigger does it for every commit)."""
        try:
            self._open().execute("NOTIFY %s" % CHANNEL)
            self._conn.commit()
        except Exception:
            self.close()           # they poll anyway

    def _open(self):
        if self._conn is None:
            self._conn, self._cursor = self.connmanager.open(
                isolation=self.connmanager.isolation_read_committed)
        return self._cursor

    def close(self) -> None:
        conn, self._conn, self._cursor = self._conn, None, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass


def batches(after: bytes, upto: bytes, rows, keep_history: bool, own) -> list:
    """The transactions to announce, oldest first: ``(tid, oids, exact)``.

    With history, one entry per transaction with its exact oids.  Without,
    each transaction the window shows (objects' current tids, the server's
    own commits ``own`` and ``upto``) carries every oid of the window.
    """
    by_tid: dict = {}
    for tid, zoid in rows:
        by_tid.setdefault(tid, []).append(p64(zoid))
    last = u64(upto)
    if keep_history:
        tids = sorted(set(by_tid) | {last})
        return [(p64(t), by_tid.get(t, []), True) for t in tids]
    every = sorted({oid for oids in by_tid.values() for oid in oids})
    points = {t for t in by_tid if t <= last} | {u64(t) for t in own if after < t <= upto}
    return [(p64(t), every, False) for t in sorted(points | {last})]


# -- the feed ----------------------------------------------------------------------

class RelStorageFeed(Feed):
    """Fans out every transaction of a RelStorage database, in tid order
    (see the module doc).  ``poll_interval`` seconds between polls when no
    notification comes; ``listen=False`` polls only."""

    others_write = True

    def __init__(self, server, storage: PerThreadStorage,
                 poll_interval: float = DEFAULT_POLL_INTERVAL, listen: bool = True):
        super().__init__(server)
        self.storage = storage
        self.poll_interval = poll_interval
        self.poller = Poller(storage.root)
        self.keep_history = storage.root.keep_history
        self._own: dict = {}            # tid -> (committer, Deferred)
        self._busy = self._wanted = False
        self._fresh: list = []          # Deferreds of fresh(), for the next poll
        self._failing = False
        self.listener = None
        #: whether to LISTEN for notifications (re-tried every tick)
        self.listen = listen and hasattr(self.reactor, "addReader")
        self.stats = dict(polls=0, notifications=0)
        if self.listen:
            self.listener = Listener.start(self.reactor, storage.root, self._notified)
        self._ticker = LoopingCall(self._tick)
        self._ticker.clock = self.reactor
        self._ticker.start(poll_interval, now=False)

    # -- asking for a poll ----------------------------------------------------------
    def own_commit(self, tid: bytes, oids: list, committer):
        """Our commit ``tid`` finished: a Deferred fired once it is announced,
        after every earlier transaction and before any later one."""
        if tid <= self.server.last_tid:      # a poll already announced it
            return None
        from twisted.internet.defer import Deferred
        d = Deferred()
        self._own[tid] = (committer, d, oids)
        if self.listener is not None and not self.listener.trigger:
            self.server.threads.in_order(self.poller.notify)    # no trigger: tell the others
        self.request_poll()
        return d

    def request_poll(self) -> None:
        self._wanted = True
        if not self._busy:
            self._start()

    def _notified(self) -> None:
        self.stats["notifications"] += 1
        self.request_poll()

    def _tick(self) -> None:
        self.storage.sweep()
        if self.listen and (self.listener is None or not self.listener.alive):
            self.listener = Listener.start(self.reactor, self.storage.root, self._notified,
                                           quiet=True)
        self.request_poll()

    def fresh(self):
        """A Deferred that fires once a poll begun after this call has been
        applied (at once while polls fail): what the server knows then
        includes every transaction committed before the call."""
        from twisted.internet.defer import Deferred, succeed
        if self._failing:
            return succeed(None)
        d = Deferred()
        self._fresh.append(d)
        self.request_poll()
        return d

    def _start(self) -> None:
        self._busy, self._wanted = True, False
        waiters, self._fresh = self._fresh, []
        after = self.server.last_tid
        d = self.server.threads.in_order(self.poller.changes, after)
        d.addCallbacks(self._polled, self._poll_failed, (after,))
        d.addBoth(self._poll_done, waiters)

    def _poll_done(self, _, waiters: list) -> None:
        self._busy = False
        for d in waiters:
            d.callback(None)
        if self._wanted or any(t > self.server.last_tid for t in self._own):
            if not self._failing:
                self._start()
                return
        waiters, self._fresh = self._fresh, []      # polls fail: answer with what we have
        for d in waiters:
            d.callback(None)

    def _poll_failed(self, failure) -> None:
        if not self._failing:
            _log.error("zeotwist: cannot poll storage {name!r} for new transactions: {err}; "
                       "retrying every {s} s", name=self.server.name,
                       err=failure.getErrorMessage(), s=self.poll_interval)
        self._failing = True

    # -- announcing ------------------------------------------------------------------
    def _polled(self, result, after: bytes) -> None:
        self.stats["polls"] += 1
        if self._failing:
            _log.info("zeotwist: polling storage {name!r} works again", name=self.server.name)
            self._failing = False
        upto, rows = result
        for tid, oids, exact in batches(after, upto, rows, self.keep_history, self._own):
            self._apply(tid, oids, exact)

    def _apply(self, tid: bytes, oids: list, exact: bool) -> None:
        server = self.server
        if tid <= server.last_tid:
            return
        own = self._own.pop(tid, None)
        committer = None
        if own is not None:
            oids = sorted(set(oids) | set(own[2]))
            committer = own[0] if exact else None
        self.storage.advance()          # no later read from an older snapshot
        server.fan_out(tid, oids, committer)
        self.advanced()
        if own is not None:
            own[1].callback(None)       # the committer's answer, before later tids
        for t in [t for t in self._own if t < tid]:     # never seen: already covered
            self._own.pop(t)[1].callback(None)

    def close(self) -> None:
        if self._ticker.running:
            self._ticker.stop()
        if self.listener is not None:
            self.listener.stop()
        for committer, d, _ in self._own.values():
            d.callback(None)
        self._own.clear()
        waiters, self._fresh = self._fresh, []
        for d in waiters:
            d.callback(None)
        super().close()
        self.server.threads.in_order(self.poller.close)
