"""A load or a commit's Vote and Finish that the application's thread sends
(zeotwist.client.threadwrites) and reads (threadreads) itself, interrupted
by an exception a signal handler raises (KeyboardInterrupt, a timeout's
alarm) wherever it can land: the interrupted call raises it, and the
connection stays whole and read: no half frame on the wire without its
rest, no question waiting that was never asked, no socket left to a thread
that has gone or to nobody.  Afterwards the same connection answers the
next calls and lastTransaction follows other clients' commits.

A real server on 127.0.0.1, blocking clients on the background reactor.
Where the exception lands is decided by a trace function on the test's
thread (tests/test_interrupted_invalidations.py's, over Twisted's code as
well as zeotwist's: ``callFromThread``, the waker), for every place in
turn, not by timing; ``_PartSocket`` makes the socket take only part of the
thread's frame, as a full send buffer does.  ``_Refusing`` makes the send
lock's acquire raise, as a contended lock's wait does when a signal comes."""
import sys
import threading

import pytest
from ZODB.Connection import TransactionMetaData
from ZODB.utils import maxtid, z64

from tests.test_interrupted_invalidations import _Interrupt, _pending_on, _settled
from tests.test_review_races import _commit, _wait_for
from tests.test_review_threadreads import _parked, no_park_timer  # noqa: F401 (fixture)
from zeotwist.client.storagecommit import StorageCommitMixin
from zeotwist.client.threadreads import PARKED, ThreadReads
from zeotwist.client.threadwrites import ThreadWrites
from zeotwist.twistedcompat import amp_awaits_answers, calls_pending


def _traced(filename: str) -> bool:
    return "/zeotwist/" in filename or "/twisted/" in filename


class _Signal(_Interrupt):
    """_Interrupt in Twisted's code too, where the thread calls it; this
    module's socket stand-in counts as a C function (as the socket's own
    ``send`` is: the check after it is counted)."""

    def __call__(self, frame, event, arg):
        code = frame.f_code
        if frame.f_back is not None and code is not _PartSocket.send.__code__:
            self.entered.add(id(frame.f_back))
        if code is self.within:
            self.depth += 1
        elif not self.depth or not _traced(code.co_filename):
            return None
        frame.f_trace_opcodes = True
        self._count(frame)
        return self._local

    def _count(self, frame):
        if self.fired is None:
            self.seen += 1
            if self.seen == self.n:
                self.fired = "%s:%s" % (frame.f_code.co_name, frame.f_lineno)
                raise KeyboardInterrupt("at %d" % self.n)


class _PartSocket:
    """The connection's socket, whose next ``send`` from ``thread`` takes
    only ``take`` bytes (the rest must follow); the socket itself otherwise."""

    def __init__(self, sock, take: int, thread: int):
        self.sock, self.take, self.thread = sock, take, thread

    def send(self, data, *flags):
        if self.take and threading.get_ident() == self.thread:
            data, self.take = data[:self.take], 0
        return self.sock.send(data, *flags)

    def __getattr__(self, name):
        return getattr(self.sock, name)


class _Refusing:
    """A send lock whose ``n``-th acquire by ``thread`` raises (the signal
    handler's exception, the lock not taken)."""

    def __init__(self, lock, n: int, thread: int):
        self.lock, self.n, self.thread, self.fired = lock, n, thread, None

    def __enter__(self):
        self.acquire()

    def __exit__(self, *exc):
        self.lock.release()

    def acquire(self, *args):
        if self.n and threading.get_ident() == self.thread:
            self.n -= 1
            if not self.n:
                self.fired = "acquire"
                raise KeyboardInterrupt("acquire")
        return self.lock.acquire(*args)

    def release(self):
        self.lock.release()

    def locked(self):
        return self.lock.locked()


def _load(reader, x, serial):
    return reader.loadBefore(x, maxtid)


def _vote_finish(reader, x, serial):
    """A commit of x by ``reader`` (as ZODB does: abort after an exception)."""
    t = TransactionMetaData()
    reader.tpc_begin(t)
    reader.store(x, serial, b"by the reader", "", t)
    try:
        reader.tpc_vote(t)
        return reader.tpc_finish(t)
    except BaseException:
        reader.tpc_abort(t)
        raise


def _whole(reader, writer, proto, oids, serial, where) -> bytes:
    """The connection is the same and whole: nothing awaited, the socket
    read, the next load answered, another client's commit seen."""
    x, y, z = oids
    reactor = reader.client.reactor
    _wait_for(lambda: _settled(proto, reactor), where)
    _wait_for(lambda: not amp_awaits_answers(proto),
              lambda: "every question answered (%s)" % where())
    assert reader.client.protocol is proto, where()
    assert reader.tpc_transaction() is None, where()    # else every tpc_begin waits
    reader.client.cache.clear()
    assert reader.loadBefore(z, maxtid)[0] == b"z", where()
    writer.ping()
    serial = writer.loadBefore(x, maxtid)[1]
    new = _commit(writer, x, serial, b"by the writer")
    _wait_for(lambda: reader.lastTransaction() == new, where)
    assert reader.loadBefore(x, maxtid)[:2] == (b"by the writer", new), where()
    assert reader.client.protocol is proto, where()
    return new


