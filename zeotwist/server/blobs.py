"""Responders for blobs (IBlobStorage): streamed transfers and the shared
blob directory mode.

A mixin of :class:`~zeotwist.server.session.ServerSession`.

* Upload: during a transaction the client sends each blob file as
  ``StoreBlobChunk`` messages (one-way), which are appended on the reactor
  thread to a spool file in the storage's blob temporary directory (small
  sequential writes; a chunk is at most 60 KB, or 1 MiB between peers
  that read long entries: ``BLOB_CHUNK_LONG``), counted against the
  transaction's size cap.  A long chunk is written as it arrives, read
  from the socket into one 512 KiB buffer (:class:`SpoolSink`, the
  parser's ``long_sink``), never held whole.  In the shared-blob-directory mode the client
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
  most 4 MiB (and 16 pieces) at a time.  A piece that goes as a long entry
  over a socket is not read: the answer carries a
  :class:`~zeotwist.fileio.FilePiece`, which the connection sends from the
  file in its turn, 256 KiB read at a time (``transportcompat.queue_file_piece``),
  so the pieces waiting for a busy socket take no memory.
"""
import os
import stat
import tempfile
import threading

from ZODB.POSException import POSKeyError, StorageError, Unsupported
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.protocols import amp

from zeotwist import transportcompat
from zeotwist.errors import BlobPathRefused, RemoteProtocolError
from zeotwist.fileio import FilePiece, write_sliced
from zeotwist.server.malloc import burst_buffers, trim_after_burst
from zeotwist.server.txnstate import Event
from zeotwist.wire import commands as C
from zeotwist.wire import commitframes
from zeotwist.wire.records import decode_blob, decode_restore_blob
from zeotwist.wire.framing import LongSink, peer_text
from zeotwist.wire.boxlayout import MAX_VALUE

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
        if data is commitframes.SPOOLED:        # written as it came (long_sink)
            return {}
        spool = self._blob_spool("StoreBlobChunk")
        if spool is not None and self._txn.buffer.reserve(len(data)):
            spool.append(blob, data)
        trim_after_burst()
        return {}

    def long_sink(self, box, key, size):
        """A StoreBlobChunk's long ``data``: into the spool as it arrives
        (:class:`SpoolSink`), checked as :meth:`store_blob_chunk` checks a
        whole chunk, so no chunk is ever held whole (BoundedAMP)."""
        blob = commitframes.store_blob_chunk_head(box, key) if self.server is not None else None
        if blob is None or self._held is not None:
            # (reading paused: the boxes before this one are held, to run
            # later in order; it must not be spooled ahead of them)
            return super().long_sink(box, key, size)
        spool = self._blob_spool("StoreBlobChunk")
        if spool is not None and not self._txn.buffer.reserve(size):
            spool = None                        # over the transaction's cap: dropped
        return SpoolSink(self, spool, blob)

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
        # a piece that goes as a long entry, to a socket: its file, not its
        # bytes, waits for the socket (however many are asked for, none is
        # in memory; a piece in bytes would be copied into its frame, too)
        # (while this session and the server hold few such files open: each
        # holds a file descriptor until sent, which the byte budgets do not
        # bound; past that the piece is read, as over TLS)
        as_file = self.long_values and transportcompat.sends_files(self.transport) \
            and FILE_PIECES.take(self)
        d = call(read_blob_chunk, server.storage, oid, serial, offset, length, as_file)
        trim_after_burst()
        if not d.called:        # answered later, outside this burst: counted now
            self.reserve_output(length, d)
        return d


class SpoolSink(LongSink):
    """A StoreBlobChunk's data written to blob file ``blob`` of ``spool``
    as it arrives (None: dropped, as :meth:`BlobResponders.store_blob_chunk`
    drops a chunk it may not spool).  A chunk out of order drops the link,
    as there.  The bytes are gathered in one buffer (:data:`SPOOL_READ`),
    so that the spool is written in pieces of that size, as the chunk's
    whole bytes were before; it is empty whenever the parser returns."""

    def __init__(self, session, spool, blob: int):
        self.session, self.spool, self.blob = session, spool, blob
        self._fill = 0

    def write(self, piece) -> None:
        size = len(piece)
        if self._fill + size > SPOOL_READ:
            self.flush()
        if size >= SPOOL_READ:
            self._append(piece)
            return
        self._buffer()[self._fill:self._fill + size] = piece
        self._fill += size

    def buffer(self, most: int) -> memoryview:
        if self._fill == SPOOL_READ:
            self.flush()
        return self._buffer()[self._fill:self._fill + most]

    def filled(self, count: int) -> None:
        self._fill += count
        if self._fill == SPOOL_READ:
            self.flush()

    def flush(self) -> None:
        fill, self._fill = self._fill, 0
        if fill:
            self._append(self._buffer()[:fill])

    def _append(self, piece) -> None:
        if self.spool is None:
            return
        try:
            self.spool.append(self.blob, piece)
        except RemoteProtocolError as e:
            self.spool = None
            self.session.protocolViolation("bad StoreBlobChunk: %s" % e)

    @staticmethod
    def _buffer() -> memoryview:
        buffer = getattr(_spool_buffer, "view", None)
        if buffer is None:
            buffer = _spool_buffer.view = memoryview(bytearray(SPOOL_READ))
        return buffer

    def value(self) -> bytes:
        trim_after_burst()
        return commitframes.SPOOLED


