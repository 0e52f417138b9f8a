"""The client's blob cache directory (``ClientStorage(blob_dir=...)``).

Layout (``zeotwist-cache``, written to the directory's ``.layout`` marker):
256 directories named by the oid's low byte in hex, each holding committed
blob files named ``<oid hex>-<tid hex>.blob`` (read-only), a ``.lock`` file,
and the partial files of downloads (``*.dl``) and of this client's uploads
(``*.upload``); ``tmp/`` is the storage's ``temporaryDirectory()``.

Several threads and processes may share one cache directory: a file is
only downloaded or moved in while holding its directory's lock file
(``flock``, so threads of one process exclude each other too), and the
eviction skips directories that are locked.

Size bound (``blob_cache_size``): after every ``check`` bytes (default 10 %
of the size) added, the least recently used files (by access time, which
every lookup sets) are removed until the cache holds at most ``size -
check`` bytes.  A file just handed out is never removed by the eviction its
own arrival triggered, so one blob larger than the whole cache still works.

Runs in the threads that call the storage (never the reactor's).
"""
import itertools
import os
import re
import tempfile
import threading
import time
from contextlib import contextmanager

import ZODB.blob
import zc.lockfile
from ZODB.utils import u64

from zeotwist.errors import BlobCacheLocked

LAYOUT = "zeotwist-cache"
_BUCKET = re.compile(r"[0-9a-f]{2}")


class CacheLayout:
    """ZODB blob-directory layout of the cache (see the module docstring)."""

    def oid_to_path(self, oid: bytes) -> str:
        return "%02x" % (u64(oid) & 0xFF)

    def path_to_oid(self, path: str) -> bytes:
        raise ValueError("the blob cache layout does not map directories to oids")

    def getBlobFilePath(self, oid: bytes, tid: bytes) -> str:
        return os.path.join(self.oid_to_path(oid),
                            "%s-%s%s" % (oid.hex(), tid.hex(), ZODB.blob.BLOB_SUFFIX))


ZODB.blob.LAYOUTS.setdefault(LAYOUT, CacheLayout())


# BlobCacheLocked lives in zeotwist.errors; imported here, where it always was.

