"""Responders for blobs (IBlobStorage): streamed transfers and the shared
blob directory mode.

A mixin of :class:`~zeotwist.server.session.ServerSession`.

* Upload: during a transaction the client sends each blob file as
  ``StoreBlobChunk`` messages (one-way), which are appended on the reactor
  thread to a spool file in the storage's blob temporary directory (small
  sequential writes; a chunk is at most 60 KB, or 1 MiB between peers
  that read long entries: ``BLOB_CHUNK_LONG``), counted against the
  transaction's size cap.  In the shared-blob-directory mode the client
  sends only a file name (``StoreBlobShared``); the name is checked and the
  file moved into the spool at once.  At vote, in the storage thread, the
  store stream's blob records hand the spooled files to the storage's
  ``storeBlob``/``restoreBlob``, which move them into the blob directory.
  Whatever a transaction spooled and did not hand over is removed when the
  transaction ends, however it ends (``TransactionBuffer.on_close``).
* Download: ``LoadBlobChunk`` reads a piece of a committed blob file (120 KB,
  or up to 1 MiB when the client asks with ``length``) on the reactor
  thread when the storage's worker is idle, else in it
  (``self.server.threads.inline_or_in_order``); the client pulls the pieces, at
  most 4 MiB (and 16 pieces) at a time, so the server never holds more than
  those in memory.
"""
import os
import stat
import tempfile

from ZODB.POSException import POSKeyError, StorageError, Unsupported
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.protocols import amp

from zeotwist.errors import BlobPathRefused, RemoteProtocolError
from zeotwist.fileio import write_sliced
from zeotwist.server.malloc import trim_after_burst
from zeotwist.server.txnstate import Event
from zeotwist.wire import commands as C
from zeotwist.wire import commitframes
from zeotwist.wire.records import decode_blob, decode_restore_blob
from zeotwist.wire.framing import peer_text

_log = Logger()


class BlobResponders(amp.CommandLocator):

    def ampBoxReceived(self, box):
        # The upload's hot path (thousands of boxes per blob): a plain
        # StoreBlobChunk goes straight to the spool, without AMP's argument
        # machinery.  Anything unusual takes the ordinary path, which
        # validates and drops a misbehaving client.
        chunk = commitframes.read_store_blob_chunk(box) if self.server is not None else None
        if chunk is not None:
            try:
                self.store_blob_chunk(*chunk)
            except RemoteProtocolError as e:
                self.protocolViolation("bad StoreBlobChunk: %s" % e)
            return
        super().ampBoxReceived(box)

    @C.StoreBlobChunk.responder
    def store_blob_chunk(self, blob, data):
        spool = self._blob_spool("StoreBlobChunk")
        if spool is not None and self._txn.buffer.reserve(len(data)):
            spool.append(blob, data)
        trim_after_burst()
        return {}

    @C.StoreBlobShared.responder
    def store_blob_shared(self, blob, name):
        spool = self._blob_spool("StoreBlobShared")
        if spool is not None:
            reason = spool.adopt(blob, name, blob_directory(self.server.storage))
            if reason is not None:
                _log.warn("refused shared blob file {name!r} from {peer}: {why}",
                          name=name, peer=peer_text(self.transport),
                          why=reason)
        return {}

    def _blob_spool(self, command: str):
        """This transaction's :class:`BlobSpool` (made on first use), or
        None: after dropping a client that sends blobs out of place, or for
        a read-only session (whose vote fails with ReadOnlyError)."""
        txn = self._txn
        if txn is None or not txn.state.can(Event.STORE):
            self.protocolViolation("%s outside a transaction" % command)
            return None
        if "IBlobStorage" not in self.server.interfaces:
            self.protocolViolation("%s: storage %r has no blob directory"
                                   % (command, self.server.name))
            return None
        if txn.read_only:         # refused at vote anyway: keep and move nothing
            return None
        spool = getattr(txn, "blob_spool", None)
        if spool is None:
            spool = txn.blob_spool = BlobSpool(self.server.storage.temporaryDirectory())
            txn.buffer.on_close.append(spool.close)
        return spool

    @C.LoadBlobChunk.responder
    def load_blob_chunk(self, oid, serial, offset, length=None):
        if offset < 0 or (length is not None and length < 1):
            self.protocolViolation("LoadBlobChunk at offset %d, length %s" % (offset, length))
            return Deferred()                # never answered: the link is closing
        length = C.BLOB_LOAD_CHUNK if length is None else min(length, C.BLOB_LOAD_MAX)
        # a read of at most 1 MiB: on the reactor thread when the worker is
        # idle (two thread hand-offs fewer per chunk), timed like a small
        # commit; only on a storage local to this process (RelStorage may
        # fetch the whole blob from its database first)
        server = self.server
        threads = server.threads
        call = threads.inline_or_in_order if server.inline_commit_bytes else threads.in_order
        d = call(read_blob_chunk, server.storage, oid, serial, offset, length)
        trim_after_burst()
        if not d.called:        # answered later, outside this burst: counted now
            self.reserve_output(length, d)
        return d


def read_blob_chunk(storage, oid: bytes, serial: bytes, offset: int,
                    length: int = C.BLOB_LOAD_CHUNK) -> dict:
    """Up to ``length`` bytes of a committed blob and its size (storage thread)."""
    load = getattr(storage, "loadBlob", None)
    if load is None:
        raise Unsupported("this storage has no blobs")
    path = load(oid, serial)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(offset)
            data = f.read(length)
    except FileNotFoundError:       # packed away meanwhile
        raise POSKeyError(oid)
    return dict(data=data, size=size)


def blob_directory(storage) -> str:
    """The storage's blob directory (the parent of its temporary directory)."""
    helper = getattr(storage, "fshelper", None)
    if helper is not None and getattr(helper, "base_dir", None):
        return helper.base_dir
    return os.path.dirname(os.path.normpath(storage.temporaryDirectory()))