#: bytes a StoreBlobChunk's data is gathered in, read straight from the
#: socket (``recv_into``), before they are written to the spool: one buffer
#: for every connection of a reactor thread (which writes it out before it
#: reads another's), let go once the pieces stop coming
#: (``malloc.burst_buffers``).  Written whole, 512 KiB at a time, the spool
#: is written as fast as from whole 1 MiB chunks; pieces as they came
#: (unaligned to the file's pages) cost 15-30% of the upload rate
#: (docs/performance.md, "Issue 10, eighth session")
SPOOL_READ = 2**19
_spool_buffer = threading.local()      # .view: the buffer of this reactor thread


def _drop_spool_buffer() -> None:
    _spool_buffer.view = None


burst_buffers.append(_drop_spool_buffer)


def read_blob_chunk(storage, oid: bytes, serial: bytes, offset: int,
                    length: int = C.BLOB_LOAD_CHUNK, as_file=None) -> dict:
    """Up to ``length`` bytes of a committed blob and its size (storage
    thread).  With ``as_file`` (a slot of :data:`FILE_PIECES`: called once
    the file is closed), a piece longer than one AMP value (a long entry)
    comes as a :class:`~zeotwist.fileio.FilePiece` of the open file, not
    read; the slot is given back at once when no piece is made."""
    try:
        load = getattr(storage, "loadBlob", None)
        if load is None:
            raise Unsupported("this storage has no blobs")
        path = load(oid, serial)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:       # packed away meanwhile
            raise POSKeyError(oid)
        try:
            size = os.fstat(fd).st_size
            count = max(0, min(length, size - offset))
            if as_file and count > MAX_VALUE:
                data, fd = FilePiece(fd, offset, count, as_file), -1    # the piece closes it
                as_file = None
            else:
                data = os.pread(fd, count, offset) if count else b""
        finally:
            if fd >= 0:
                os.close(fd)
    finally:
        if as_file:
            as_file()               # no piece holds the slot
    return dict(data=data, size=size)


class FilePieces:
    """How many blob files the answers waiting for their socket hold open
    (:class:`~zeotwist.fileio.FilePiece`), per session and in all: each is
    a file descriptor until sent, and the connection cap leaves only
    ``limits.FD_RESERVE`` of them for everything else.  Past either bound
    a piece is read into memory, as before (bounded by the byte budgets).
    Taken on the reactor thread, given back in any thread (a piece is
    closed where it is dropped)."""

    def __init__(self, per_holder: int, total: int):
        self.per_holder, self.total = per_holder, total
        self._lock = threading.RLock()     # (a piece the GC closes inside take)
        self._held: dict = {}
        self._count = 0

    def take(self, holder):
        """A slot for ``holder``: a function to call once its file is
        closed; or None when none is free."""
        with self._lock:
            mine = self._held.get(holder, 0)
            if mine >= self.per_holder or self._count >= self.total:
                return None
            self._held[holder] = mine + 1
            self._count += 1
        given = []

        def give_back() -> None:
            with self._lock:
                if given:
                    return
                given.append(True)
                self._count -= 1
                left = self._held[holder] - 1
                if left:
                    self._held[holder] = left
                else:
                    del self._held[holder]
        return give_back


#: a downloading client keeps at most 4 pieces of 1 MiB (16 of an older
#: client's 120 KB) in flight: 16 per session; half the descriptors the
#: connection cap leaves free in all
FILE_PIECES = FilePieces(16, 32)



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
        self.closed = False            # the transaction ended: nothing more is spooled

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
        if self.error is not None or self.closed:
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
        """Remove every spooled file the storage did not take; spool no
        more (a chunk still arriving is dropped)."""
        self.closed = True
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
