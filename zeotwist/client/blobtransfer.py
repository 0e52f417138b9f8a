"""Blob transfers over one connection, with bounded memory on both ends.

* :class:`BlobUpload` sends one file as ``StoreBlobChunk`` messages.  It is
  a streaming producer registered with the connection's transport: it
  reads and sends a chunk whenever the transport's buffer has drained and
  stops when the transport says it is full, so a blob of any size costs the
  client about one chunk (60 KB; 1 MiB to a server that reads long entries)
  of memory, whatever the network's speed.
  It always begins in a reactor turn of its own: boxes sent while incoming
  data is being handled are held back until that is done
  (``BoundedAMP.emit``), where no transport could pause it.
* :class:`BlobUploads` runs a transaction's uploads one after another.
* :class:`BlobDownload` pulls a committed blob with ``LoadBlobChunk``
  requests of 1 MiB, 4 in flight (120 KB, 16 in flight, from an older
  server), and writes each chunk to a file, in order, as it arrives: the
  server never holds more than those few chunks for us.
* :func:`first_piece_from_thread`: the thread that loads a blob asks for
  its first piece itself (and may read the answer itself), as a cold load
  does (:mod:`~zeotwist.client.threadwrites`): a blob of one piece costs
  no reactor thread hand-off; a bigger one continues in a BlobDownload.

A transfer may last long (a big blob, a slow network), so rather than a
deadline for the whole of it, both kinds take an ``idle_timeout``: they fail
with ClientDisconnected when they make no progress for that long.

Runs on the reactor thread (the file reads and writes included: sequential
pieces of at most 1 MiB of local files), except first_piece_from_thread.
"""
from collections import deque

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.protocols import amp
from twisted.python.failure import Failure
from ZODB.POSException import StorageError
from zope.interface import implementer

from zeotwist import transportcompat, twistedcompat
from zeotwist.client.threadwrites import ThreadAnswer, answer_matcher, thread_tag
from zeotwist.errors import ClientDisconnected
from zeotwist.fileio import write_sliced
from zeotwist.wire import commands as C
from zeotwist.wire import commitframes

#: LoadBlobChunk requests kept in flight by one download, and the most
#: bytes they ask for together.
DOWNLOAD_WINDOW = 16
DOWNLOAD_BYTES = 4 * 2**20


class ProgressWatchdog:
    """Calls ``stalled()`` once if ``progress()`` (a growing count) stays the
    same for ``timeout`` seconds; does nothing when ``timeout`` is None."""

    def __init__(self, reactor, timeout, progress, stalled):
        self.reactor, self.timeout = reactor, timeout
        self.progress, self.stalled = progress, stalled
        self._call = None
        self._seen = None

    def start(self) -> None:
        if self.timeout:
            self._seen = self.progress()
            self._call = self.reactor.callLater(self.timeout, self._check)

    def _check(self) -> None:
        now = self.progress()
        if now != self._seen:
            self._seen = now
            self._call = self.reactor.callLater(self.timeout, self._check)
        else:
            self._call = None
            self.stalled()

    def stop(self) -> None:
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()


