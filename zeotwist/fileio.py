"""Writing blob pieces to files in slices of 64 KiB.

Blob pieces travel in 1 MiB (``wire.commands.BLOB_CHUNK_LONG``,
``BLOB_LOAD_MAX``); written whole, each write asks the kernel's page cache
for folios of up to 1 MiB, which on a VM whose freed memory is fragmented
come from fresh memory, far slower to provide than reused pages
(docs/performance.md, "Blobs: where the time and the spread come from").
ZEO 6 writes 59,000 bytes at a time.  The slices are views of the piece:
no copy.

Runs in the caller's thread (the reactor's, for both the client's blob
cache file and the server's spool).
"""
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
