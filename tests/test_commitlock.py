"""The commit lock: FIFO, withdrawal, timeout (pure logic, Clock-driven)."""
from twisted.internet.task import Clock

from zeotwist.server.commitlock import CommitLock


class Owner:
    """A lock owner (a session in the server); compared by identity."""

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


a, b, c = Owner("a"), Owner("b"), Owner("c")


def test_fifo_order_and_release():
    lock = CommitLock(Clock())
    got = []
    for owner in (a, b, c):
        lock.acquire(owner).addCallback(lambda _, o=owner: got.append(o))
    assert got == [a] and lock.holder == a and lock.waiting() == 2
    lock.release(a)
    assert got == [a, b]
    lock.release(b)
    lock.release(c)
    assert got == [a, b, c] and lock.holder is None


def test_withdrawn_waiter_is_skipped():
    lock = CommitLock(Clock())
    got = []
    lock.acquire(a)
    lock.acquire(b).addCallback(lambda _: got.append(b))
    lock.acquire(c).addCallback(lambda _: got.append(c))
    lock.release(b)            # b leaves the queue (its client went away)
    lock.release(a)
    assert got == [c] and lock.holder == c


def test_cancel_withdraws():
    lock = CommitLock(Clock())
    lock.acquire(a)
    d = lock.acquire(b)
    d.addErrback(lambda f: None)
    d.cancel()
    assert lock.waiting() == 0
    lock.release(a)
    assert lock.holder is None


def test_double_acquire_is_an_error():
    lock = CommitLock(Clock())
    lock.acquire(a)
    try:
        lock.acquire(a)
    except RuntimeError:
        pass
    else:
        raise AssertionError("second acquire by the holder was accepted")


def test_timeout_reports_the_holder_once():
    clock = Clock()
    expired = []
    lock = CommitLock(clock, timeout=2.0, on_timeout=expired.append)
    lock.acquire(a)
    lock.acquire(b)
    clock.advance(1.9)
    assert expired == []
    clock.advance(0.2)
    assert expired == [a]
    lock.release(a)            # what the session does after dropping a
    assert lock.holder == b
    clock.advance(1.0)
    assert expired == [a]      # b's clock started when it got the lock
    clock.advance(1.1)
    assert expired == [a, b]


def test_release_cancels_timer():
    clock = Clock()
    expired = []
    lock = CommitLock(clock, timeout=2.0, on_timeout=expired.append)
    lock.acquire(a)
    lock.release(a)
    clock.advance(10)
    assert expired == [] and clock.getDelayedCalls() == []
