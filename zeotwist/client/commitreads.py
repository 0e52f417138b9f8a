"""A small commit's side of the thread reads: which commits' answers the
committing thread reads itself, the commits it makes visible, and a
transaction's start catching up with what has arrived.

The blocking ``ClientStorage`` sends a small commit's ``Vote`` and
``Finish`` from the committing thread (``ClientTransaction.vote_from_thread``,
``finish_from_thread``; :mod:`~zeotwist.client.threadwrites`), each waited
on as a :class:`~zeotwist.client.threadwrites.ThreadAnswer`.  While this
client's commits are *quiet* (no other client's commit came between its
last two ``Finish`` answers nor since: :meth:`CommitReads.commits_quiet`),
the committing thread reads the answer itself off the parked socket
(:mod:`~zeotwist.client.threadreads`); otherwise every invalidation would
make the reader hand the socket over (two more wake-ups), and the reactor
reads.

A ``Finish`` read so is made visible by the committing thread, as the
reactor would (the cache refreshed, ZODB's callback and the
``before_visible`` subscribers under the visibility lock, then the last
tid), under ``send_lock``: lock order ``send_lock``, then the visibility
lock, then ZODB's (which never call the storage while held).  The event's
second stage (reactor programs' subscribers) still runs on the reactor
thread, before the reactor handles any later box
(:meth:`CommitReads.publish_later`).  Only plain answers are read so: a
conflict, ``to_resolve`` or an error goes to the reactor.

Because a committer that read its own ``Finish`` can tell another thread of
its commit before the reactor has handled what else arrived,
:meth:`CommitReads.catch_up` makes a thread starting a transaction
(``lastTransaction``) wait for what has arrived so far to be handled.

:class:`CommitReads` is the ClientProtocol mixin above
:class:`~zeotwist.client.threadwrites.ThreadWrites`; its methods run on the
thread each says.
"""
import os
import select
import threading

from zeotwist.client.threadreads import PARKED, READ_SIZE, REACTOR, RETURNING
from zeotwist.client.threadwrites import ThreadWrites


class CommitReads(ThreadWrites):
    """The ClientProtocol mixin: the commit side of who reads the socket."""

    #: Invalidate boxes handled so far (reactor thread)
    invalidations = 0
    #: no other client's commit reached this one between its last two
    #: Finish answers: its commits' answers are read by the committing
    #: thread.  Else (others commit too) the reactor reads them, as every
    #: invalidation would make the reader hand over (two more wake-ups).
    quiet_commits = True
    _commits_mark = 0

    def commit_answered(self) -> None:
        """A Finish answer, on either thread: note whether the commits are quiet."""
        seen = self.invalidations
        self.quiet_commits, self._commits_mark = seen == self._commits_mark, seen

    def commits_quiet(self) -> bool:
        """Whether a commit's answers are for the committing thread to read:
        no other client's commit came in the last interval between two
        Finish answers, nor since."""
        return self.quiet_commits and self.invalidations == self._commits_mark

    def publish_later(self, stage_two, listened: bool) -> None:
        """A reading thread made its own commit visible, under the lock:
        the event's second stage (``stage_two()``: reactor programs'
        subscribers and waiters) runs on the reactor thread, before it
        handles any box it reads after this (:meth:`publish_pending` at
        every ``dataReceived``), at the latest at the park timer, and at
        once when someone ``listened``."""
        if not self._later:
            self._later = []
        self._later.append(stage_two)
        if listened and len(self._later) == 1:
            self.owner.reactor.callFromThread(self.publish_pending)

    def publish_pending(self) -> None:
        """Reactor thread: the second stage of what reading threads made
        visible, in order."""
        if not self._later:
            return
        with self.send_lock:
            later, self._later = self._later, ()
        for stage_two in later:
            stage_two()

    def catch_up(self, timeout: float) -> None:
        """A thread about to start a transaction (ZODB asks
        ``ClientStorage.lastTransaction``): what the server has sent so far
        (an invalidation) is handled before it goes on, so the transaction
        sees every commit whose invalidation has reached this client.

        * Parked: it waits in the socket (for up to ``PARK_CHECK`` or
          ``PARK_BUSY``: threadreads).  Read it now, hand it to the
          reactor and wait until the reactor has handled it.
        * The reactor reads, but has not read yet what waits in the socket
          (it is busy, or this thread got there first: a committer that
          read its own Finish answer, told by another thread or process of
          a commit, outruns the reactor): wait until the reactor has made
          a turn that read it (:func:`_after_a_turn`).

        Nothing to do (no wait) when nothing has arrived, while another
        thread reads (it hands what is not its own to the reactor), or when
        the reactor no longer runs (nobody would handle it)."""
        reactor = self.owner.reactor
        with self.send_lock:
            if self._gone or not reactor.running:
                return
            state = self.read_state
            handled = threading.Event()
            if state == PARKED and self._rsock is not None:
                data = _pending(self._rsock)
                if data == b"":
                    return
                self.read_state = RETURNING     # the reactor reads again, after ``data``
                reactor.callFromThread(self._take_back_then, data or b"", handled.set)
            elif state in (REACTOR, RETURNING) and _arrived(self.transport):
                reactor.callFromThread(_after_a_turn, reactor, handled.set)
            else:
                return
        handled.wait(timeout)

    def _take_back_then(self, data: bytes, then) -> None:
        try:
            self._take_back(data)
        finally:
            then()


def _arrived(transport) -> bool:
    """Whether bytes wait unread in ``transport``'s socket (asked from a
    thread while the reactor may close it: False then)."""
    try:
        fd = transport.getHandle().fileno()
        return fd >= 0 and bool(select.select([fd], [], [], 0)[0])
    except (AttributeError, OSError, ValueError):
        return False


def _after_a_turn(reactor, then) -> None:
    """Reactor thread: call ``then`` after the reactor's next look at its
    descriptors.  A ``callLater(0)`` made here may still run in this same
    round of calls (before any socket is read); one made from it waits for
    the next round, which comes after the reactor has polled and read."""
    reactor.callLater(0, reactor.callLater, 0, then)


def _pending(sock) -> bytes | None:
    """What has arrived on ``sock`` so far, without waiting: ``b""`` when
    nothing has, None at the connection's end or error (the reactor meets
    it when it reads again)."""
    data, fd = b"", sock.fileno()
    while True:
        try:    # the descriptor is non-blocking; sock.recv would wait its timeout first
            chunk = os.read(fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return data
        except OSError:
            return data or None
        if not chunk:
            return data or None
        data += chunk
