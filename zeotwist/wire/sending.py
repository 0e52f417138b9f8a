"""How an AMP connection of zeotwist writes its boxes.

:class:`BatchedSender`, a base of :class:`~zeotwist.wire.framing.BoundedAMP`
(which parses what comes in), sends every box through :meth:`~BatchedSender.emit`:

* the answers to a burst of pipelined requests go out in one write, once
  the burst is handled (``BoundedAMP.dataReceived`` collects them), and a
  commit's TpcBegin, StoreData and Vote in one (:meth:`~BatchedSender.corked`);
* a value of ``BULK_MIN`` bytes or more is written from its own object,
  not copied into a frame (:meth:`~BatchedSender.emit_parts`), and a box with
  ``LongBytes`` values as long entries to a peer that reads them;
* an idle socket is written at once (:func:`write_now`), not a reactor
  turn later.

Runs on the reactor thread (a subclass may order :meth:`~BatchedSender.write_out`
with writes from another thread: zeotwist.client.threadwrites).
"""
from twisted.protocols import amp

from zeotwist import transportcompat, twistedcompat
from zeotwist.fileio import FilePiece
from zeotwist.wire.boxlayout import box_parts

#: A burst's answers are written together up to this many bytes.
BATCH_FLUSH_BYTES = 2**20
#: A value this long is sent from its own object, not copied into a frame
#: (``BoundedAMP.emit_parts``).
BULK_MIN = 2**20


class BatchedSender:
    """The sending side of :class:`~zeotwist.wire.framing.BoundedAMP`: a
    base of an ``amp.AMP`` whose ``dataReceived`` collects answers in
    ``_batch`` while it handles a burst, and sets ``_violated`` once it
    drops the link (nothing more is written then)."""

    #: the peer reads long entries (it said so in Register or its answer)
    long_values = False
    _violated = False
    _batch = None
    _batch_bytes = 0

    def sendBox(self, box) -> None:
        if twistedcompat.amp_switched(self):
            raise amp.ProtocolSwitched("This connection has switched: no AMP traffic allowed.")
        if self.transport is None:
            raise amp.ConnectionLost()
        if self.long_values and any(len(v) > amp.MAX_VALUE_LENGTH for v in box.values()):
            self.emit_parts(*box_parts(box))        # a LongBytes value, one long entry
        else:
            self.emit(box.serialize())

    def emit(self, frame: bytes) -> None:
        """Send serialized boxes, in order with every other box.

        While incoming data is being handled, frames are collected and sent
        with one write when it is done: a burst of pipelined requests gets
        its answers in one system call instead of one each.
        """
        batch = self._batch
        if batch is not None:
            batch.append(frame)
            self._batch_bytes += len(frame)
            if self._batch_bytes >= BATCH_FLUSH_BYTES and self.transport is not None:
                # big answers: written as they come, not joined into one
                # copy of everything the burst produced
                self.write_out(b"".join(batch))
                batch.clear()
                self._batch_bytes = 0
        elif self.transport is not None:
            self.write_out(frame)

    def flush_batch(self) -> None:
        """Write what this burst collected so far now, not at its end (an
        answer that should not wait for the rest of the burst's work)."""
        batch = self._batch
        if batch and self.transport is not None and not self._violated:
            data = b"".join(batch) if len(batch) > 1 else batch[0]
            batch.clear()
            self._batch_bytes = 0
            self.write_out(data)

    def write_out(self, data: bytes) -> None:
        """Where every byte this protocol sends goes (one place, so a
        subclass can order it with writes from another thread)."""
        write_now(self.transport, data)

    def emit_parts(self, head: bytes, value: bytes, tail: bytes) -> None:
        """Send the frame ``head + value + tail``, in order with every other
        box, without copying a big ``value`` into it: the head (and any
        frames collected before it) goes out first, then the transport
        sends ``value`` from the object itself (``adopt_output``), then the
        tail.  A value under ``BULK_MIN`` bytes is simply joined; a
        ``FilePiece`` (a socket transport only: ``transportcompat.sends_files``)
        is queued as such and sent from its file."""
        if len(value) < BULK_MIN and type(value) is not FilePiece:
            self.emit(b"".join((head, value, tail)))
            return
        transport = self.transport
        if transport is None:
            return
        batch = self._batch
        if batch:                               # what the burst answered before
            batch.append(head)
            head = b"".join(batch)
            batch.clear()
            self._batch_bytes = 0
        write_now(transport, head)
        if type(value) is FilePiece:            # sent from its file, in its turn
            transportcompat.queue_file_piece(transport, value)
        elif not transportcompat.adopt_output(transport, value):
            transport.write(value)              # queued behind others: Twisted joins
        write_now(transport, tail)

    def corked(self) -> "_Cork":
        """``with proto.corked(): ...``: the boxes sent inside go out in one
        write at the end (a commit's TpcBegin, StoreData and Vote: one
        system call and one packet instead of three).  Inside a burst that
        is already collected (``dataReceived``), it adds nothing."""
        return _Cork(self)

class _Cork:
    """The context manager of :meth:`BatchedSender.corked`."""

    __slots__ = ("proto", "batch")

    def __init__(self, proto: BatchedSender):
        self.proto, self.batch = proto, None

    def __enter__(self) -> None:
        if self.proto._batch is None:
            self.batch = self.proto._batch = []
            self.proto._batch_bytes = 0

    def __exit__(self, *exc) -> None:
        proto, batch = self.proto, self.batch
        if batch is None:
            return
        proto._batch = None
        if batch and proto.transport is not None and not proto._violated:
            proto.write_out(b"".join(batch) if len(batch) > 1 else batch[0])


def write_now(transport, data: bytes) -> None:
    """Write ``data``, trying the socket at once when nothing is queued.

    ``transport.write`` only buffers until the next reactor turn; for
    request/response traffic that costs a whole extra turn per message.  When
    the transport's buffer is empty we hand the bytes to the socket directly
    and queue only what it did not take, so ordering is unchanged.
    """
    # Only a real socket transport: a wrapper such as TLS's forwards unknown
    # attributes to the socket under it, whose writeSomeData bypasses TLS.
    if getattr(type(transport), "writeSomeData", None) is None:
        transport.write(data)
        return
    if not transportcompat.nothing_queued(transport):
        transport.write(data)
        return
    sent = transportcompat.send_some(transport, data)   # 0 after an error: the
    if sent < len(data):                                # transport reports it
        transport.write(data[sent:] if sent else data)
