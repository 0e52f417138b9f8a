"""The persistent client cache file (ZEO's ``client='NAME'``, ``var='DIR'``).

One file per client name and storage, ``<var or cwd>/<client>-<storage>.ztc``
(our own name: ZEO's ``.zec`` file, in a format of its own, may sit beside
it in the same ``var`` folder), holding a :meth:`ClientCache.snapshot
<zeotwist.client.cache.ClientCache.snapshot>`.  Plain blocking file I/O: call
it from the thread that starts or stops the client, not from the reactor
thread while it serves requests.

Layout, big-endian::

    header   b"ZTC1"  version:u16  has_last_tid:u8  last_tid:8 (zeros if None)
    record   tag:1 (b"c" current, b"n" non-current)  oid:8  start:8
             end:8 (zeros if current)  length:u32  data:length
             ... one per revision, least recently used first
    trailer  b"E"  count:u64  sha256:32 (digest of every byte before it)

The cache's own ``last_tid`` is written with the data it covers.  A file is
trusted whole or not at all: a missing trailer (a torn write), a wrong
digest, count or version makes :meth:`CacheFile.load` log one warning,
delete the file and return None.  Only our own files are ever deleted or
replaced: a file that does not begin with ``ZTC`` (a ZEO cache file, anything
else) is refused by :meth:`CacheFile.open` with
:class:`~zeotwist.errors.ForeignCacheFile`, and left alone by ``load`` and
``save`` should it appear later.  :meth:`CacheFile.save` writes
``<path>.tmp``, fsyncs it, renames it over the file and fsyncs the directory,
so a crash at any point leaves the previous file in place.
"""
import os
import struct
from contextlib import suppress

import zc.lockfile
from twisted.logger import Logger

from zeotwist.errors import CacheLockedError, ForeignCacheFile, WrongStateError

__all__ = ["MAGIC", "VERSION", "cache_path", "CacheFile"]

MAGIC = b"ZTC1"
VERSION = 1
#: What every zeotwist cache file begins with, whatever its version.
OURS = MAGIC[:3]
SUFFIX = ".ztc"

_HEADER = struct.Struct(">4sHB8s")
_RECORD = struct.Struct(">c8s8s8sI")
_TRAILER = struct.Struct(">cQ")
_DIGEST_SIZE = 32
_Z8 = bytes(8)
_CHUNK = 1 << 20        # bytes per read/write/hash call

_log = Logger()


def cache_path(client: str, var: str | None, storage: str) -> str:
    """The cache file of client ``client`` for storage ``storage``: ZEO's
    ``<client>-<storage>`` with our own suffix, so the two never meet."""
    return os.path.join(var or os.getcwd(), f"{client}-{storage}{SUFFIX}")


def foreign_start(path: str) -> bytes | None:
    """The first bytes of the file at ``path`` if it is not a zeotwist cache
    file; None if it is ours (see :func:`_ours`) or missing."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(OURS))
    except FileNotFoundError:
        return None
    return None if _ours(head) else head


def _ours(head: bytes) -> bool:
    """A file beginning with ``head`` may be ours: ``ZTC``, or a file too
    short to say (a few bytes, nothing anyone could lose)."""
    return OURS.startswith(head)


class _Untrusted(Exception):
    """Why a cache file's content cannot be used (internal to this module)."""


