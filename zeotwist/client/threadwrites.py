"""A blocking load, or a small commit's Vote and Finish, that costs one
thread hand-off instead of two.

Through :func:`~zeotwist.client.reactorthread.blocking_call`, a cold
``ClientStorage.loadBefore`` wakes the reactor thread (``callFromThread``:
an eventfd write and one more ``epoll`` return), which writes the request;
the answer wakes the application thread again.  Here the application thread
writes the ``LoadBefore`` frame to the socket itself and waits on a lock
that the reactor thread releases from the answer handler, with no Deferred
in between: the reactor wakes once per load, for the answer.

Twisted's transports are not thread-safe, so the application thread only
ever calls the socket's ``send`` (:func:`~zeotwist.transportcompat.socket_send`), and only

* under :attr:`ThreadWrites.send_lock`, which every write of the protocol
  on the reactor thread also takes (:meth:`ThreadWrites.write_out`);
* when the transport holds nothing still to be written
  (:func:`~zeotwist.transportcompat.idle_seen_from_thread`), so the frame
  cannot overtake bytes written before it;
* on a plain socket transport (TLS, in-memory and other transports: no);

else it returns None and the caller takes the ``callFromThread`` path.  A
frame the socket takes only in part is handed to the reactor thread
(:meth:`ThreadWrites._flush_handoff`), and every write the reactor makes
meanwhile queues behind that rest.  The question's tag is registered before
the frame leaves, under the same lock that ``connectionLost`` takes before
AMP fails every outstanding question, so a lost connection always fails the
load (:class:`ClientDisconnected`) and never strands it.  An exception a
signal handler raises while the thread sends (KeyboardInterrupt) leaves
neither half a frame without its rest nor a question that was never sent
(:meth:`ThreadWrites._cut_short`).

The same path (:meth:`ThreadWrites.ask_from_thread` and :class:`ThreadAnswer`)
carries a small commit's round trips (``ClientTransaction.vote_from_thread``,
``finish_from_thread``): the answer is parsed and handled on the reactor
thread exactly as on the Deferred path (the cache refreshed, ZODB's
``tpc_finish`` callback run under the visibility lock), then the committing
thread wakes.

The answer is read on the reactor thread in arrival order, like every other
box, and stored in the cache there before the next box (an invalidation)
is read: the MVCC argument of the Deferred path holds unchanged.  While a
thread loads object after object, the thread reads its load's answer
itself instead, in the same order (:mod:`~zeotwist.client.threadreads`).
"""
import itertools
import threading
import time
from _thread import allocate_lock

from twisted.python.failure import Failure

from zeotwist import transportcompat, twistedcompat
from zeotwist.client import longreads
from zeotwist.client.threadreads import (MORE, PARKED, RETURNING, THREAD, ThreadReads,
                                         parse_load_answer, whole_answer)
from zeotwist.errors import ClientDisconnected
from zeotwist.wire import loadframes

#: tags of questions asked from other threads ("t1", "t2", ... never AMP's
#: own hexadecimal ones); ``next`` on a count is atomic
_thread_tags = itertools.count(1)