def _setup(server, make_client):
    writer, reader = make_client(), make_client(timeout=10)
    oids = x, y, z = writer.new_oid(), writer.new_oid(), writer.new_oid()
    serial = _commit(writer, x, z64, b"x")
    _commit(writer, y, z64, b"y")
    _commit(writer, z, z64, b"z")
    reader.ping()
    return writer, reader, oids, serial


_ASK, _READ = ThreadWrites.ask_from_thread, ThreadReads.read_answer


_CASES = {"ask-whole": (_ASK, 0, False), "ask-part": (_ASK, 5, False),
          "read": (_READ, 0, False), "read-handed": (_READ, 0, True)}


@pytest.mark.parametrize("step, within, take, waiting", [
    (step,) + case for step in (_load, _vote_finish) for case in _CASES.values()] + [
    (_vote_finish, StorageCommitMixin.tpc_finish, 0, False)],
    ids=["load-" + name for name in _CASES] + ["commit-" + name for name in _CASES]
    + ["tpc_finish"])
def test_an_interrupt_anywhere_in_a_threads_round_trip(
        server, make_client, no_park_timer, step, within, take, waiting):  # noqa: F811
    """``take``: the socket takes the thread's frame whole, or 5 bytes of
    it (the rest handed to the reactor).  ``waiting``: another client's
    invalidation waits in the socket before the answer, which the reader
    hands to the reactor (a ``before_visible`` subscriber runs there)."""
    writer, reader, oids, serial = _setup(server, make_client)
    x, y, z = oids
    if waiting:
        reader.client.events.subscribe(lambda event: None, before_visible=True)
    me = threading.get_ident()
    n = misses = 0
    while True:
        n += 1
        proto = _parked(reader, y)
        if waiting:
            _commit(writer, z, writer.loadBefore(z, maxtid)[1], b"z")
            _wait_for(lambda: _pending_on(proto) and not calls_pending(reader.client.reactor),
                      "the invalidation came")
        transport = proto.transport
        sock = transport.socket
        transport.socket = _PartSocket(sock, take, me)
        interrupt = _Signal(within.__code__, n)
        where = lambda: "interrupted at %d of %d: %s" % (n, interrupt.seen, interrupt.fired)  # noqa: E731
        sys.settrace(interrupt)
        try:
            answer = step(reader, x, serial)
        except KeyboardInterrupt:
            answer = None
        finally:
            sys.settrace(None)
            transport.socket = sock
        assert (answer is None) == (interrupt.fired is not None), where()
        serial = _whole(reader, writer, proto, oids, serial, where)
        if interrupt.seen == 0:     # not this thread's path: again
            misses += 1
            assert misses < 50, "the thread never asked itself"
            n -= 1
        elif interrupt.fired is None:
            break
    assert n > 10, n


@pytest.mark.parametrize("step", [_load, _vote_finish], ids=["load", "commit"])
def test_an_interrupted_wait_for_the_send_lock(server, make_client, no_park_timer, step):  # noqa: F811
    """The thread's ``n``-th wait for the send lock (contended: the reactor
    writes) ends by a signal handler's exception, for every ``n``."""
    writer, reader, oids, serial = _setup(server, make_client)
    x, y, z = oids
    n, me = 0, threading.get_ident()
    while True:
        n += 1
        proto = _parked(reader, y)
        assert proto.read_state == PARKED
        lock = proto.send_lock
        refusing = proto.send_lock = _Refusing(lock, n, me)
        where = lambda: "interrupted at acquire %d: %s" % (n, refusing.fired)  # noqa: E731
        try:
            answer = step(reader, x, serial)
        except KeyboardInterrupt:
            answer = None
        finally:
            proto.send_lock = lock
        assert (answer is None) == (refusing.fired is not None), where()
        serial = _whole(reader, writer, proto, oids, serial, where)
        if refusing.fired is None:
            break
    assert n > 2, n


@pytest.mark.parametrize("within", [StorageCommitMixin.tpc_begin, StorageCommitMixin.tpc_abort],
                         ids=["tpc_begin", "tpc_abort"])
def test_an_interrupt_anywhere_in_a_transactions_begin_or_abort(server, make_client, within):
    """tpc_begin cut short anywhere, then tpc_abort (as ZODB does), or
    tpc_abort cut short anywhere: the next transaction begins and commits
    (none is left half begun or half ended, for which every later
    tpc_begin would wait)."""
    writer, reader, oids, serial = _setup(server, make_client)
    x = oids[0]
    n = 0
    while True:
        n += 1
        done = []
        worker = threading.Thread(target=_begin_abort_commit,
                                  args=(reader, within, n, x, serial, done), daemon=True)
        worker.start()
        worker.join(10)
        interrupt = done[0]
        assert len(done) == 2, "interrupted at %d: %s; the next tpc_begin waits" % (
            n, interrupt.fired)
        serial = done[1]
        if interrupt.fired is None:
            break
    assert n > 3, n


def _begin_abort_commit(reader, within, n, x, serial, done):
    """In a thread of its own (the test's bounds its wait): tpc_begin and
    tpc_abort, the ``n``-th place of ``within`` interrupted, then a commit."""
    t = TransactionMetaData()
    interrupt = _Signal(within.__code__, n)
    done.append(interrupt)
    sys.settrace(interrupt)
    try:
        try:
            reader.tpc_begin(t)
        finally:
            reader.tpc_abort(t)
    except KeyboardInterrupt:
        pass
    finally:
        sys.settrace(None)
    done.append(_commit(reader, x, serial, b"%d" % n))
