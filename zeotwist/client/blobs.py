"""ClientStorage methods for blobs (IBlobStorage): the blob cache directory,
streamed transfers, and the shared blob directory mode.

A mixin of :class:`~zeotwist.client.storage.ClientStorage`; its methods run
in the threads that call the storage and wait for the
:class:`~zeotwist.client.client.Client` through ``self._call``.

* ``blob_dir`` given, ``shared_blob_dir=False`` (default): ``blob_dir`` is
  this client's blob *cache* (:class:`~zeotwist.client.blobcache.BlobCache`,
  bounded by ``blob_cache_size``).  ``loadBlob`` downloads a blob the cache
  lacks, streamed into a partial file that is renamed into place when
  complete; ``storeBlob`` takes the caller's file over and streams it to
  the server during the transaction; after ``tpc_finish`` the file becomes
  the cached copy of the new revision.
* ``shared_blob_dir=True``: ``blob_dir`` is the server's own blob directory,
  seen through a shared file system.  Blobs are read in place; ``storeBlob``
  moves the file into the directory's ``tmp`` area and sends only its name.
* No ``blob_dir``: the storage has none of the IBlobStorage methods
  (``hasattr(storage, "loadBlob")`` is false) and does not provide the
  interface, even if the server's storage does.
"""
import os
import tempfile
from typing import TYPE_CHECKING

import ZODB.blob
from twisted.logger import Logger
from ZODB.POSException import POSKeyError, ReadOnlyError, Unsupported

from zeotwist.client.reactorthread import in_reactor_thread
from zeotwist.errors import UsageError
from zeotwist.fileio import write_sliced

if TYPE_CHECKING:        # imported when a blob_dir is given: a client without one needs none
    from zeotwist.client.blobcache import BlobCache

_log = Logger()

#: Blob transfers have no overall deadline (a big blob may take long); they
#: fail instead after the storage's ``timeout`` without progress.
NO_DEADLINE = 365 * 86400.0


class blob_method:
    """A ClientStorage method that exists only when the storage was given a
    blob directory; without one, looking it up raises AttributeError, so
    ``_declare_interfaces`` does not claim IBlobStorage."""

    def __init__(self, f):
        self.f = f
        self.__doc__ = f.__doc__
        self.__name__ = f.__name__

    def __get__(self, obj, owner=None):
        if obj is None:
            return self.f
        if obj._blobs is None:
            raise AttributeError("%s: this ClientStorage has no blob_dir" % self.__name__)
        return self.f.__get__(obj, owner)


class SharedBlobDirectory:
    """The server's blob directory, shared: read in place, written via tmp/."""

    def __init__(self, directory: str):
        self.fshelper = ZODB.blob.FilesystemHelper(os.path.abspath(directory))
        self.fshelper.create()
        self.directory = self.fshelper.base_dir
        self.temp_dir = self.fshelper.temp_dir

    def path(self, oid: bytes, serial: bytes) -> str:
        return self.fshelper.getBlobFilename(oid, serial)

    def take_over(self, filename: str) -> tuple[str, str]:
        """Move the caller's file into tmp/ under a fresh name: ``(path,
        name relative to the blob directory)``."""
        fd, path = tempfile.mkstemp(prefix="zeotwist-", suffix=".tmp", dir=self.temp_dir)
        os.close(fd)
        ZODB.blob.rename_or_copy_blob(filename, path, chmod=False)
        return path, os.path.relpath(path, self.directory)


