"""Transactions committed by other writers, fed into a StorageServer.

A served storage may have writers besides this server: another zeotwist
server over the same RelStorage database, or the upstream server of a
ClientStorage this server serves (ZEO's "fan-out").  Their commits must
reach this server's clients exactly as its own do: ``last_tid`` advances,
each client gets the invalidations in tid order, and the recent-transactions
queue (cache verification) covers them.  A *feed* is the one place that
learns of them and calls :meth:`StorageServer.fan_out` in tid order.

* :class:`StorageDBFeed` is what the server passes to the storage's
  ``registerDB()``: the storage reports others' commits through
  ``invalidate(tid, oids)`` (a ClientStorage does, from its reactor thread)
  and a lost history through ``invalidateCache()``.  The server's own commits
  are fanned out when they finish, as for any storage; the storage's
  reports come after its own earlier reports, so both arrive in tid order.
* :class:`zeotwist.server.relstorage.RelStorageFeed` polls the database
  (RelStorage reports nothing) and is the only source of fan-out, own
  commits included.

Both offer :meth:`Feed.own_commit` (how the server's own commit is fanned
out) and :meth:`Feed.catch_up` (a client that knows a later transaction
than this server waits, bounded, for the server to learn of it: it never
goes back in time).  Runs on the reactor thread, except the ``registerDB``
callbacks, which may come from any thread.
"""
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from zeotwist.errors import UnsupportedStorage

_log = Logger()

#: Seconds a client that knows a later transaction waits for this server to
#: learn of it (Verify); past that, the server answers with what it has.
DEFAULT_CATCH_UP_TIMEOUT = 10.0
#: Seconds between two polls of a database with other writers (RelStorage).
DEFAULT_POLL_INTERVAL = 1.0


class Feed:
    """What the StorageServer asks of any feed; waiters for a tid."""

    catch_up_timeout = DEFAULT_CATCH_UP_TIMEOUT
    #: whether anyone else writes to the storage (else nothing to wait for)
    others_write = False

    def __init__(self, server):
        self.server = server
        self.reactor = server.reactor
        self._waiters: list = []        # (tid, Deferred, timer)

    def own_commit(self, tid: bytes, oids: list, committer):
        """The server committed ``tid``: fan it out (None) or a Deferred
        that fires once it (and every earlier transaction) is fanned out."""
        self.server.fan_out(tid, oids, committer)
        return None

    def request_poll(self) -> None:
        """Look for others' commits now, where the feed can (no-op here)."""

    def fresh(self) -> Deferred:
        """A Deferred that fires once the server knows of every transaction
        committed before this call, as far as the feed can tell (at once here:
        the storage reports others' commits by itself)."""
        return succeed(None)

    def catch_up(self, tid: bytes, timeout: float | None = None) -> Deferred:
        """A Deferred that fires (True) once the server's ``last_tid`` is at
        least ``tid``, or (False) after ``timeout`` seconds."""
        if self.server.last_tid >= tid or not self.others_write:
            return succeed(self.server.last_tid >= tid)
        d = Deferred()
        timeout = self.catch_up_timeout if timeout is None else timeout
        entry = [tid, d, None]
        entry[2] = self.reactor.callLater(timeout, self._expire, entry)
        self._waiters.append(entry)
        self.request_poll()
        return d

    def _expire(self, entry) -> None:
        if entry in self._waiters:
            self._waiters.remove(entry)
            entry[1].callback(False)

    def advanced(self) -> None:
        """``last_tid`` moved: fire the waiters it satisfies (reactor thread)."""
        last = self.server.last_tid
        ready = [e for e in self._waiters if e[0] <= last]
        for entry in ready:
            self._waiters.remove(entry)
            if entry[2].active():
                entry[2].cancel()
            entry[1].callback(True)

    def close(self) -> None:
        for entry in self._waiters:
            if entry[2].active():
                entry[2].cancel()
            entry[1].callback(False)
        self._waiters = []


class StorageDBFeed(Feed):
    """The object a storage gets from ``registerDB()`` (ZODB's IStorageDB
    shape): others' commits and cache resets, from any thread."""

    others_write = True

    def __init__(self, server, storage):
        super().__init__(server)
        storage.registerDB(self)

    # -- IStorageDB, called by the storage (any thread) --------------------------
    def invalidate(self, transaction_id: bytes, oids, version: str = "") -> None:
        self._on_reactor(self._external, transaction_id, list(oids))

    def invalidateCache(self) -> None:
        self._on_reactor(self._reset)

    def transform_record_data(self, data: bytes) -> bytes:
        return data

    def untransform_record_data(self, data: bytes) -> bytes:
        return data

    def references(self, record: bytes, oids=None):
        from ZODB.serialize import referencesf
        return referencesf(record, oids)

    # -- on the reactor thread ----------------------------------------------------
    def _on_reactor(self, f, *args) -> None:
        from zeotwist.client.reactorthread import in_reactor_thread
        if not hasattr(self.reactor, "callFromThread") or in_reactor_thread(self.reactor):
            f(*args)            # (a Clock in tests has no other thread)
        else:
            self.reactor.callFromThread(f, *args)

    def _external(self, tid: bytes, oids: list) -> None:
        server = self.server
        if tid <= server.last_tid:      # already fanned out (our own commit)
            return
        server.fan_out(tid, oids, None)
        self.advanced()

    def _reset(self) -> None:
        """The storage lost track of others' commits (its connection could
        not be verified): no client cache can be verified against this
        server's history any more, so every client is dropped and must
        verify again (ZEO's server does the same)."""
        server = self.server
        server.reset_history(server.storage.lastTransaction())
        _log.warn("zeotwist: storage {name!r} lost track of other writers' commits; "
                  "disconnecting its {n} clients so they verify their caches again",
                  name=server.name, n=len(server.sessions))
        for session in list(server.sessions):
            if session.transport is not None:
                session.transport.loseConnection()
        self.advanced()


def has_other_writers(storage) -> bool:
    """A client storage of another server (zeotwist's or ZEO's
    ClientStorage): others commit through that server."""
    return hasattr(storage, "registerDB") and hasattr(storage, "is_connected")


def served_storage(storage):
    """What the server uses as ``storage``: an IMVCCStorage is served through
    one instance per thread (:mod:`zeotwist.server.mvcc`), anything else as is."""
    from ZODB.interfaces import IMVCCStorage
    if not IMVCCStorage.providedBy(storage):
        return storage
    from zeotwist.server.relstorage import is_relstorage, per_thread
    if not is_relstorage(storage):
        raise UnsupportedStorage("zeotwist serves RelStorage among the IMVCC storages, not %r"
                                 % (storage,))
    return per_thread(storage)


def start_feed(server, storage, poll_interval: float = DEFAULT_POLL_INTERVAL) -> Feed:
    """The feed for the served ``storage`` (as :func:`served_storage` made it)."""
    from zeotwist.server.mvcc import PerThreadStorage
    if isinstance(storage, PerThreadStorage):
        from zeotwist.server.relstorage import RelStorageFeed
        return RelStorageFeed(server, storage, poll_interval)
    if has_other_writers(storage):
        return StorageDBFeed(server, storage)
    return Feed(server)
