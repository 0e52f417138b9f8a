"""The blob part of a :class:`~zeotwist.client.transaction.ClientTransaction`.

Each blob file of a transaction is numbered (0, 1, ...) by the storeBlob
(or restoreBlob) record that names it in the store stream, and reaches the
server as ``StoreBlobChunk`` messages (one-way), in that order:

* **A small file** (one chunk: at most ``BLOB_CHUNK_LONG``, 1 MiB, to a
  server that reads long entries, else ``BLOB_CHUNK``) is read and sent by
  the committing thread itself, one frame (with ``TpcBegin`` in front when
  it opens the transaction on the server), written to the socket as a
  ``vote_from_thread`` is (:meth:`ThreadWrites.send_from_thread`: only while
  nothing else is queued for the socket and no call waits for the reactor).
  No reactor thread hand-off, no producer, no reactor turn per blob.
* **Any other**, and every blob after the first one that could not go so
  (a busy socket, a large file, another thread's call pending, TLS), goes
  to the reactor thread's :class:`~zeotwist.client.blobtransfer.BlobUploads`,
  which streams the files one after another, paced by the connection's
  buffer: so the chunks of two blob files never interleave, and a
  transaction of many blobs on a slow link holds one chunk in memory, not
  all of them.

:meth:`ClientTransaction.vote_once` waits for the uploads; an abort stops
them first (no chunk follows the ``Abort``).  The shared blob directory
mode sends names instead (``StoreBlobShared``).
"""
import os

from twisted.internet.defer import Deferred, fail
from ZODB.utils import z64

from zeotwist.twistedcompat import calls_pending
from zeotwist.wire import commands as C
from zeotwist.wire import commitframes
from zeotwist.wire.records import encode_blob, encode_restore_blob


class BlobTransaction:
    """Mixin of ClientTransaction: storeBlob's records and files."""

    #: blob files numbered so far; the uploads (a BlobUploads) once one began
    _blob_count = 0
    _blob_uploads = None
    #: set by the committing thread once a blob file went to the uploads:
    #: every later one follows it there, in order
    _blob_streamed = False

    def store_blob(self, oid: bytes, serial: bytes | None, data: bytes, path: str) -> Deferred:
        """storeBlob: ``data`` is the record, ``path`` the blob file, which
        is uploaded (the caller keeps it).  Fires once its last chunk is
        handed to the connection; :meth:`vote` waits for that anyway."""
        return self.send_blob_file(self.blob_record(oid, serial, data), path)

    def store_blob_shared(self, oid: bytes, serial: bytes | None, data: bytes,
                          name: str) -> None:
        """storeBlob in the shared-blob-directory mode: ``name`` is the blob
        file's path relative to the server's blob directory, in its ``tmp``."""
        self.send_blob_name(self.blob_record(oid, serial, data), name)

    def blob_record(self, oid: bytes, serial: bytes | None, data: bytes,
                    restore: bool = False, prev_txn: bytes | None = None) -> int:
        """Add a storeBlob (or restoreBlob) record for the next blob file to
        the stream and return that file's number, for :meth:`send_blob_file`
        or :meth:`send_blob_name`.  Called like :meth:`store`."""
        number = self._blob_count
        self._blob_count += 1
        if restore:
            self._stream += encode_restore_blob(oid, serial, number, data, prev_txn)
            self._written[oid] = None            # invalidated, not cached
        else:
            self._stream += encode_blob(oid, serial or z64, number, data)
            self._remember_written(oid, data)
        if len(self._stream) >= C.STORE_CHUNK:
            self._flush()
        return number

    def send_blob_from_thread(self, number: int, path: str) -> bool:
        """Committing thread (not the reactor's): send blob file ``number``
        (at ``path``) as one frame written by this thread, if the file fits
        in one chunk and this thread may write now (the module docstring).
        False, with nothing sent: the caller hands it to the reactor
        (:meth:`send_blob_file`), as every later blob of this transaction."""
        proto = self._client.protocol
        if self._blob_streamed or self._failed is not None or proto is None \
                or self._proto not in (None, proto) or calls_pending(self._client.reactor):
            self._blob_streamed = True
            return False
        begin = b"" if self._proto is not None else self._begin_frame()
        limit = C.BLOB_CHUNK_LONG if proto.long_values else C.BLOB_CHUNK
        data = None
        if begin is not None:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size <= limit:
                    data = f.read(limit + 1)
        if data is None or len(data) > limit:
            self._blob_streamed = True
            return False
        opens, self._proto = self._proto is None, proto   # read by the reactor only later
        if proto.send_from_thread(begin + commitframes.store_blob_chunk(number, data, proto.long_values)):
            return True
        if opens:
            self._proto = None
        self._blob_streamed = True
        return False

    def send_blob_file(self, number: int, path: str,
                       idle_timeout: float | None = None) -> Deferred:
        """Upload the file at ``path`` as blob file ``number`` (reactor
        thread), after the uploads already queued; fires when its last chunk
        is handed to the connection, whose buffer paces the reads.  With
        ``idle_timeout``, fails after that many seconds without progress."""
        from zeotwist.client.blobtransfer import BlobUploads
        self._send(b"")                 # opens the transaction on the server first
        if self._failed is not None:
            return fail(self._failed)
        if self._blob_uploads is None:
            self._blob_uploads = BlobUploads(self._client.reactor)
        d = self._blob_uploads.add(self._proto, number, path, idle_timeout)
        return d.addErrback(self._blob_failed)

    def send_blob_name(self, number: int, name: str) -> None:
        """Shared blob directory: blob file ``number`` is the file ``name``
        (reactor thread).  The server checks the name; a refusal fails the vote."""
        self._send(b"")
        if self._failed is None:
            self._proto.send(C.StoreBlobShared, blob=number, name=name)

    def _blob_failed(self, failure):
        if self._failed is None:        # the server is missing a blob file now
            self._failed = failure.value
        return failure

    def _blobs_pending(self) -> Deferred | None:
        uploads = self._blob_uploads
        return None if uploads is None else uploads.idle()
