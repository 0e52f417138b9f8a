"""A blocking load, or a small commit's Vote and Finish, whose answer the
asking thread reads itself.

With :mod:`~zeotwist.client.threadwrites` alone a cold
``ClientStorage.loadBefore`` wakes two threads per answer: the reactor
thread (``epoll`` returns, it reads and stores the answer) and then the
application thread (a lock the reactor releases; the thread then waits
for the GIL the reactor still holds).  Here, while one thread loads object
after object, or commits transaction after transaction, the reactor thread
stops reading the socket (it is *parked*) and the loading or committing
thread reads its own answer: ``send``, ``recv`` (a ``poll`` inside), no
other thread woken.

Who reads the socket is one state, changed under ``send_lock`` (the lock
every write takes, see threadwrites):

* ``REACTOR``: the reactor reads, as always.  After a burst in which it
  handed a thread its load's answer, with nothing else awaited (no
  question outstanding, no partial box buffered, nothing queued to
  write), the reactor stops reading: ``PARKED``.
* ``PARKED``: nobody reads.  The next thread load, Vote or Finish (when
  the thread may write, threadwrites' conditions) makes its thread the
  reader: ``THREAD``.  Every write the reactor makes (a question of its
  own, an abort, anything) and a timer take the socket back (``REACTOR``);
  a thread's question that reads nothing asks the reactor to
  (``RETURNING``).  The timer looks ``PARK_CHECK`` seconds after the
  reactor parked the socket, then every ``PARK_BUSY`` seconds while a
  thread keeps reading (it reads, or took the socket since the last look:
  its next question reads whatever came meanwhile), and takes the socket
  back at the first look that finds no thread has taken it since the last.
  So an idle client reads what the server sends (invalidations, a lost
  connection) at most ``PARK_CHECK`` late, or ``PARK_BUSY`` late right after
  a run of thread reads.
* ``THREAD``: one thread reads.  Any other question (the reactor's,
  another thread's load or vote) is still sent, and the reader hands the
  socket back after its own answer.  The reader consumes the bytes it
  received only when they are exactly the whole answer to its own
  question: it stores the record (and the records prefetched with it) in
  the cache, then goes back to ``PARKED``.  Anything else it received (an
  invalidation before its answer, another question's answer, the end of
  the connection, a timeout) it hands to the reactor thread untouched, in
  order: ``RETURNING``, then ``REACTOR`` once the reactor has taken those
  bytes (it handles them before it reads the socket again), and the
  reader waits for its answer as a thread load without reading does.

MVCC: the reader stores its answer before it stops reading, and it
consumes bytes only when its answer is all of them, so every box is
still handled in arrival order and an answer reaches the cache before
any invalidation that follows it.  What is particular to a commit's Vote
and Finish (which commits the thread reads, a Finish made visible by the
committing thread, a transaction's start catching up) is in
:mod:`~zeotwist.client.commitreads`.  The reader reads through a duplicate
of the socket's descriptor: Twisted may close its own while a thread is
in ``recv``, and the number must not be reused under the reader; the
connection's loss shuts that duplicate down, which wakes the reader.
"""
import os
import socket
import threading
import time

from twisted.protocols import amp

from zeotwist import transportcompat, twistedcompat
from zeotwist.client.longreads import MORE, LongAnswer
from zeotwist.wire import boxlayout, loadframes, prefetch

REACTOR, PARKED, THREAD, RETURNING = "reactor", "parked", "thread", "returning"
# MORE (``own_answer``): the bytes so far are the start of a box, not all of it
#: seconds from parking to the reactor's first look at the socket
PARK_CHECK = 0.002
#: seconds between its looks while a thread keeps reading: looks every
#: PARK_CHECK woke the reactor (and made it take the GIL) every other
#: commit of a committing thread (docs/performance.md)
PARK_BUSY = 0.016
#: bytes one ``recv`` of the reading thread asks for
READ_SIZE = 2**16
_ONE_READ = (READ_SIZE,)
#: a reader that holds this many bytes of an unfinished box hands them over
READ_LIMIT = 2**20
#: the reading socket's timeout: a wait without a deadline wakes this often
_SLICE = 60.0
#: the shortest (a timeout of 0 would make the socket non-blocking)
_MIN_WAIT = 0.001


