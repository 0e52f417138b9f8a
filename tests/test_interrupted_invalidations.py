"""Another client's invalidations applied by the application's own thread
(zeotwist.client.commitreads: a reader that finds them before its answer,
a transaction's start that finds them in the parked socket) when an
exception a signal handler raises (KeyboardInterrupt) lands while it
applies them: each is still applied once, in tid order, to the cache and
to every subscriber, and none is lost.

A real server on 127.0.0.1, blocking clients on the background reactor.
Where the exception lands is decided by a trace function on the test's
thread, not by timing: it raises at the n-th function call or line of
zeotwist's code inside the application step, for every n in turn, the way a
signal handler's exception is raised at the next call or line the thread
runs."""
import dis
import functools
import sys

import pytest
import ZODB
from ZODB.utils import maxtid, z64

from tests.test_review_races import _commit, _wait_for
from tests.test_review_threadreads import _parked, no_park_timer  # noqa: F401 (fixture)
from zeotwist.client.commitreads import CommitReads
from zeotwist.client.threadreads import PARKED, RETURNING
from zeotwist.twistedcompat import calls_pending

_OURS = "/zeotwist/"


class _Interrupt:
    """A trace function raising KeyboardInterrupt at the ``n``-th place
    where CPython (3.11) runs a signal handler in zeotwist's code while
    ``within`` (a code object) is on the thread's stack: a Python
    function's start, a loop's jump back, the return of a call to a
    function not written in Python."""

    def __init__(self, within, n: int):
        self.within, self.n, self.seen, self.depth = within, n, 0, 0
        self.fired, self.entered = None, set()

    def __call__(self, frame, event, arg):
        code = frame.f_code
        if frame.f_back is not None:
            self.entered.add(id(frame.f_back))      # its call was Python's
        if code is self.within:
            self.depth += 1
        elif not self.depth or _OURS not in code.co_filename:
            return None
        frame.f_trace_opcodes = True
        self._count(frame)
        return self._local

    def _local(self, frame, event, arg):
        if event == "return":
            if frame.f_code is self.within:
                self.depth -= 1
        elif event == "opcode" and self.depth:
            python = id(frame) in self.entered
            self.entered.discard(id(frame))
            backs, after_calls = _checks(frame.f_code)
            if frame.f_lasti in backs or frame.f_lasti in after_calls and not python:
                self._count(frame)
        return self._local

    def _count(self, frame):
        if self.fired is not None:
            return
        self.seen += 1
        if self.seen == self.n:
            self.fired = "%s:%d" % (frame.f_code.co_name, frame.f_lineno)
            raise KeyboardInterrupt("at %d" % self.n)


@functools.lru_cache(maxsize=None)
def _checks(code) -> tuple:
    """The offsets in ``code`` where the interpreter looks for a pending
    signal: backward jumps, and the instructions after a call (where it
    looks when the callee was not Python's)."""
    backs, after_calls, after_call = set(), set(), False
    for ins in dis.get_instructions(code):
        if ins.opname.startswith("JUMP_BACKWARD"):
            backs.add(ins.offset)
        if after_call:
            after_calls.add(ins.offset)
        after_call = ins.opname == "CALL"
    return frozenset(backs), frozenset(after_calls)


def _settled(proto, reactor) -> bool:
    return proto.read_state != RETURNING and not calls_pending(reactor)


@pytest.mark.parametrize("step", ["load", "catch_up"])
@pytest.mark.parametrize("on_threads", [True, False], ids=["applied", "handed-over"])
def test_an_interrupt_anywhere_while_the_thread_applies_invalidations(
        server, make_client, no_park_timer, step, on_threads):  # noqa: F811
    """``on_threads``: the subscribers may run on the application's thread,
    which applies the invalidations; else it hands them to the reactor."""
    writer, reader = make_client(), make_client(timeout=10)
    db, told = ZODB.DB(reader), []     # ClientStorage's own subscriber tells it (its MVCC adapter)
    adapter = reader._db
    invalidate = adapter.invalidate
    adapter.invalidate = lambda tid, oids: (told.append(tid), invalidate(tid, oids))
    x, y, z = writer.new_oid(), writer.new_oid(), writer.new_oid()
    serial = _commit(writer, x, z64, b"0")
    _commit(writer, y, z64, b"y")
    _commit(writer, z, z64, b"z")
    reader.ping()
    early, late, tids = [], [], []
    del told[:]
    reader.client.events.subscribe(early.append, before_visible=True, any_thread=on_threads)
    reader.client.events.subscribe(late.append)
    within = (CommitReads.take_invalidations if step == "load" else CommitReads.catch_up).__code__
    n = misses = 0
    while True:
        n += 1
        proto = _parked(reader, y)
        assert reader.load(x)[0] == b"%d" % len(tids)   # cached, current
        assert proto.read_state == PARKED
        serial = _commit(writer, x, serial, b"%d" % (len(tids) + 1))
        tids.append(serial)
        _wait_for(lambda: proto._rsock is not None and _pending_on(proto)
                  and not calls_pending(reader.client.reactor), "the invalidation came")
        interrupt = _Interrupt(within, n)
        where = lambda: "interrupted at %d of %d: %s" % (n, interrupt.seen, interrupt.fired)  # noqa: E731
        sys.settrace(interrupt)
        try:
            if step == "load":
                reader.loadBefore(z, maxtid)
            else:
                reader.lastTransaction()
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        assert reader.lastTransaction() == serial, where()     # what a next transaction sees
        reactor = reader.client.reactor
        _wait_for(lambda: _settled(proto, reactor), where)
        _wait_for(lambda: len(late) >= len(tids), where)
        assert [e.tid for e in early] == tids, where()
        assert [e.tid for e in late] == tids, where()
        assert [t for i, t in enumerate(told) if not i or told[i - 1] != t] == tids, where()
        assert reader.lastTransaction() == serial, where()
        cached = reader.client.cache.loadBefore(x, maxtid)
        assert cached is None or cached[0] == b"%d" % len(tids), where()
        if interrupt.seen == 0:     # not this thread's (the reactor applied it): again
            misses += 1
            assert misses < 50, "the thread never applied an invalidation"
            n -= 1
        elif interrupt.fired is None:
            break
    assert n > (60 if on_threads else 5)    # the trace saw the application's steps
    db.close()


def _pending_on(proto) -> bool:
    import select
    return bool(select.select([proto._rsock.fileno()], [], [], 0)[0])