class ThreadWrites(ThreadReads):
    """The ClientProtocol mixin: writes from the reactor and from other threads
    (and, :class:`~zeotwist.client.threadreads.ThreadReads`, who reads)."""

    send_lock = None         # set in connectionMade
    _handoff = None          # a frame's rest (and writes queued behind it), for the reactor
    _gone = False            # connectionLost began: no more questions from threads

    def start_thread_writes(self) -> None:
        self.send_lock = allocate_lock()

    def write_out(self, data: bytes) -> None:
        lock = self.send_lock
        if lock is None:
            return super().write_out(data)
        with lock:
            self.reactor_writes()               # its answer: read by the reactor
            if self._handoff is not None:
                self._handoff.append(data)      # behind a thread's unfinished frame
            else:
                super().write_out(data)

    def emit_parts(self, head: bytes, value: bytes, tail: bytes) -> None:
        """A frame around a big value (``BoundedAMP.emit_parts``, and
        ``sendBox`` of a long value): joined and sent through
        :meth:`write_out`, so it takes the lock and queues behind a thread's
        unfinished frame.  The server's way, the value handed to the socket
        itself, writes past both (no command a client sends has such a
        value today: this keeps it so if one comes)."""
        if self.send_lock is None:
            return super().emit_parts(head, value, tail)
        self.emit(b"".join((head, value, tail)))

    def _flush_handoff(self) -> None:
        """Reactor thread: write what a thread's frame left, then what queued behind it."""
        with self.send_lock:
            rest, self._handoff = self._handoff, None
            if rest and self.transport is not None:
                super().write_out(b"".join(rest))

    def stop_thread_writes(self) -> None:
        """connectionLost, before AMP fails the outstanding questions."""
        if self.send_lock is not None:
            with self.send_lock:
                self._gone = True
                self.stop_thread_reads()

    def load_before_from_thread(self, oid: bytes, tid: bytes, store, make_room=None):
        """From a thread other than the reactor's: send LoadBefore and return a
        :class:`ThreadLoad` to wait on, or None (send it the usual way).
        ``store(oid, start, end, data)`` is called on the reactor thread
        with the record found, before the waiter wakes; ``make_room(size)``,
        before a big record of ``size`` bytes is read (ClientCache.make_room)."""
        tag = thread_tag()
        load = ThreadLoad(self, tag, oid, store, make_room)
        return load if self.ask_from_thread(loadframes.load_before_request(tag, oid, tid), load,
                                            True) else None

    def ask_from_thread(self, frame: bytes, receiver, read: bool = False) -> bool:
        """From a thread other than the reactor's: send ``frame`` (which
        ends with the question ``receiver.tag``, from :func:`thread_tag`),
        its answer to go to ``receiver`` (a ``_ThreadWaiter``); False, with
        nothing sent, when this thread may not write now.  With ``read``,
        ``receiver.reading`` says whether the thread is to read the answer
        itself (threadreads).  An exception a signal handler raises in here
        is raised with the connection whole (:meth:`_cut_short`)."""
        transport, lock = self.transport, self.send_lock
        send = None if lock is None else transportcompat.socket_send(transport)
        if send is None:
            return False
        with lock:
            if self._gone or self._handoff is not None or twistedcompat.amp_closed(self) \
                    or not transportcompat.idle_seen_from_thread(transport):
                return False
            state, sent = self.read_state, []
            try:
                if receiver is not None:        # None: a one-way frame (send_from_thread)
                    receiver.reading = self.thread_asks(read)   # who reads the answer
                    twistedcompat.amp_expect_answer_from_thread(self, receiver.tag, receiver)
                try:    # what the socket took is appended inside C (list.extend
                    sent.extend(map(send, (frame,)))    # of map): never lost
                except OSError:
                    sent.append(0)              # full, or an error the reactor finds too
                if sent[0] < len(frame):
                    self._handoff = [frame[sent[0]:]]
                    self.owner.reactor.callFromThread(self._flush_handoff)
            except BaseException:
                self._cut_short(frame, receiver, sent, state)
                raise
        return True

    def _cut_short(self, frame: bytes, receiver, sent: list, state: str) -> None:
        """Under the lock: :meth:`ask_from_thread` cut short by a signal
        handler's exception (the read state was ``state`` before, ``sent``
        holds what the socket took of ``frame``, if it was sent).  Part of
        the frame went: the rest follows, as it would have (the answer
        comes, to the reactor).  None of it: the question and the frame are
        taken back, and the socket this thread took to read the answer.
        Either way nothing is left half sent or waiting for nothing, and
        the socket is read."""
        went = sent[0] if sent else 0
        if went:
            if went < len(frame) and self._handoff is None:
                self._handoff = [frame[went:]]
            if self._handoff is not None:       # (queued again: it writes once)
                self.owner.reactor.callFromThread(self._flush_handoff)
        else:
            self._handoff = None                # (None when the thread began)
            if receiver is not None:
                twistedcompat.amp_forget_answer(self, receiver.tag, receiver)
        if state != PARKED or receiver is None:
            return                              # thread_asks changed nothing
        if self.read_state == THREAD and self._reader == threading.get_ident():
            if went:                            # the reactor reads the answer
                self._hand_back([], None)
            else:                               # nothing asked, nothing read
                self.read_state = PARKED
        elif self.read_state == RETURNING:      # thread_asks' hand-back, once more
            self._hand_back([], None)

    def send_from_thread(self, frame: bytes) -> bool:
        """:meth:`ask_from_thread` for a frame of one-way boxes (a small
        blob's StoreBlobChunk, ``ClientTransaction.send_blob_from_thread``)."""
        return self.ask_from_thread(frame, None)