class ThreadReads:
    """The ClientProtocol mixin (under ThreadWrites, and CommitReads, whose
    ``publish_pending`` it calls): who reads the socket."""

    read_state = REACTOR
    _give_back = False      # THREAD: the reactor wrote; the reader hands the socket back
    _answered_thread = False   # this burst handed a thread load its answer
    _park_timer = None
    _thread_took = False    # a thread took the parked socket since the timer's last look
    _reader = None          # the thread that took it (THREAD)
    _rsock = None           # the reader's duplicate of the socket
    _rsock_timeout = _SLICE
    _later = ()             # commits made visible by reading threads (commitreads)
    _returning = None       # RETURNING: the list of bytes the reactor is to take (_hand_back)

    # -- the reactor thread ------------------------------------------------------
    def thread_answered(self) -> None:
        """A thread's load, vote or finish was answered on the reactor
        thread (this burst)."""
        self._answered_thread = True

    def maybe_park(self) -> None:
        """At the end of a burst: stop reading if a thread's load was
        answered in it and nothing else is awaited."""
        if not self._answered_thread:
            return
        self._answered_thread = False
        transport = self.transport
        with self.send_lock:
            if self.read_state != REACTOR or not self._may_park(transport):
                return
            if self._rsock is None:
                try:
                    self._rsock = self.reading_socket(transport)
                except OSError:
                    return
            transport.stopReading()
            self.read_state, self._thread_took = PARKED, False
        self._park_timer = self.owner.reactor.callLater(PARK_CHECK, self._park_check)

    def reading_socket(self, transport) -> socket.socket:
        """The reader's own socket object: a duplicate of the transport's
        descriptor (same connection, same non-blocking mode)."""
        rsock = socket.socket(fileno=os.dup(transport.getHandle().fileno()))
        rsock.settimeout(_SLICE)
        return rsock

    def _may_park(self, transport) -> bool:
        """Nothing awaited but what a thread will ask: no question out, no
        partial box, nothing queued to write, a plain socket transport."""
        return (transport is not None and not self._gone and self._handoff is None
                and getattr(self, "_greeting", None) is None and not self._violated
                and not twistedcompat.amp_awaits_answers(self)
                and self._buf == b"" and self._box is None and self._long is None
                and self._batch is None
                and getattr(type(transport), "writeSomeData", None) is not None
                and hasattr(transport, "getHandle")
                and transportcompat.idle_seen_from_thread(transport))

    def _park_check(self) -> None:
        self._park_timer = None
        with self.send_lock:
            state, took, self._thread_took = self.read_state, self._thread_took, False
            if state == PARKED and not took:
                self._unpark()
            elif state in (PARKED, THREAD) and not self._gone:     # a thread keeps reading
                self._park_timer = self.owner.reactor.callLater(PARK_BUSY, self._park_check)
        self.publish_pending()

    def _unpark(self) -> None:
        """PARKED or RETURNING -> REACTOR (reactor thread, under the lock)."""
        self.read_state, self._give_back = REACTOR, False
        timer, self._park_timer = self._park_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        transport = self.transport
        if transport is not None and transport.connected and not transport.disconnecting:
            transport.startReading()
        if self._later:     # no timer now, maybe no box to come (a one-way write)
            self.owner.reactor.callLater(0, self.publish_pending)

    def reactor_writes(self) -> None:
        """Every write on the reactor thread, under the lock: whatever it
        asks, the answer comes back on a socket the reactor must read."""
        state = self.read_state
        if state == PARKED:
            self._unpark()
        elif state == THREAD:
            self._give_back = True

    def _hand_back(self, got: list, then) -> None:
        """Under the lock, from THREAD or PARKED: RETURNING, the reactor
        reads again, the bytes in ``got`` (read from the socket; a
        ``LongAnswer`` stands for its bytes) first, then calls ``then()``
        (unless None).  An exception a signal handler raises may cut this
        short anywhere (before the state is set, the call queued, the
        reactor woken): the caller then calls it again with the same list,
        and the reactor takes the bytes once (the last hand-back queued is
        the one it takes: ``_returning``)."""
        self.read_state = RETURNING
        self._returning = got
        self.owner.reactor.callFromThread(self._take_back_from, got, then)

    def _take_back_from(self, got: list, then) -> None:
        """RETURNING -> REACTOR: the bytes handed over come before any the
        reactor reads next.  A hand-back queued again (or one a later
        hand-back replaced) takes nothing and changes nothing."""
        try:
            with self.send_lock:
                if self._returning is not got:
                    return
                self._returning = None
                if self.read_state == RETURNING:
                    self._unpark()
                gone = self._gone
            data = got[0].received() if len(got) == 1 and type(got[0]) is LongAnswer \
                else b"".join(got)
            got.clear()
            if data and not gone and self.transport is not None:
                self.dataReceived(data)
        finally:
            if then is not None:
                then()

    def stop_thread_reads(self) -> None:
        """connectionLost, under the lock: wake the reader, if any (it
        closes the duplicate socket), else close it."""
        timer, self._park_timer = self._park_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        rsock = self._rsock
        if rsock is None:
            return
        if self.read_state == THREAD:
            try:
                rsock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        else:
            self._rsock = None
            rsock.close()

    # -- the reading thread ------------------------------------------------------
    def thread_asks(self, read: bool) -> bool:
        """Under the lock, as a thread's question goes out: True when that
        thread (``read``: it would) is to read the answer; else the reactor
        reads it, taking the socket back if need be."""
        state = self.read_state
        if state == PARKED:
            if read:
                reader = threading.get_ident()
                self.read_state, self._thread_took, self._reader = THREAD, True, reader
                return True
            self._hand_back([], None)       # the reactor reads again, soon
        elif state == THREAD:
            self._give_back = True          # after the reader's answer
        return False

    def read_answer(self, waiter, timeout: float | None) -> None:
        """The reader's part of ``waiter.wait()``: read until the whole
        answer to ``waiter`` (a ThreadLoad, or a ThreadAnswer: a commit's
        Vote or Finish) is in, have it ``take`` it here, or hand what came
        to the reactor.  Raises TimeoutError after ``timeout``, or what a
        signal handler raised while the thread waited (then the bytes read
        so far went to the reactor, which handles the answer when it comes)."""
        data, found, error = self._receive(waiter, timeout)
        try:
            own = False
            with self.send_lock:    # which connectionLost takes: see _own_receiver
                try:
                    receiver = None if found is None else self._own_receiver(waiter.tag)
                    if receiver is not None:
                        own = True          # its bytes are consumed, whatever take raises
                        try:
                            receiver.take(found)
                        except BaseException:   # a signal handler's, cutting it short:
                            receiver.retake(found)  # what it left undone, then raised
                            raise
                finally:                    # never leave the socket to this thread
                    handed = [b"" if own else data]
                    try:
                        rsock = self._done_reading(handed, own)
                    except BaseException:   # cut short: once more (the bytes go once)
                        rsock = self._done_reading(handed, own)
                        raise
        except BaseException:   # also one that ended the wait for the lock (contended):
            self.reader_gone(data)  # the bytes read go to the reactor all the same
            raise
        if rsock is not None:
            rsock.close()
        if error is not None:
            raise error

    def reader_gone(self, data=b"") -> None:
        """The asking thread leaves with an exception (a signal handler's)
        that landed after its question made it the reader and before its
        read began, or ended its wait for the lock after it read ``data``
        (once read_answer holds the lock, it hands the socket back itself):
        the socket and ``data`` go back to the reactor, which reads the
        answer, else nobody would read this connection again."""
        with self.send_lock:
            if self.read_state != THREAD or self._reader != threading.get_ident():
                return
            rsock = self._done_reading([data], False)
        if rsock is not None:
            rsock.close()

    def _own_receiver(self, tag: bytes):
        """Under the lock: the receiver to ``take`` the reader's answer
        here (a load's record and the records prefetched with it into the
        cache; a Finish's commit made visible); None once the connection is
        gone (its error waits).  The lock keeps a lost connection's
        ``connectionLost`` (and so the next connection's verification of
        the cache) behind the take: a record stored after that verification
        would stay current for good, stale, its invalidation lost with the
        connection."""
        return None if self._gone else twistedcompat.amp_take_receiver(self, tag, "take")

    def _receive(self, waiter, timeout: float | None) -> tuple:
        """``(bytes, found, error)``: ``found`` is what ``waiter.own_answer``
        made of the bytes when they are exactly the whole answer it waits
        for, else None; ``error``, None or what the reader raises once the
        bytes are handed over: TimeoutError, or what a signal handler
        raised in ``recv`` or while the reader looked at the bytes
        (KeyboardInterrupt, an alarm's exception).  A big record's answer is
        read through a ``longreads.LongAnswer``, which then stands for the bytes."""
        sock, got, long = self._rsock, [], None
        deadline = None if timeout is None else time.monotonic() + timeout
        wait = _wait(timeout)       # the same at every load: no settimeout call
        try:
            while True:
                if self._rsock_timeout != wait:
                    self._set_timeout(wait)
                came = None         # None: nothing (a timeout); False: the end
                try:
                    if long is not None:
                        came = long.receive(sock)
                    else:
                        # Appended inside C (list.extend of map): an exception
                        # a signal handler raises once recv returned cannot
                        # drop the chunk, as it could between ``chunk =
                        # recv()``'s call and its assignment.
                        got.extend(map(sock.recv, _ONE_READ))
                        came = bool(got[-1])
                except TimeoutError:
                    pass
                except OSError:
                    return long or b"".join(got), None, None    # the reactor meets it too
                if deadline is not None:    # what is left, at most
                    left = deadline - time.monotonic()
                    if came is None and left <= 0:
                        return long or b"".join(got), None, TimeoutError(timeout)
                    wait = _wait(left)
                if came is None:
                    continue
                if not came:
                    return long or b"".join(got), None, None    # the end: the reactor's too
                if long is not None:        # a big record, read into its own bytes
                    found = long.answer()
                    if found is not MORE:
                        return long, found, None
                    continue
                if len(got) > 1:
                    got[:] = [b"".join(got)]
                if self.take_invalidations(got) and not got:    # other clients' commits
                    continue
                found = waiter.own_answer(got[0])
                if type(found) is LongAnswer:
                    long = found
                elif found is not MORE:
                    return got[0], found, None
                elif len(got[0]) >= READ_LIMIT:
                    return got[0], None, None
        except BaseException as e:  # a signal handler's, wherever it lands: else the
            return long or b"".join(got), None, e   # socket would stay the thread's

    def _set_timeout(self, seconds: float) -> None:
        self._rsock.settimeout(seconds)
        self._rsock_timeout = seconds

    def _done_reading(self, handed: list, own: bool):
        """Under the lock: THREAD -> PARKED when the reader handled its
        ``own`` answer, else RETURNING: the bytes in ``handed`` (none when
        they were its own) and the socket handed to the reactor; called
        again with the same list if an exception cut it short.  The
        reading socket to close, once the connection is gone, else None."""
        if self._gone:
            rsock, self._rsock = self._rsock, None
            self.read_state = REACTOR
            return rsock
        if not own or self._give_back:
            self._hand_back(handed, None)
        else:
            self.read_state = PARKED
        return None


