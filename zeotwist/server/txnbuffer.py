"""The server's buffer for one client transaction's store stream.

Stores arrive as pieces of a byte stream (:mod:`zeotwist.wire.records`)
before the client votes.  They are kept in a spooled temporary file: in
memory up to ``spool_bytes``, on disk past that, refused past ``max_bytes``
(the refusal is reported at vote).  Nothing here touches the storage.

Appends run on the reactor thread; :meth:`TransactionBuffer.records` runs in
the storage thread once the session has stopped appending.
"""
import tempfile
from typing import Iterator

from zeotwist.errors import TransactionTooLarge
from zeotwist.wire.records import iter_records

DEFAULT_SPOOL_BYTES = 8 * 2**20


class TransactionBuffer:
    def __init__(self, spool_bytes: int = DEFAULT_SPOOL_BYTES, max_bytes: int = 2**31):
        self._file = tempfile.SpooledTemporaryFile(max_size=spool_bytes)
        self._max = max_bytes
        self.size = 0
        self.too_large = False
        #: called without arguments by :meth:`close`: what mixins attached to
        #: the transaction (spooled blob files) is released with it
        self.on_close: list = []

    def append(self, piece: bytes) -> None:
        if self.too_large:
            return
        if self.size + len(piece) > self._max:
            self.too_large = True   # keep nothing more; reported at vote
            return
        self._file.write(piece)
        self.size += len(piece)

    def reserve(self, nbytes: int) -> bool:
        """Count ``nbytes`` sent beside the stream (blob chunks) against the
        cap; False (and the transaction refused at vote) once it is exceeded."""
        if self.too_large or self.size + nbytes > self._max:
            self.too_large = True
            return False
        self.size += nbytes
        return True

    def records(self, kinds=None) -> Iterator[tuple[bytes, bytes, bytes, bytes]]:
        if self.too_large:
            raise TransactionTooLarge(
                "transaction larger than %d bytes" % self._max)
        self._file.seek(0)
        return iter_records(self._file, kinds)

    def close(self) -> None:
        self._file.close()
        callbacks, self.on_close = self.on_close, []
        for callback in callbacks:
            callback()
