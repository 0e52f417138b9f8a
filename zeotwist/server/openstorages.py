"""Opening the served storages, each with its StorageServer.

A storage is given to :class:`~zeotwist.server.service.ServerService` as a
storage, a ZODB storage section (anything with ``open()``, such as
:class:`FileStorageFile`) or a callable (:func:`open_storage`).
:func:`open_servers` opens them all, checks each is audited
(zeotwist.server.storagesafety) and gives each a
:class:`~zeotwist.server.storageserver.StorageServer` configured from the
server's settings; one that cannot be opened closes those already open and
raises :class:`StorageOpenError`.

Runs on the reactor thread, or under twistd before the reactor runs
(``privilegedStartService``).
"""
import os

from twisted.logger import Logger

from zeotwist.errors import StorageOpenError, UsageError
from zeotwist.server.config import describe
from zeotwist.server.settings import ServerSettings
from zeotwist.server.storagesafety import check_audited
from zeotwist.server.storageserver import StorageServer

_log = Logger()


class FileStorageFile:
    """Opens a FileStorage at ``path`` (created if missing, unless read-only)."""

    def __init__(self, path: str, read_only: bool = False, **options):
        self.path = path
        self.read_only = read_only
        self.options = options

    def open(self):
        from ZODB.FileStorage import FileStorage
        create = not os.path.exists(self.path) and not self.read_only
        return FileStorage(self.path, read_only=self.read_only, create=create, **self.options)

    def describe(self) -> str:
        return "FileStorage %s" % self.path

    def __repr__(self):
        return "<FileStorageFile %s>" % self.path


def open_storage(opener):
    """A storage from a :meth:`ServerService.from_storages` value: a storage
    as is, a ZODB storage section (or anything with ``open()``) opened, or a
    callable called."""
    if hasattr(opener, "loadBefore"):
        return opener
    if hasattr(opener, "open"):
        return opener.open()
    if callable(opener):
        return opener()
    raise UsageError("cannot make a storage of %r: give a storage, a storage section "
                     "(anything with open()) or a callable" % (opener,))


def open_servers(storages: dict, settings: ServerSettings, reactor) -> dict:
    """``{name: StorageServer}`` for ``storages`` (name -> what opens it).

    If one cannot be opened, those already open are closed again, the
    cause is logged and :class:`StorageOpenError` raised.
    """
    _log.info("zeotwist {version} starting (ZODB {zodb}, Twisted {twisted}, "
              "Python {python})", **versions())
    opened = {}
    try:
        for name, opener in storages.items():
            opened[name] = _open_one(name, opener, settings, reactor)
    except StorageOpenError as e:
        for server in opened.values():
            server.close()
        _log.critical("zeotwist {err}; not starting", err=e)
        raise
    return opened


def _open_one(name: str, opener, s: ServerSettings, reactor) -> StorageServer:
    what = describe(opener)
    storage = None
    try:
        storage = open_storage(opener)
        check_audited(name, storage, s.allow_unaudited_storage)
        server = StorageServer(
            storage, name, reactor=reactor, read_only=s.read_only,
            transaction_timeout=s.transaction_timeout or None,
            conflict_retry_wait=s.conflict_retry_wait,
            conflict_turn_after=s.conflict_turn_after,
            max_transaction_bytes=s.max_transaction_bytes,
            invalidation_queue_size=s.invalidation_queue_size,
            conflict_classes=tuple(s.conflict_classes),
            client_conflict_resolution=s.client_conflict_resolution,
            poll_interval=s.poll_interval,
            prefetch_count=s.prefetch_count, prefetch_bytes=s.prefetch_bytes)
        server.allow_read_only_pack = s.allow_read_only_pack
        return server
    except Exception as e:
        if storage is not None and storage is not opener:
            try:
                storage.close()
            except Exception:
                pass
        raise StorageOpenError(name, what, e) from e


def versions() -> dict:
    """zeotwist's version and those of what it runs on (the start-up line)."""
    import platform

    from zeotwist.installed import version
    return dict(version=version("zeotwist"), zodb=version("ZODB"),
                twisted=version("Twisted"), python=platform.python_version())