class BlobSpool:
    """The blob files one transaction sent, numbered 0, 1, ... as they began.

    Filled on the reactor thread while the transaction is open; read by the
    vote (storage thread) once it is not; :meth:`close` removes what the
    storage did not take.  ``directory`` is the storage's temporary
    directory, on the blob directory's file system, so the storage moves
    (not copies) a spooled file into place.
    """

    def __init__(self, directory: str):
        self.directory = directory
        self.paths: list = []          # blob number -> spool file
        self.refused: dict = {}        # blob number -> why its name was refused
        self.error = None              # why spooling failed (disk full, ...), if it did
        self._file = None              # the file receiving the last blob's chunks

    def _next(self, blob: int) -> tuple[int, str]:
        if blob != len(self.paths):
            raise RemoteProtocolError(
                "blob file %d out of order (expected %d)" % (blob, len(self.paths)))
        self._end_file()
        fd, path = tempfile.mkstemp(prefix="zeotwist-", suffix=".spool", dir=self.directory)
        self.paths.append(path)
        return fd, path

    def append(self, blob: int, data: bytes) -> None:
        """Append a chunk to blob file ``blob`` (the last one, or a new one).

        A file error (disk full) is kept, not raised: the vote reports it.
        """
        if self.error is not None:
            return
        try:
            if blob == len(self.paths):
                fd, _ = self._next(blob)
                self._file = os.fdopen(fd, "wb")
            elif blob != len(self.paths) - 1 or self._file is None:
                raise RemoteProtocolError("chunk for blob file %d, which has ended" % blob)
            write_sliced(self._file, data)
        except OSError as e:
            self._failed(e)
            self._end_file()

    def _failed(self, error: OSError) -> None:
        if self.error is None:
            self.error = "the server could not spool a blob file: %s" % (error,)
            _log.error("{why}", why=self.error)

    def adopt(self, blob: int, name: str, blob_dir: str) -> str | None:
        """Make the shared-directory file ``name`` blob file ``blob``.

        Returns None, or why the name was refused (the vote then fails with
        BlobPathRefused); a refused file is neither read nor moved.
        """
        fd, path = self._next(blob)
        os.close(fd)
        try:
            source = shared_blob_file(blob_dir, self.directory, name)
            os.replace(source, path)         # over our placeholder; moves no link target
            if not stat.S_ISREG(os.lstat(path).st_mode):
                raise BlobPathRefused("%r changed into something else than a file" % name)
        except BlobPathRefused as e:
            self.refused[blob] = str(e)
            return str(e)
        except OSError as e:
            self.refused[blob] = "%r: %s" % (name, e.strerror or e)
            return self.refused[blob]
        return None

    def take(self, blob: int) -> str:
        """The spooled file of blob ``blob``, for the storage (storage thread)."""
        self._end_file()
        if self.error is not None:
            raise StorageError(self.error)
        if blob in self.refused:
            raise BlobPathRefused(self.refused[blob])
        if not 0 <= blob < len(self.paths):
            raise RemoteProtocolError("blob record names blob file %d, which was never sent"
                                      % blob)
        return self.paths[blob]

    def _end_file(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except OSError as e:        # the last buffered bytes did not fit
                self._failed(e)

    def close(self) -> None:
        """Remove every spooled file the storage did not take."""
        self._end_file()
        for path in self.paths:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                _log.warn("cannot remove spooled blob file {path}: {err}", path=path, err=e)
        self.paths = []


def shared_blob_file(blob_dir: str, temp_dir: str, name: str) -> str:
    """The real path of the file ``name`` names in a shared blob directory.

    ``name`` is relative to ``blob_dir``; after resolving every symbolic
    link it must be a regular file directly inside ``temp_dir``.  Never
    trusts the client: raises BlobPathRefused otherwise, without opening
    the file.
    """
    if not name or "\0" in name or os.path.isabs(name):
        raise BlobPathRefused("%r is not a name relative to the blob directory" % name)
    base = os.path.realpath(blob_dir)
    real_tmp = os.path.realpath(temp_dir)
    real = os.path.realpath(os.path.join(base, name))
    if os.path.commonpath([base, real]) != base:
        raise BlobPathRefused("%r is outside the server's blob directory" % name)
    if os.path.dirname(real) != real_tmp:
        raise BlobPathRefused("%r is not in the blob directory's tmp area" % name)
    try:
        mode = os.lstat(real).st_mode
    except OSError:
        raise BlobPathRefused("%r: no such file in the server's blob directory" % name)
    if not stat.S_ISREG(mode):
        raise BlobPathRefused("%r is not a regular file" % name)
    return real


# -- the store stream's blob records (storage thread, at vote) ------------------

def _spool_of(txn) -> BlobSpool:
    spool = getattr(txn, "blob_spool", None)
    if spool is None:
        raise RemoteProtocolError("blob record in a transaction that sent no blob file")
    return spool


def apply_blob(storage, txn, oid, serial, payload):
    blob, data = decode_blob(payload)
    txn.check_oid(oid)
    path = _spool_of(txn).take(blob)
    storage.storeBlob(oid, serial, data, path, "", txn.meta)
    txn.oids.append(oid)


def apply_restore_blob(storage, txn, oid, serial, payload):
    blob, data, prev_txn = decode_restore_blob(payload)
    txn.check_oid(oid)
    path = _spool_of(txn).take(blob)
    storage.restoreBlob(oid, serial, data, path, prev_txn, txn.meta)
    txn.oids.append(oid)

#: errors a vote may answer because of blobs, without logging a traceback
BLOB_VOTE_ERRORS = (BlobPathRefused,)