class CacheFile:
    """The cache file at ``path``; :meth:`open` it before :meth:`load`/:meth:`save`.

    Usable as a context manager (``with CacheFile(p) as f:``).
    """

    def __init__(self, path: str):
        self.path = path
        self._tmp = path + ".tmp"
        self._lock: zc.lockfile.LockFile | None = None

    def open(self) -> "CacheFile":
        """Lock the file for this client.

        :raises CacheLockedError: another client (process or opener) has it.
        :raises OSError: the folder (created if missing, as ZEO's ``var``)
            cannot be made or written.
        """
        if self._lock is None:
            self._refuse_foreign()      # before the lock: nothing made beside it
            folder = os.path.dirname(self.path)
            if folder:
                os.makedirs(folder, exist_ok=True)
            try:
                self._lock = zc.lockfile.LockFile(self.path + ".lock")
            except zc.lockfile.LockError:
                raise CacheLockedError(
                    f"client cache file {self.path} is in use by another client") from None
            # With the lock held nobody else saves: a temporary file is
            # what a crash in the middle of a save left behind.
            with suppress(FileNotFoundError):
                os.unlink(self._tmp)
        return self

    def _refuse_foreign(self) -> None:
        """ForeignCacheFile if the file exists and is not ours (OSError if
        it cannot be read)."""
        head = foreign_start(self.path)
        if head is not None:
            raise ForeignCacheFile(
                f"{self.path} is not a zeotwist cache file (it begins with {head!r}"
                f"{', a ZEO cache file' if head == b'ZEC' else ''}); zeotwist will not "
                f"overwrite it: give the client another name or cache_path")

    def close(self) -> None:
        """Release the lock (the file itself stays)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> "CacheFile":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._lock is None:
            raise WrongStateError(f"client cache file {self.path} is not open")

    def load(self):
        """``(last_tid, [(oid, start, end, data), ...])`` in LRU order, or None.

        None when there is no file, and when the file cannot be trusted: then
        one warning is logged and the file is deleted, if it is ours; a file
        that is not ours is left alone.  Never raises for bad content.
        """
        self._check_open()
        try:
            with open(self.path, "rb") as f:
                if not _ours(f.read(len(OURS))):
                    _log.warn("ignoring {path}: not a zeotwist cache file; leaving it alone",
                              path=self.path)
                    return None
                f.seek(0)
                return _read(f)
        except FileNotFoundError:
            return None
        except _Untrusted as e:
            _log.warn("ignoring client cache file {path}: {reason}; starting empty",
                      path=self.path, reason=str(e))
            with suppress(OSError):
                os.unlink(self.path)
        except OSError as e:
            _log.warn("ignoring client cache file {path}: cannot read it ({reason}); "
                      "starting empty", path=self.path, reason=str(e))
        return None

    def save(self, last_tid: bytes | None, entries) -> None:
        """Replace the file atomically with ``entries`` (iterable, LRU order).

        :raises OSError: writing failed; the previous file is unchanged.
        :raises ForeignCacheFile: the file there now is not ours (untouched).
        """
        self._check_open()
        self._refuse_foreign()
        try:
            with self._open_temp() as f:
                _write(f, last_tid, entries)
                f.flush()
                os.fsync(f.fileno())
            os.replace(self._tmp, self.path)
        except BaseException:
            with suppress(OSError):
                os.unlink(self._tmp)
            raise
        _fsync_directory(os.path.dirname(os.path.abspath(self.path)))

    def _open_temp(self):
        # A seam: tests replace it with a file that fails part way through.
        return open(self._tmp, "wb")


def _fsync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable (POSIX; a no-op elsewhere)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256():
    """A SHA-256 digest; ``hashlib`` is imported here, when a cache file is
    written or read: its import sets up OpenSSL's digests, 0.6 MB of every
    client process otherwise (docs/performance.md, "Memory")."""
    import hashlib
    return hashlib.sha256()


def _write(f, last_tid: bytes | None, entries) -> None:
    digest = _sha256()
    buf = bytearray(_HEADER.pack(MAGIC, VERSION, last_tid is not None, last_tid or _Z8))
    pack = _RECORD.pack
    count = 0
    for oid, start, end, data in entries:
        if end is None:
            buf += pack(b"c", oid, start, _Z8, len(data))
        else:
            buf += pack(b"n", oid, start, end, len(data))
        buf += data
        count += 1
        if len(buf) >= _CHUNK:
            digest.update(buf)
            f.write(buf)
            buf.clear()
    buf += _TRAILER.pack(b"E", count)
    digest.update(buf)
    f.write(buf)
    f.write(digest.digest())


class _Reader:
    """Reads the digested part of a file in chunks, hashing what it reads."""

    def __init__(self, f, length: int):
        self._f = f
        self.left = length          # digested bytes not read yet
        self.base = 0               # file offset of the current buffer's start
        self.digest = _sha256()

    def refill(self, buf: bytes, pos: int, need: int) -> tuple[bytes, int]:
        """``buf[pos:]`` extended to at least ``need`` bytes where the file has them."""
        keep = buf[pos:]
        self.base += pos
        want = min(self.left, max(_CHUNK, need - len(keep)))
        chunk = self._f.read(want)
        if len(chunk) != want:
            raise _Untrusted("the file changed while being read")
        self.digest.update(chunk)
        self.left -= want
        return keep + chunk, 0


def _read(f):
    size = os.fstat(f.fileno()).st_size
    if size < _HEADER.size + _TRAILER.size + _DIGEST_SIZE:
        raise _Untrusted(f"truncated ({size} bytes)")
    reader = _Reader(f, size - _DIGEST_SIZE)
    buf, pos = reader.refill(b"", 0, _HEADER.size)
    magic, version, has_tid, last_tid = _HEADER.unpack_from(buf, pos)
    if magic != MAGIC:
        raise _Untrusted(f"not a zeotwist cache file (magic {magic!r})")
    if version != VERSION:
        raise _Untrusted(f"unsupported format version {version} (expected {VERSION})")
    if has_tid > 1 or (not has_tid and last_tid != _Z8):
        raise _Untrusted("corrupt header")
    pos += _HEADER.size
    entries = []
    append = entries.append
    unpack, rsize = _RECORD.unpack_from, _RECORD.size
    while True:
        if len(buf) - pos < rsize:
            buf, pos = reader.refill(buf, pos, rsize)
        if buf[pos:pos + 1] == b"E":
            break
        if len(buf) - pos < rsize:
            raise _Untrusted(f"truncated (no trailer; record header at {reader.base + pos})")
        tag, oid, start, end, n = unpack(buf, pos)
        pos += rsize
        if len(buf) - pos < n:
            if n - (len(buf) - pos) > reader.left:
                raise _Untrusted(f"truncated or corrupt (record of {n} bytes at "
                                 f"{reader.base + pos - rsize} runs past the end)")
            buf, pos = reader.refill(buf, pos, n)
        if tag == b"c" and end == _Z8:
            end = None
        elif tag != b"n":
            raise _Untrusted(f"corrupt record at offset {reader.base + pos - rsize}")
        append((oid, start, end, buf[pos:pos + n]))
        pos += n
    if len(buf) - pos < _TRAILER.size:
        buf, pos = reader.refill(buf, pos, _TRAILER.size)
    if len(buf) - pos != _TRAILER.size or reader.left:
        raise _Untrusted("truncated or corrupt (trailer not at the end of the file)")
    count = _TRAILER.unpack_from(buf, pos)[1]
    if f.read(_DIGEST_SIZE + 1) != reader.digest.digest():
        raise _Untrusted("checksum mismatch")
    if count != len(entries):
        raise _Untrusted(f"record count mismatch ({count} recorded, {len(entries)} read)")
    return (last_tid if has_tid else None), entries