@implementer(IPushProducer)
class BlobUpload:
    """Send the file at ``path`` as blob file ``number`` of the transaction
    open on ``proto``; :meth:`start` fires once the last chunk is handed
    to the transport (or fails with ClientDisconnected or an OSError)."""

    def __init__(self, reactor, proto, number: int, path: str, chunk: int | None = None,
                 idle_timeout: float | None = None):
        self.reactor = reactor
        self.proto = proto
        self.number = number
        self.path = path
        #: a server that reads long entries takes chunks of 1 MiB in one value
        self.long_values = getattr(proto, "long_values", False)
        self.chunk = chunk or (C.BLOB_CHUNK_LONG if self.long_values else C.BLOB_CHUNK)
        self.sent = 0
        self._watchdog = ProgressWatchdog(reactor, idle_timeout, lambda: self.sent,
                                          self._stalled)
        self._file = None
        self._transport = None
        self._paused = False
        self._done = None

    def start(self) -> Deferred:
        d = self._done = Deferred()
        self.reactor.callLater(0, self._begin)
        self._watchdog.start()
        return d

    def _stalled(self) -> None:
        self._end(Failure(ClientDisconnected(
            "blob upload made no progress for %g s" % self._watchdog.timeout)))

    def cancel(self, why: str) -> None:
        """Stop now (the transaction is aborted): no chunk is sent after this."""
        self._end(Failure(ClientDisconnected(why)))

    def _begin(self) -> None:
        if self._done is None:          # cancelled before it began
            return
        transport = self.proto.transport
        if transport is None:
            self._end(Failure(ClientDisconnected("not connected while uploading a blob")))
            return
        try:
            self._file = open(self.path, "rb")
        except OSError:
            self._end(Failure())
            return
        try:
            transport.registerProducer(self, True)   # stops us at once if disconnected
        except Exception:       # another producer (a bug): fail, do not hang
            self._end(Failure())
            return
        self._transport = transport
        transportcompat.bulk_sends(transport)           # a chunk in one send, not eight
        if self._done is not None:
            self.resumeProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        first = self.sent == 0
        while not self._paused and self._file is not None:
            try:
                data = self._file.read(self.chunk)
            except OSError:
                self._end(Failure())
                return
            if data or first:       # an empty blob is still one (empty) chunk
                self.proto.emit(commitframes.store_blob_chunk(self.number, data, self.long_values))
                self.sent += len(data)
                first = False
            if len(data) < self.chunk:
                self._end(None)

    def pauseProducing(self) -> None:
        self._paused = True

    def stopProducing(self) -> None:
        """The connection is going away."""
        self._end(Failure(ClientDisconnected("connection lost while uploading a blob")))

    def _end(self, failure) -> None:
        self._watchdog.stop()
        f, self._file = self._file, None
        if f is not None:
            f.close()
        # Unregister whatever the transport did before (it clears its own
        # producer when the connection is lost); a TLS transport registers a
        # wrapper of us, so we cannot compare ``transport.producer``.
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.unregisterProducer()
        d, self._done = self._done, None
        if d is not None:
            d.callback(self.sent) if failure is None else d.errback(failure)


class BlobUploads:
    """The uploads of one transaction, run in the order they were added."""

    def __init__(self, reactor):
        self.reactor = reactor
        self._queue: deque = deque()
        self._running = False
        self._idle_waiters: list = []
        self.failure = None      # the first upload that failed

    def add(self, proto, number: int, path: str, idle_timeout: float | None = None) -> Deferred:
        d = Deferred()
        self._queue.append((proto, number, path, idle_timeout, d))
        if not self._running:
            self._next()
        return d

    def _next(self) -> None:
        if not self._queue:
            self._running = False
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)
            return
        self._running = True
        proto, number, path, idle_timeout, d = self._queue.popleft()
        if self.failure is not None:          # the transaction is lost anyway
            d.errback(self.failure)
            self._next()
            return
        upload = self._current = BlobUpload(self.reactor, proto, number, path,
                                            idle_timeout=idle_timeout)
        upload.start().addBoth(self._ended, d)

    _current = None     # the upload running

    def cancel(self, why: str) -> None:
        """The transaction is aborted: stop the running upload and drop the
        queued ones (each fails), so that no chunk follows the Abort."""
        if self.failure is None:
            self.failure = Failure(ClientDisconnected(why))
        current, self._current = self._current, None
        if current is not None:
            current.cancel(why)

    def _ended(self, result, d) -> None:
        self._current = None
        if isinstance(result, Failure) and self.failure is None:
            self.failure = result
        d.callback(result) if not isinstance(result, Failure) else d.errback(result)
        self._next()

    def idle(self) -> Deferred | None:
        """A fresh Deferred fired when no upload is left, or None if none is."""
        if not self._running:
            return None
        d = Deferred()
        self._idle_waiters.append(d)
        return d