def lock_file(path: str, timeout: float | None):
    """Acquire the lock file ``path``; wait up to ``timeout`` seconds (None:
    do not wait and return None if it is held)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.001
    while True:
        try:
            return zc.lockfile.SimpleLockFile(path)
        except zc.lockfile.LockError:
            if deadline is None:
                return None
            if time.monotonic() >= deadline:
                raise BlobCacheLocked("%s stayed locked for %g s" % (path, timeout))
            time.sleep(delay)            # polling the holder's release, bounded above
            delay = min(delay * 2, 0.05)


#: numbers the upload files of this process (``next`` is atomic in CPython)
_uploads = itertools.count()
#: set per process: a forked child's names differ from its parent's
_process = None


def upload_name(oid: bytes) -> str:
    """A file name for an upload of ``oid`` that no other thread or process
    sharing the cache directory uses: the process id, a token drawn once per
    process, and a count."""
    global _process
    pid = os.getpid()
    if _process is None or _process[0] != pid:
        _process = (pid, os.urandom(4).hex())
    return "%s-%d-%s-%d.upload" % (oid.hex(), pid, _process[1], next(_uploads))


class BlobCache:
    """A blob cache directory, bounded by ``size`` bytes when it is given."""

    def __init__(self, directory: str, size: int | None = None, check_percent: int = 10,
                 lock_timeout: float = 300.0):
        self.fshelper = ZODB.blob.FilesystemHelper(os.path.abspath(directory), LAYOUT)
        self.fshelper.create()
        self.directory = self.fshelper.base_dir
        self.size = size
        self.check_bytes = None
        if size is not None:
            if not 0 < check_percent < 100:
                raise ValueError("blob_cache_size_check must be a percentage (1-99)")
            self.check_bytes = max(size * check_percent // 100, 1)
        self.lock_timeout = lock_timeout
        self._added = 0
        self._count_lock = threading.Lock()

    @property
    def temp_dir(self) -> str:
        return self.fshelper.temp_dir

    def path(self, oid: bytes, serial: bytes) -> str:
        """Where blob (``oid``, ``serial``) is kept when it is cached."""
        return self.fshelper.getBlobFilename(oid, serial)

    def lookup(self, oid: bytes, serial: bytes) -> str | None:
        """The cached file of the blob (marked as just used), or None."""
        path = self.path(oid, serial)
        try:
            os.utime(path, (time.time(), os.stat(path).st_mtime))
        except FileNotFoundError:
            return None
        except OSError:             # e.g. another user's file: still usable
            if not os.path.exists(path):
                return None
        return path

    @contextmanager
    def locked(self, oid: bytes):
        """Hold the lock of ``oid``'s directory (threads and processes)."""
        directory = self.fshelper.getPathForOID(oid, create=True)
        lock = lock_file(os.path.join(directory, ".lock"), self.lock_timeout)
        try:
            yield
        finally:
            lock.close()

    def new_file(self, oid: bytes, suffix: str):
        """``(file, path)``: a new private file in ``oid``'s directory."""
        directory = self.fshelper.getPathForOID(oid, create=True)
        fd, path = tempfile.mkstemp(prefix="%s-" % oid.hex(), suffix=suffix, dir=directory)
        return os.fdopen(fd, "wb"), path

    def take_over(self, oid: bytes, filename: str) -> str:
        """Take the caller's blob file over; the name it has now is returned.

        A file in ``tmp/`` (where ZODB's ``Blob.consumeFile`` and new blobs
        put theirs, under unique names) stays there: moving it next to the
        cached blob cost a placeholder file's creation per blob, 0.4 ms of
        about 2.4 (docs/performance.md, "Small blobs").  Another file is
        moved (or copied) next to where the committed blob will be cached,
        under a name unique to this process (:func:`upload_name`) rather
        than over a placeholder file made for it: a rename creates no
        inode, the placeholder did (docs/performance.md, "Small blobs: a
        store's costs per blob").
        """
        if os.path.dirname(os.path.abspath(filename)) == os.path.abspath(self.temp_dir):
            return filename
        directory = self.fshelper.getPathForOID(oid, create=True)
        path = os.path.join(directory, upload_name(oid))
        ZODB.blob.rename_or_copy_blob(filename, path, chmod=False)
        return path

    def add(self, oid: bytes, serial: bytes, path: str) -> str:
        """Make the complete file ``path`` the cached blob (``oid``,
        ``serial``), read-only; call with ``oid`` locked.  Its cache path."""
        target = self.path(oid, serial)
        ZODB.blob.set_not_writable(path)
        os.replace(path, target)
        return target

    # -- size bound ----------------------------------------------------------------
    def added(self, nbytes: int, keep: str | None = None) -> None:
        """Count ``nbytes`` just added; evict when enough arrived since the
        last check.  ``keep`` (the file just handed out) is spared."""
        if self.size is None:
            return
        with self._count_lock:
            self._added += nbytes
            if self._added < self.check_bytes:
                return
            self._added = 0
        self.evict(max(self.size - self.check_bytes, 0), keep)

    def evict(self, target: int, keep: str | None = None) -> int | None:
        """Remove least recently used blob files until at most ``target``
        bytes remain, sparing ``keep`` and locked directories.  The bytes
        left, or None if another thread or process is evicting."""
        lock = lock_file(os.path.join(self.directory, ".evict.lock"), None)
        if lock is None:
            return None
        try:
            files, total = self._scan()
            if total <= target:
                return total
            keep = keep and os.path.normpath(keep)
            for atime, size, path in sorted(files):
                if total <= target:
                    break
                if path == keep:
                    continue
                if self._remove(path):
                    total -= size
            return total
        finally:
            lock.close()

    def _scan(self):
        files, total = [], 0
        suffix = ZODB.blob.BLOB_SUFFIX
        with os.scandir(self.directory) as buckets:
            for bucket in buckets:
                if not (_BUCKET.fullmatch(bucket.name) and bucket.is_dir()):
                    continue
                with os.scandir(bucket.path) as entries:
                    for entry in entries:
                        if not entry.name.endswith(suffix):
                            continue
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        files.append((st.st_atime, st.st_size, os.path.normpath(entry.path)))
                        total += st.st_size
        return files, total

    def _remove(self, path: str) -> bool:
        """Remove a cached file unless its directory is locked (in use)."""
        lock = lock_file(os.path.join(os.path.dirname(path), ".lock"), None)
        if lock is None:
            return False
        try:
            ZODB.blob.remove_committed(path)
        except FileNotFoundError:
            pass
        finally:
            lock.close()
        return True

    def total(self) -> int:
        """Bytes of blob files in the cache now."""
        return self._scan()[1]