def thread_tag() -> bytes:
    """A question tag for a thread other than the reactor's."""
    return b"t%x" % next(_thread_tags)


class _ThreadWaiter:
    """What ThreadAnswer and ThreadLoad share: they stand where AMP keeps a
    question's Deferred; the thread that asked waits on :attr:`lock`, which
    is released once ``result`` or ``error`` is set: by the reactor thread,
    or by the asking thread itself when it reads the answer (``reading``,
    threadreads: ``own_answer`` recognises it in the bytes, ``take``
    handles it)."""

    __slots__ = ("proto", "tag", "lock", "result", "error", "reading")

    def __init__(self, proto, tag: bytes):
        self.proto, self.tag = proto, tag
        self.lock = allocate_lock()
        self.lock.acquire()
        self.result = self.error = None
        self.reading = False        # the waiting thread reads the answer (threadreads)

    def addErrback(self, *args, **kw):
        return self

    def _failure(self, error: Exception) -> Exception:
        """The error to raise in the waiting thread for ``error``."""
        return error

    def retake(self, found) -> None:
        """threadreads: ``take`` was cut short by a signal handler's
        exception, which the thread raises next: nothing more here (a load's
        records are a cache miss at worst)."""

    def errback(self, reason) -> None:
        from zeotwist.client.protocol import convert_failure
        error = convert_failure(reason if isinstance(reason, Failure) else Failure(reason))
        self.error = self._failure(error)
        self.lock.release()

    def wait(self, timeout: float | None):
        """The answer (what ``result`` holds), or raise the error;
        TimeoutError after ``timeout``."""
        if self.reading:
            self.reading = False
            start = time.monotonic()
            self.proto.read_answer(self, timeout)
            if timeout is not None:
                timeout -= time.monotonic() - start
        if not self.lock.acquire(True, -1 if timeout is None else max(timeout, 0.0)):
            raise TimeoutError(timeout)
        if self.error is not None:
            raise self.error
        return self.result


class ThreadAnswer(_ThreadWaiter):
    """Stands where AMP keeps a question's Deferred for a question asked
    from another thread (a commit's Vote or Finish): on the reactor thread,
    the answer box goes through ``parse(box)`` and ``then(value)`` (an
    error answer or a lost connection through ``failed(error)``, which
    returns the error to raise), then the waiting thread wakes.  The answer
    is handled even when the waiter has stopped waiting (its timeout): a
    Finish the server answers late is still a commit the cache must learn
    of, as on the Deferred path (ClientTransaction.finish).

    With ``here`` (``(match, then)``), the asking thread may read the
    answer itself (threadreads): ``match(bytes, tag)`` reads the plain
    answer from the bytes (None for anything else, which the reactor then
    handles as above) and ``then(value)`` runs in that thread, under the
    protocol's send lock."""

    __slots__ = ("name", "parse", "then", "failed", "here")

    def __init__(self, proto, tag: bytes, name: str, parse, then, failed, here=None):
        super().__init__(proto, tag)
        self.name, self.parse, self.then, self.failed = name, parse, then, failed
        self.here = here

    def callback(self, box) -> None:
        proto = self.proto
        proto.thread_answered()         # the next one is read by the thread
        try:
            value = self.parse(box)
        except Exception as e:
            self.proto.protocolViolation("bad %s answer: %s" % (self.name, e))
            self.error = ClientDisconnected("bad answer from server: %s" % e)
            self.lock.release()         # the waiting thread raises it now
        else:
            self._then(self.then, value)

    def _then(self, then, value) -> None:
        try:
            self.result = then(value)
        except Exception as e:
            self.error = e
        self.lock.release()

    def _failure(self, error: Exception) -> Exception:
        return self.failed(error)

    def own_answer(self, buf: bytes):
        """threadreads: the plain answer parsed when ``buf`` is all of it."""
        value = self.here[0](buf, self.tag)
        if value is not None:
            return value
        return MORE if whole_answer(buf, self.tag) is MORE else None

    def take(self, value) -> None:
        """threadreads: the answer ``own_answer`` found, read by the asking thread."""
        self._then(self.here[1], value)

    def retake(self, value) -> None:
        """``take`` cut short by a signal handler's exception: ``then`` once
        more, whatever it did already (a commit made visible is re-runnable,
        each step once: Client.make_visible), or the commit, answered and
        consumed, would never reach the cache (nobody sends a client its own
        commit's invalidation)."""
        try:
            self.result = self.here[1](value)
        except Exception as e:
            self.error = e


