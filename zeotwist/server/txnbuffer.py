"""The server's buffer for one client transaction's store stream.

Stores arrive as pieces of a byte stream (:mod:`zeotwist.wire.records`)
before the client votes.  Up to ``SMALL_SPOOL_BYTES`` (a small commit)
they are kept as the list of pieces; past that in a spooled temporary file:
in memory up to ``spool_bytes``, on disk past that, refused past
``max_bytes`` (the refusal is reported at vote).  Nothing here touches the
storage.

With a server-wide :class:`~zeotwist.server.budgets.MemoryBudget`, the
in-memory part also counts against its ``spool_memory`` budget (past it
the spool moves to disk at once) and every byte against its ``spool``
total (past it the transaction is refused at vote, its stores dropped).

Appends run on the reactor thread; :meth:`TransactionBuffer.records` runs in
the storage thread once the session has stopped appending.
"""
import io
import tempfile
from typing import Iterator

from zeotwist.errors import TransactionTooLarge
from zeotwist.wire.records import HEAD_SIZE, UNDO, iter_records, unpack_head

DEFAULT_SPOOL_BYTES = 8 * 2**20
#: TransactionBuffer.oids names the oids of a stream of at most this many
#: records (more: unknown); it reads their headers only, whatever their size
OIDS_SCAN_RECORDS = 10_000
#: the stream is read this many bytes at a time for its headers (a payload
#: longer than this is skipped with a seek)
_SCAN_BLOCK = 64 * 1024
#: after such a skip, this many: the header, and more small records' if they
#: follow (a transaction of big records then costs ~_SKIP_READ bytes a record
#: read on the reactor thread, not a whole block)
_SKIP_READ = 512


#: A stream of at most this many bytes stays a list of its pieces (a small
#: commit's one piece): no spooled file is made, written, sought and read.
SMALL_SPOOL_BYTES = 64 * 1024


class TransactionBuffer:
    def __init__(self, spool_bytes: int = DEFAULT_SPOOL_BYTES, max_bytes: int = 2**31,
                 budgets=None):
        self._spool_bytes = spool_bytes
        self._file = None           # the spooled file, once the stream outgrows _pieces
        self._pieces: list | None = []
        self._max = max_bytes
        self._budgets = budgets
        self.size = 0
        self.too_large = False
        self._refusal = None        # why it was refused (set when it is)
        #: called without arguments by :meth:`close`: what mixins attached to
        #: the transaction (spooled blob files) is released with it
        self.on_close: list = []

    def append(self, piece: bytes) -> None:
        if not self._claim(len(piece)):
            return                  # keep nothing more; reported at vote
        budgets, f = self._budgets, self._file
        if f is None and self.size + len(piece) > SMALL_SPOOL_BYTES:
            f = self._to_file()
        if budgets is not None and not (f is not None and getattr(f, "_rolled", True)):
            memory = budgets.spool_memory
            if memory.total - memory.held(self) + self.size + len(piece) > memory.cap:
                f = f or self._to_file()
                f.rollover()                # the server's in-memory spool is full
                memory.release(self)
        if f is None:
            self._pieces.append(piece)
        else:
            f.write(piece)
        self.size += len(piece)
        if budgets is not None:
            rolled = f is not None and getattr(f, "_rolled", True)
            budgets.spool_memory.set(self, 0 if rolled else self.size)

    def _to_file(self):
        """The spooled file, holding what the pieces held."""
        f = self._file = tempfile.SpooledTemporaryFile(max_size=self._spool_bytes)
        for piece in self._pieces:
            f.write(piece)
        self._pieces = None
        return f

    def reserve(self, nbytes: int) -> bool:
        """Count ``nbytes`` sent beside the stream (blob chunks) against the
        cap; False (and the transaction refused at vote) once it is exceeded."""
        if not self._claim(nbytes):
            return False
        self.size += nbytes
        return True

    def _claim(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit this transaction and the server's spool."""
        if self.too_large:
            return False
        if self.size + nbytes > self._max:
            return self._refuse("transaction larger than %d bytes" % self._max)
        if self._budgets is not None:
            spool = self._budgets.spool
            if spool.total + nbytes > spool.cap:
                return self._refuse("the server's spool is full (%d bytes of open "
                                    "transactions)" % spool.total)
            spool.set(self, self.size + nbytes)
        return True

    def _refuse(self, why: str) -> bool:
        """The transaction will fail at vote: drop what it spooled now."""
        self.too_large, self._refusal = True, why
        if self._file is None:
            self._pieces = []
        else:
            self._file.seek(0)
            self._file.truncate(0)
        if self._budgets is not None:
            self._budgets.spool.release(self)
            self._budgets.spool_memory.release(self)
        return False

    def records(self, kinds=None) -> Iterator[tuple[bytes, bytes, bytes, bytes]]:
        if self.too_large:
            raise TransactionTooLarge(self._refusal)
        if self._file is None:
            stream = b"".join(self._pieces)
            return iter_records(io.BytesIO(stream), kinds, len(stream))
        stream_bytes = self._file.seek(0, 2)    # the stream alone (size counts blobs too)
        self._file.seek(0)
        return iter_records(self._file, kinds, stream_bytes)

    def oids(self, limit: int = OIDS_SCAN_RECORDS) -> frozenset | None:
        """The oids the records name, if the stream holds at most ``limit``
        records and no undo (whose oids only the storage knows): else None,
        unknown.  Reads the records' headers only (a big record's payload is
        skipped), so a big transaction's oids are known too.  Reactor
        thread, after the last append and before the storage reads the
        records (the commit lock asks it only while a refused client holds
        a ticket)."""
        if self.too_large:
            return None
        if self._file is None:
            stream = b"".join(self._pieces)
            return _named(io.BytesIO(stream), len(stream), limit)
        size = self._file.seek(0, 2)
        try:
            return _named(self._file, size, limit)
        finally:
            self._file.seek(size)   # appends write at the position

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._pieces = None
        if self._budgets is not None:
            self._budgets.spool.release(self)
            self._budgets.spool_memory.release(self)
        callbacks, self.on_close = self.on_close, []
        for callback in callbacks:
            callback()


def _named(f, size: int, limit: int) -> frozenset | None:
    """The oids named by the headers of the ``size`` bytes of records in
    ``f``; None past ``limit`` records, at an undo, or if they are
    malformed (the vote reports it)."""
    oids, pos, block, base = set(), 0, b"", 0   # block: f's bytes from base on
    for _ in range(limit):
        if pos >= size:
            break
        if pos + HEAD_SIZE > base + len(block):
            skipped = pos > base + len(block)       # a payload past the block
            f.seek(pos)
            block, base = f.read(_SKIP_READ if skipped else _SCAN_BLOCK), pos
            if len(block) < HEAD_SIZE:
                return None
        kind, oid, length = unpack_head(block, pos - base)
        if kind == UNDO:
            return None
        oids.add(oid)
        pos += HEAD_SIZE + length
    return frozenset(oids) if pos == size else None
