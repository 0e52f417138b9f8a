"""Writing blob pieces to files in slices of 64 KiB, and sending them from
files (:class:`FilePiece`).

Blob pieces travel in 1 MiB (``wire.commands.BLOB_CHUNK_LONG``,
``BLOB_LOAD_MAX``); written whole, each write asks the kernel's page cache
for folios of up to 1 MiB, which on a VM whose freed memory is fragmented
come from fresh memory, far slower to provide than reused pages
(docs/performance.md, "Blobs: where the time and the spread come from").
ZEO 6 writes 59,000 bytes at a time.  The slices are views of the piece:
no copy.

A :class:`FilePiece` is part of an open file that a socket is sent from,
read a slice at a time as the socket takes it: the server answers a big LoadBlobChunk
with one instead of the piece's bytes, so no blob piece sits in its memory
while the socket is busy (docs/performance.md, "Issue 10, eighth session").

Runs in the caller's thread (the reactor's, for both the client's blob
cache file and the server's spool, and for a piece's sends; a piece may
be opened in the server's storage thread).
"""
import os

#: the most bytes one ``write`` hands the kernel
FILE_WRITE = 2**16


def write_sliced(f, data: bytes) -> None:
    """Write ``data`` to the binary file ``f``, at most FILE_WRITE bytes a call."""
    if len(data) <= FILE_WRITE:
        f.write(data)
        return
    view = memoryview(data)
    for start in range(0, len(data), FILE_WRITE):
        f.write(view[start:start + FILE_WRITE])


#: bytes a :class:`FilePiece` reads per ``send`` (what the socket does not
#: take is read again at its next turn)
PREAD_SIZE = 2**18


class FilePiece:
    """``count`` bytes of the open file ``fd`` from ``offset``, to be sent
    from the file (:meth:`send_to`: read as the socket takes them, a slice
    at a time) instead of held as bytes while they wait for the socket;
    the piece owns ``fd`` and closes it once sent, or when closed or
    dropped.  Its ``len`` is what it had to send when made."""

    __slots__ = ("fd", "offset", "left", "size", "on_close")

    def __init__(self, fd: int, offset: int, count: int, on_close=None):
        self.fd, self.offset, self.left, self.size = fd, offset, count, count
        self.on_close = on_close        # called once, when ``fd`` is closed

    def __len__(self) -> int:
        return self.size

    def send_to(self, sock) -> int:
        """Send what the non-blocking socket ``sock`` takes now; the bytes
        sent (0 when it is full).  Raises OSError when the socket fails,
        EOFError when the file ends before the piece does (it changed).
        (``os.sendfile`` measured slower here: docs/performance.md.)"""
        sent = 0
        while self.left:
            data = os.pread(self.fd, min(self.left, PREAD_SIZE), self.offset)
            if not data:
                raise EOFError("file piece: the file ended %d bytes early" % self.left)
            try:
                n = sock.send(data)
            except BlockingIOError:
                break
            self.offset += n
            self.left -= n
            sent += n
            if n < len(data):           # the socket is full
                break
        if not self.left:
            self.close()
        return sent

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            finally:
                done, self.on_close = self.on_close, None
                if done is not None:
                    done()

    def __del__(self):
        self.close()