def answer_matcher(parse):
    """A ThreadAnswer's ``here[0]`` for a command answered as AMP does:
    ``match(buf, tag)`` is ``parse(box)`` when ``buf`` is exactly the plain
    answer box ``tag``, else None (a malformed one too: the reactor reads
    it and drops the link)."""
    def match(buf: bytes, tag: bytes):
        found = whole_answer(buf, tag)
        if found is None or found is MORE:
            return None
        try:
            return parse(found)
        except Exception:
            return None
    return match


def read_load_answer(proto, box):
    """``(data, start, end)`` or None from a LoadBefore answer; its
    prefetched records go to the cache first.  Raises on a malformed one."""
    value, records = parse_load_answer(box, proto)
    if records is not None:
        proto.owner.prefetched(proto, records)
    return value


class ThreadLoad(_ThreadWaiter):
    """Stands where AMP keeps a question's Deferred (see ``_LoadAnswer`` in
    :mod:`~zeotwist.client.protocol`) for a load asked from another
    thread: the answer is parsed and stored on the reactor thread, then
    the waiting thread is woken by releasing :attr:`lock`."""

    __slots__ = ("oid", "store", "make_room")

    def __init__(self, proto, tag: bytes, oid: bytes, store, make_room=None):
        super().__init__(proto, tag)
        self.oid, self.store, self.make_room = oid, store, make_room

    def callback(self, box) -> None:
        proto = self.proto
        try:
            value = read_load_answer(proto, box)
        except Exception as e:
            proto.protocolViolation("bad LoadBefore answer: %s" % e)
            self.error = ClientDisconnected("bad answer from server: %s" % e)
            self.lock.release()
        else:
            self.answered(value)

    def answered(self, value) -> None:
        """The answer, read on the reactor thread: ``(data, start, end)`` or
        None; stored, then the thread woken."""
        self.proto.thread_answered()
        self.stored(value)

    def own_answer(self, buf: bytes):
        """threadreads: ``(record, prefetched records or None)`` when
        ``buf`` is exactly the whole answer to this load; a
        :class:`~zeotwist.client.longreads.LongAnswer` when it begins one
        whose record is a long entry (the reader reads the rest through it)."""
        match = loadframes.match_load_before_answer(buf, 0)
        if match is not None:               # the usual answer, read from the bytes
            own = match[0] == self.tag and match[2] == len(buf)
            return (match[1], None) if own else None
        long = longreads.start(buf, self.tag, self.proto.maxBoxBytes, self._parse,
                               self.make_room)
        if long is not None:                # a big record: read into its own bytes
            return long
        box = whole_answer(buf, self.tag)
        if box is None or box is MORE:
            return box
        try:                                # with prefetched records, or cut in pieces
            return self._parse(box)
        except Exception:
            return None                     # the reactor drops the connection for it

    def _parse(self, box) -> tuple:
        return parse_load_answer(box, self.proto)

    def take(self, found) -> None:
        """threadreads: the answer, read by the loading thread: its
        prefetched records and its record into the cache, then wake."""
        value, records = found
        if records is not None:
            self.proto.owner.prefetched(self.proto, records)
        self.stored(value)

    def stored(self, value) -> None:
        """Store the answer ``value``, then wake the thread."""
        if value is not None:
            data, start, end = value
            self.store(self.oid, start, end, data)
        self.result = value
        self.lock.release()