class BlobStorageMixin:
    #: the BlobCache or SharedBlobDirectory; None without a blob_dir
    _blobs = None
    blob_dir = None
    shared_blob_dir = False
    #: (oid, path) of the files this storage's transaction stored
    _blob_files = ()

    def _blob_setup(self, blob_dir, shared_blob_dir=False, blob_cache_size=None,
                    blob_cache_size_check=10) -> None:
        """Called by ClientStorage.__init__ (see the module docstring)."""
        if blob_dir is None:
            return
        self.blob_dir = os.path.abspath(blob_dir)
        self.shared_blob_dir = bool(shared_blob_dir)
        if self.shared_blob_dir:
            self._blobs = SharedBlobDirectory(self.blob_dir)
        else:
            from zeotwist.client.blobcache import BlobCache     # with a blob_dir only
            self._blobs = BlobCache(self.blob_dir, blob_cache_size, blob_cache_size_check,
                                    lock_timeout=self._timeout)

    @property
    def fshelper(self):
        """ZODB's FilesystemHelper of the blob directory (None without one)."""
        return None if self._blobs is None else self._blobs.fshelper

    @property
    def blob_cache(self) -> "BlobCache | None":
        """The blob cache (None without blob_dir or in the shared mode)."""
        return None if self.shared_blob_dir else self._blobs

    def _server_has_blobs(self) -> None:
        if "IBlobStorage" not in self._client.server_interfaces:
            raise Unsupported("the server's storage %r has no blob directory"
                              % self._client.storage_name)

    # -- IBlobStorage --------------------------------------------------------------
    @blob_method
    def temporaryDirectory(self) -> str:
        """Where uncommitted blob files are made (``blob_dir/tmp``)."""
        return self._blobs.temp_dir

    @blob_method
    def loadBlob(self, oid: bytes, serial: bytes) -> str:
        """The name of a file holding blob (``oid``, ``serial``), downloaded
        into the cache first if needed.  POSKeyError if there is none."""
        blobs = self._blobs
        if self.shared_blob_dir:
            path = blobs.path(oid, serial)
            if not os.path.exists(path):
                raise POSKeyError("No blob file at %s" % path, oid, serial)
            return path
        path = blobs.lookup(oid, serial)
        if path is not None:
            return path
        with blobs.locked(oid):
            path, size = self._load_blob_locked(oid, serial)
        blobs.added(size, keep=path)
        return path

    def _load_blob_locked(self, oid, serial) -> tuple[str, int]:
        """``(path, bytes downloaded)``; call with ``oid``'s directory locked."""
        blobs = self._blobs
        path = blobs.lookup(oid, serial)     # another thread or process was quicker
        if path is not None:
            return path, 0
        f, partial = blobs.new_file(oid, ".dl")
        try:
            with f:
                size = self._download(oid, serial, f)
            return blobs.add(oid, serial, partial), size
        except BaseException:
            _remove_quietly(partial)
            raise

    def _download(self, oid, serial, f) -> int:
        """Write blob (``oid``, ``serial``) to ``f``; its size.  This thread
        asks for the first piece itself when it may (a blob of one piece:
        no reactor thread hand-off); the rest, if any, comes through the
        reactor thread (``Client.fetch_blob``)."""
        from zeotwist.client.blobtransfer import first_piece_from_thread
        client = self._client
        first = self._ask_from_thread(first_piece_from_thread, None, client, oid, serial)
        if first is not None and len(first["data"]) == first["size"]:
            write_sliced(f, first["data"])          # all of it
            return first["size"]
        return self._call(client.fetch_blob, oid, serial, f, self._timeout, first,
                          timeout=NO_DEADLINE)

    @blob_method
    def openCommittedBlobFile(self, oid: bytes, serial: bytes, blob=None):
        """An open file of the committed blob (a ZODB BlobFile if ``blob``
        is given)."""
        path = self.loadBlob(oid, serial)
        try:
            return _open_committed(path, blob)
        except FileNotFoundError:
            if self.shared_blob_dir:
                raise POSKeyError("No blob file at %s" % path, oid, serial)
        # evicted (by another thread or process) before we opened it: fetch
        # it again and open it while no eviction can touch it
        blobs = self._blobs
        with blobs.locked(oid):
            path, size = self._load_blob_locked(oid, serial)
            f = _open_committed(path, blob)
        blobs.added(size, keep=path)
        return f

    @blob_method
    def storeBlob(self, oid, serial, data, blobfilename, version, transaction):
        """Store ``data`` with the blob file ``blobfilename``, which the
        storage takes over.  The file is streamed to the server before this
        returns (shared mode: moved into the shared ``tmp`` and named)."""
        if self.isReadOnly():
            raise ReadOnlyError()
        if version:
            raise UsageError("versions are not supported")
        txn = self._check_trans(transaction, "storeBlob")
        self._server_has_blobs()
        if isinstance(serial, str):      # old callers (ZODB's doctests) pass '\0' * 8
            serial = serial.encode("latin-1")
        self._send_blob(txn, oid, blobfilename, txn.blob_record(oid, serial, data))

    @blob_method
    def restoreBlob(self, oid, serial, data, blobfilename, prev_txn, transaction):
        """IBlobStorageRestoreable: restore a blob revision (copying a database)."""
        if self.isReadOnly():
            raise ReadOnlyError()
        txn = self._check_trans(transaction, "restoreBlob")
        self._server_has_blobs()
        number = txn.blob_record(oid, serial, data, restore=True, prev_txn=prev_txn)
        self._send_blob(txn, oid, blobfilename, number)

    def _send_blob(self, txn, oid, blobfilename, number) -> None:
        if not isinstance(self._blob_files, list):
            self._blob_files = []
        if self.shared_blob_dir:
            path, name = self._blobs.take_over(blobfilename)
            self._blob_files.append((oid, path))
            self._dispatch(txn.send_blob_name, number, name)
            return
        path = self._blobs.take_over(oid, blobfilename)
        self._blob_files.append((oid, path))
        reactor = self._reactor
        if reactor.running and not in_reactor_thread(reactor) \
                and txn.send_blob_from_thread(number, path):
            return              # a small file, sent by this thread (client/blobtxn.py)
        # Not waited for here (one thread hand-off and wait per blob saved,
        # what a transaction of many small blobs is made of): the vote waits
        # for every upload and fails with the first upload's error.
        self._dispatch(self._upload, txn, number, path)

    def _upload(self, txn, number, path) -> None:
        """Start uploading ``path`` (reactor thread); a failure is the vote's."""
        txn.send_blob_file(number, path, self._timeout).addErrback(lambda _: None)

    def _blobs_done(self, tid: bytes | None) -> None:
        """End of this storage's transaction (``tid`` None: aborted).

        The files stored become the cached copies of the new revisions;
        after an abort (or in the shared mode, where the server has moved
        them) whatever is left is removed.  Never raises: the transaction's
        outcome is decided already.
        """
        files, self._blob_files = self._blob_files, ()
        for oid, path in files:
            if tid is None or self.shared_blob_dir:
                _remove_quietly(path)
                continue
            try:
                with self._blobs.locked(oid):
                    target = self._blobs.add(oid, tid, path)
                self._blobs.added(os.path.getsize(target), keep=target)
            except Exception as e:
                _log.warn("zeotwist: could not cache the blob just committed: {err}", err=e)
                _remove_quietly(path)


def _open_committed(path: str, blob):
    if blob is None:
        return open(path, "rb")
    return ZODB.blob.BlobFile(path, "r", blob)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
