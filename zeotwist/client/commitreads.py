"""A small commit's side of the thread reads: which commits' answers the
committing thread reads itself, the commits it makes visible, and a
transaction's start catching up with what has arrived.

The blocking ``ClientStorage`` sends a small commit's ``Vote`` and
``Finish`` from the committing thread (``ClientTransaction.vote_from_thread``,
``finish_from_thread``; :mod:`~zeotwist.client.threadwrites`), each waited
on as a :class:`~zeotwist.client.threadwrites.ThreadAnswer`, and reads the
answer itself off the parked socket (:mod:`~zeotwist.client.threadreads`).

Other clients' commits (plain ``Invalidate`` boxes) that come before a
reading thread's answer, or wait in the parked socket when a transaction
starts (:meth:`CommitReads.catch_up`), are applied by that thread, in
arrival order, as the reactor applies them (:meth:`CommitReads.take_invalidations`:
the cache, ``before_visible`` subscribers such as ZODB's ``DB.invalidate``
under the visibility lock, then the last tid; the second stage on the
reactor thread), so they cost no hand-over to the reactor: without that,
every invalidation made the reader hand the socket over (two more
wake-ups), and the committing thread read only while no other client
committed.

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
(``lastTransaction``) wait for what has arrived so far to be handled: what
waits in the socket, and what the reactor has taken out of it but not yet
handled (it is inside the transport's ``doRead``: ``recv`` gives up the GIL,
and the thread can run between that ``recv`` and the boxes' handling;
:meth:`CommitReads.track_reactor_reads`).

:class:`CommitReads` is the ClientProtocol mixin above
:class:`~zeotwist.client.threadwrites.ThreadWrites`; its methods run on the
thread each says.
"""
import os
import select
import threading

from twisted.python.failure import Failure

from zeotwist.client.threadreads import PARKED, READ_SIZE, REACTOR, RETURNING
from zeotwist import transportcompat
from zeotwist.client.threadwrites import ThreadWrites
from zeotwist.wire import commitframes


