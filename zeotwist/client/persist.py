"""Keep a client cache in a file across client restarts (ZEO's ``client=``).

:class:`CachePersister` locks the cache file (one process per file), loads
it into the in-memory :class:`~zeotwist.client.cache.ClientCache` before the
client connects (the server then verifies it: see ``Verify``), saves a
snapshot every ``interval`` seconds in a worker thread, and a last one when
the client closes.  A snapshot carries the cache's last tid taken together
with its revisions, so a file is never newer than the tid it claims.

``start``/``stop`` run on the reactor thread; ``save`` in any thread.
"""
import threading

from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from zeotwist.errors import ForeignCacheFile

_log = Logger()

DEFAULT_SAVE_INTERVAL = 60.0


class CachePersister:
    def __init__(self, cache, path: str, interval: float = DEFAULT_SAVE_INTERVAL):
        self.cache = cache
        self.path = path
        self.interval = interval
        from zeotwist.client.cachefile import CacheFile     # a client without one needs none
        self._file = CacheFile(path)
        self._file.open()       # CacheLockedError, ForeignCacheFile: raised to the caller
        self._lock = threading.Lock()
        self._loop = None
        self._closed = False
        loaded = self._file.load()
        if loaded is not None and loaded[0] is not None:
            cache.restore(*loaded)
            _log.info("zeotwist cache {path}: {n} revisions up to tid {tid}",
                      path=path, n=len(cache), tid=loaded[0].hex())

    def start(self, reactor) -> None:
        """Save every ``interval`` seconds (reactor thread)."""
        if self.interval and self._loop is None:
            self._loop = LoopingCall(
                lambda: deferToThreadPool(reactor, reactor.getThreadPool(), self._save_logged))
            self._loop.clock = reactor
            self._loop.start(self.interval, now=False).addErrback(
                lambda f: _log.failure("zeotwist cache saver stopped", f))

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def save(self) -> None:
        with self._lock:
            if self._closed:
                return
            last_tid, entries = self.cache.snapshot()
            if last_tid is not None:
                self._file.save(last_tid, entries)

    def _save_logged(self) -> None:
        try:
            self.save()
        except (OSError, ForeignCacheFile) as e:
            _log.warn("zeotwist could not save its cache to {path}: {e}", path=self.path, e=e)

    def close(self) -> None:
        """A last save, then release the file (any thread but the reactor's
        while a periodic save may run there)."""
        self._save_logged()
        with self._lock:
            if not self._closed:
                self._closed = True
                self._file.close()