class BlobDownload:
    """Write blob (``oid``, ``serial``) to the binary file object ``f``;
    :meth:`start` fires with the blob's size.  Cancelling stops it (no
    write happens after the cancellation)."""

    def __init__(self, proto, oid: bytes, serial: bytes, f, window: int = DOWNLOAD_WINDOW,
                 chunk: int = C.BLOB_LOAD_MAX, reactor=None,
                 idle_timeout: float | None = None):
        self.proto = proto
        self._answers = 0
        self._watchdog = ProgressWatchdog(reactor, idle_timeout if reactor else None,
                                          lambda: self._answers, self._stalled)
        self.oid = oid
        self.serial = serial
        self.f = f
        self.window = max(1, min(window, DOWNLOAD_BYTES // chunk))
        #: asked for with ``length``; a server that ignores it (an older
        #: one) answers BLOB_LOAD_CHUNK, which the first answer shows
        self.chunk = chunk
        self.size = None
        self._written = 0           # bytes written to f
        self._asked = 0             # next offset to request
        self._arrived: dict = {}    # offset -> data, arrived out of order
        self._in_flight = 0
        self._done = None

    def start(self, first: dict | None = None) -> Deferred:
        """Begin; ``first``: the answer to the first piece (offset 0, asked
        for with ``length`` = ``chunk``), already received
        (:func:`first_piece_from_thread`)."""
        d = self._done = Deferred(lambda d: self._stop())
        self._watchdog.start()
        if first is None:
            self._ask()             # the first answer tells the size
        else:
            self._asked, self._in_flight = self.chunk, 1
            self._got(first, 0)
        return d

    def _stalled(self) -> None:
        self._finish(Failure(ClientDisconnected(
            "blob download made no progress for %g s" % self._watchdog.timeout)))

    def _ask(self) -> None:
        offset = self._asked
        self._asked += self.chunk
        self._in_flight += 1
        d = self.proto.call(C.LoadBlobChunk, oid=self.oid, serial=self.serial, offset=offset,
                            length=self.chunk)
        d.addCallbacks(self._got, self._failed, (offset,))

    def _got(self, answer, offset) -> None:
        self._in_flight -= 1
        self._answers += 1
        if self._done is None:
            return
        data, size = answer["data"], answer["size"]
        if self.size is None:           # the first answer, alone in flight
            self.size = size
            if self.chunk > len(data) == C.BLOB_LOAD_CHUNK < size:
                self.chunk = self._asked = C.BLOB_LOAD_CHUNK     # a server without length
                self.window = max(1, min(DOWNLOAD_WINDOW, DOWNLOAD_BYTES // self.chunk))
        expected = min(self.chunk, self.size - offset)
        if size != self.size or len(data) != max(expected, 0):
            self._finish(Failure(StorageError(
                "blob %s/%s changed on the server while it was read"
                % (self.oid.hex(), self.serial.hex()))))
            return
        self._arrived[offset] = data
        try:
            while self._written in self._arrived:
                piece = self._arrived.pop(self._written)
                write_sliced(self.f, piece)
                self._written += len(piece)
                if not piece:
                    break
        except OSError:
            self._finish(Failure())
            return
        if self._written >= self.size:
            self._finish(self.size)
            return
        while self._in_flight < self.window and self._asked < self.size:
            self._ask()

    def _failed(self, failure) -> None:
        self._in_flight -= 1
        if self._done is not None:
            self._finish(failure)

    def _stop(self) -> None:
        self._watchdog.stop()
        self._done = None           # cancelled: ignore whatever still arrives

    def _finish(self, result) -> None:
        self._watchdog.stop()
        d, self._done = self._done, None
        if d is not None:
            d.callback(result) if not isinstance(result, Failure) else d.errback(result)


def first_piece_from_thread(client, oid: bytes, serial: bytes):
    """From a thread other than the reactor's: send the LoadBlobChunk of
    blob (``oid``, ``serial``)'s first piece (``BLOB_LOAD_MAX`` bytes at
    most) from this thread over ``client``'s connection; a
    ``ThreadAnswer`` to ``wait()`` on (its result: the answer, ``{"data",
    "size"}``), or None when this thread may not send it (as
    ``Client.load_from_thread``: not connected, calls handed to the
    reactor before, ``ThreadWrites.ask_from_thread``).  A plain answer
    (under 64 KiB) may be read by this thread itself (threadreads); any
    other (a long entry, an error) is read by the reactor, as usual."""
    proto = client.connector.protocol
    if proto is None or twistedcompat.calls_pending(client.reactor):
        return None
    tag = thread_tag()
    box = C.LoadBlobChunk.makeArguments(
        dict(oid=oid, serial=serial, offset=0, length=C.BLOB_LOAD_MAX), proto)
    box[amp.COMMAND] = C.LoadBlobChunk.commandName
    box[amp.ASK] = tag

    def parse(answer_box):
        return C.LoadBlobChunk.parseResponse(answer_box, proto)

    answer = ThreadAnswer(proto, tag, "LoadBlobChunk", parse, _same, _same,
                          (answer_matcher(parse), _same))
    return answer if proto.ask_from_thread(box.serialize(), answer, True) else None


def _same(value):
    return value