class CommitReads(ThreadWrites):
    """The ClientProtocol mixin: the commit side of who reads the socket."""

    #: Invalidate boxes applied so far (by the reactor or a reading thread)
    invalidations = 0
    #: the reactor is inside the transport's ``doRead`` (track_reactor_reads)
    reactor_reading = False

    def track_reactor_reads(self) -> None:
        """connectionMade: mark :attr:`reactor_reading` while the reactor
        reads this connection's socket and handles what it read (the
        socket transport's ``doRead``; under TLS, the one the TLS transport
        reads through)."""
        transportcompat.marked_reads(self.transport, self, "reactor_reading")

    def take_invalidations(self, got: list, locked: bool = False) -> bool:
        """A reading thread: apply the plain Invalidate boxes at the start of
        ``got[0]`` (bytes read), in order, as the reactor's ``ampBoxReceived``
        would, and drop them from ``got`` (the rest goes on as before: the
        reader's answer, or bytes for the reactor); False when there were
        none.  Under ``send_lock`` (``locked``: the caller holds it), as the
        reader's own answer: a lost connection's ``connectionLost`` (and the
        next connection's verification of the cache) comes after, never
        between.  An owner without ``invalidated_by_thread``, or with a
        ``before_visible`` subscriber that must run on the reactor thread
        (``events_on_threads``), leaves them to the reactor.

        An exception a signal handler raises in this thread
        (KeyboardInterrupt) may land anywhere in here: before the boxes are
        dropped from ``got`` it leaves them all to the reactor; after, each
        is still applied once (what it cut short is done again, each step
        once: ``Client.make_visible``), and the exception is raised after."""
        apply = getattr(self.owner, "invalidated_by_thread", None)
        if apply is None or commitframes.match_invalidate(got[0]) is None \
                or not getattr(self.owner, "events_on_threads", True):
            return False
        if not locked:
            with self.send_lock:
                return self.take_invalidations(got, True)
        buf, found, off = got[0], [], 0
        while not self._gone:
            match = commitframes.match_invalidate(buf, off)
            if match is None:
                break
            found.append(match)
            off = match[2]
        count, rest = len(found), [buf[off:]] if off < len(buf) else []
        done, again, cut = 0, -1, None
        while done < count:
            try:
                if got and got[0] is buf:
                    got[:] = rest       # the boxes are this thread's from here
                    self.invalidations += count
                while done < count:
                    tid, oids, _ = found[done]
                    apply(self, tid, oids, self.publish_later)
                    done += 1
            except BaseException as e:
                if got and got[0] is buf:
                    raise               # none taken: all left to the reactor
                if again != done:       # once more: the rest of what it cut short
                    again, cut = done, cut or e
                else:                   # it raised twice: as the reactor's path
                    done += 1           # would, the connection is dropped
                    self.owner.reactor.callFromThread(self.unhandledError, Failure(e))
        if cut is not None:
            raise cut
        return count > 0

    def publish_later(self, stage_two, listened: bool) -> None:
        """A reading thread made its own commit visible, under the lock:
        the event's second stage (``stage_two()``: reactor programs'
        subscribers and waiters; ``stage_two.args[0]``, the event) runs on
        the reactor thread, before it handles any box it reads after this
        (:meth:`publish_pending` at every ``dataReceived``), at the latest
        at the park timer, and at once when someone ``listened``.  The same
        event again (take_invalidations after an interruption) is dropped."""
        later = self._later
        if later and later[-1].args[0] == stage_two.args[0]:
            return
        if not later:
            self._later = later = []
        later.append(stage_two)
        if listened and len(later) == 1:
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
          a commit, outruns the reactor), or has read it but is still
          handling it (:attr:`reactor_reading`): wait until the reactor has
          made a turn that read and handled it (:func:`_after_a_turn`).

        Nothing to do (no wait) when nothing has arrived, while another
        thread reads (it hands what is not its own to the reactor), or when
        the reactor no longer runs (nobody would handle it)."""
        reactor = self.owner.reactor
        with self.send_lock:
            if self._gone or not reactor.running:
                return
            state = self.read_state
            if state == PARKED and self._rsock is not None:
                got = []
                try:
                    ended = _pending(self._rsock, got)
                    if len(got) > 1:
                        got[:] = [b"".join(got)]
                    if got:         # other clients' commits: applied here
                        self.take_invalidations(got, True)
                    if not got and not ended:   # the usual case: no Event made
                        return
                    handled = threading.Event()
                    self._hand_back(got, handled.set)
                except BaseException:   # a signal handler's: what was read is not lost
                    self._hand_back(got, None)
                    raise
            elif state == RETURNING or (state == REACTOR and (
                    # this order: bytes the socket no longer holds were read
                    # by a doRead that is still marked, or that has handled them
                    _arrived(self.transport) or self.reactor_reading)):
                # (RETURNING: a reader's bytes wait in the reactor's queue)
                handled = threading.Event()
                reactor.callFromThread(_after_a_turn, reactor, handled.set)
            else:
                return
        handled.wait(timeout)


def _arrived(transport) -> bool:
    """Whether bytes wait unread in ``transport``'s socket (the one under
    TLS; asked from a thread while the reactor may close it: False then)."""
    try:
        fd = transportcompat.reading_transport(transport).getHandle().fileno()
        return fd >= 0 and bool(select.select([fd], [], [], 0)[0])
    except (AttributeError, OSError, ValueError):
        return False


def _after_a_turn(reactor, then) -> None:
    """Reactor thread: call ``then`` after the reactor's next look at its
    descriptors.  A ``callLater(0)`` made here may still run in this same
    round of calls (before any socket is read); one made from it waits for
    the next round, which comes after the reactor has polled and read."""
    reactor.callLater(0, reactor.callLater, 0, then)


def _pending(sock, got: list) -> bool:
    """Append to ``got`` what has arrived on ``sock`` so far, without
    waiting; True at the connection's end or an error (the reactor meets it
    when it reads again).  Each chunk is appended inside C (list.extend of
    map), as the reader's: an exception a signal handler raises once a read
    returned cannot drop it."""
    fd, size = (sock.fileno(),), (READ_SIZE,)
    while True:
        try:    # the descriptor is non-blocking; sock.recv would wait its timeout first
            got.extend(map(os.read, fd, size))
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True
        if not got[-1]:
            return True
