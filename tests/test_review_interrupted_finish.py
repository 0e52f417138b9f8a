"""A committing thread that reads its own Finish answer (threadreads) and is
interrupted by a signal handler's exception (KeyboardInterrupt) while it
makes its commit visible (Client.committed): the commit is on the server,
so the client's cache must not keep serving the old revision of what it
wrote once its view moves past that commit (nobody sends a client its own
commit's invalidation); and one landing before the thread's read began
(read_answer's first lines) must leave the socket to the reactor, or
nobody reads the connection again.  Where the exception lands is decided
by the trace function of tests/test_interrupted_invalidations.py, not by
timing."""
import sys

import pytest
from ZODB.utils import maxtid, z64

from tests.test_interrupted_invalidations import _Interrupt
from tests.test_review_races import _commit, _wait_for
from zeotwist.client.client import Client
from zeotwist.client.threadreads import ThreadReads
from zeotwist.client.threadwrites import ThreadAnswer


class _At(_Interrupt):
    """test_interrupted_invalidations' trace, which fails (TypeError) where
    a frame between two lines has no line number (f_lineno None)."""

    def _count(self, frame):
        if self.fired is None and self.seen + 1 == self.n:
            self.seen += 1
            self.fired = "%s:%s" % (frame.f_code.co_name, frame.f_lineno)
            raise KeyboardInterrupt("at %d" % self.n)
        if self.fired is None:
            self.seen += 1


@pytest.mark.parametrize("within", [Client.committed, ThreadAnswer.take, ThreadReads.read_answer],
                         ids=["committed", "take", "read_answer"])
def test_an_interrupt_while_the_thread_makes_its_own_commit_visible(server, make_client, within):
    committer, other = make_client(timeout=10), make_client()
    x, y = committer.new_oid(), committer.new_oid()
    serial = _commit(committer, x, z64, b"0")
    other_serial = _commit(other, y, z64, b"y")
    n = misses = commits = 0
    data = b"0"
    while True:
        n += 1
        committer.ping()
        assert committer.loadBefore(x, maxtid)[0] == data     # cached, current
        commits += 1
        data = b"%d" % commits
        interrupt = _At(within.__code__, n)
        sys.settrace(interrupt)
        try:
            new = _commit(committer, x, serial, data)
        except KeyboardInterrupt:
            new = None
        finally:
            sys.settrace(None)
        where = "interrupted at %d of %d: %s" % (n, interrupt.seen, interrupt.fired)
        other.ping()
        if new is None:     # the server has it all the same
            new = other.loadBefore(x, maxtid)[1]
            assert other.loadBefore(x, maxtid)[0] == data
        serial = new
        # another client's commit moves the committer's view past its own
        other_serial = _commit(other, y, other_serial, b"y%d" % n)
        _wait_for(lambda: committer.lastTransaction() >= other_serial, where)
        assert committer.loadBefore(x, maxtid)[0] == data, where
        if interrupt.seen == 0:     # the reactor made it visible: not this thread
            misses += 1
            assert misses < 50, "the thread never made its own commit visible"
            n -= 1
            continue
        if interrupt.fired is None:
            break
    assert n > 20, n