def _wait(left: float | None) -> float:
    """The reading socket's timeout for ``left`` seconds (None: no
    deadline): a slice of them, never more than left (nor 0: non-blocking)."""
    return _SLICE if left is None else min(max(left, _MIN_WAIT), _SLICE)


def scan_box(buf: bytes) -> tuple:
    """``(end, box)``: where the AMP box at the start of ``buf`` ends and
    the box; ``(0, None)`` while it is not whole; ``(-1, None)`` for a box
    with a long entry (the reactor reads those)."""
    off, n, box = 0, len(buf), amp.AmpBox()
    while off + 2 <= n:
        klen = (buf[off] << 8) | buf[off + 1]
        if klen == 0:
            return off + 2, box
        if klen == boxlayout.LONG_MARK:
            return -1, None
        kend = off + 2 + klen
        if kend + 2 > n:
            return 0, None
        vend = kend + 2 + ((buf[kend] << 8) | buf[kend + 1])
        if vend > n:
            return 0, None
        box[buf[off + 2:kend]] = buf[kend + 2:vend]
        off = vend
    return 0, None


def whole_answer(buf: bytes, tag: bytes):
    """The answer box ``tag`` when ``buf`` is exactly that whole box;
    MORE while the box at its start is not whole yet; else None."""
    end, box = scan_box(buf)
    if end == 0:
        return MORE
    return box if end == len(buf) and box.get(amp.ANSWER) == tag else None


def parse_load_answer(box, proto) -> tuple:
    """``(record, prefetched records or None)`` from a LoadBefore answer
    box (``record``: ``(data, start, end)`` or None); raises on a malformed one."""
    value = loadframes.read_load_before_answer(box, proto)
    return value, (prefetch.decode(box[b"prefetch"]) if b"prefetch" in box else None)
