"""The commit lock: FIFO, withdrawal, timeout (pure logic, Clock-driven)."""
from twisted.internet.task import Clock

from zeotwist.server.commitlock import PARK_GRACE, CommitLock


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


def test_one_timer_looks_at_the_holder_of_its_time(monkeypatch):
    """Holders that release in time leave one timer (not one each, set and
    cancelled); a later holder times out at its own deadline."""
    clock = Clock()
    expired, timers = [], []
    real = clock.callLater
    monkeypatch.setattr(clock, "callLater", lambda *a: timers.append(a[1]) or real(*a))
    lock = CommitLock(clock, timeout=2.0, on_timeout=expired.append)
    for _ in range(10):                 # a holder every 0.5 s, each for 0.1 s
        lock.acquire(a)
        clock.advance(0.1)
        lock.release(a)
        clock.advance(0.4)
    assert len(timers) <= 3 and expired == []     # (at 0, 2 and 4 s)
    lock.acquire(b)                     # at 5 s
    clock.advance(1.9)
    assert expired == []
    clock.advance(0.1)
    assert expired == [b]


def test_release_cancels_timer():
    clock = Clock()
    expired = []
    lock = CommitLock(clock, timeout=2.0, on_timeout=expired.append)
    lock.acquire(a)
    lock.release(a)
    clock.advance(10)
    assert expired == [] and clock.getDelayedCalls() == []


# -- a refused client's turn (CommitLock's retry_wait, turn_after) -------------------

O, P = b"\0" * 7 + b"\1", b"\0" * 7 + b"\2"     # two oids


def _take(lock, owner, got, oids=None):
    """``owner`` asks for the lock, storing ``oids`` (None: unknown)."""
    lock.acquire(owner, None if oids is None else lambda: frozenset(oids)).addCallback(
        lambda _: got.append(owner))


def _refused_b(clock, wait=1.0, after=0.0):
    """a commits, b's vote is refused for a conflict on O: b is expected back
    (its turn kept ``after`` seconds after this refusal)."""
    lock, got = CommitLock(clock, retry_wait=wait, turn_after=after), []
    _take(lock, a, got)
    _take(lock, b, got)
    lock.release(a)
    lock.release(b, refused=[O])
    return lock, got


def test_the_last_committer_waits_for_the_refused_client():
    clock = Clock()
    lock, got = _refused_b(clock)
    _take(lock, a, got, [O])        # a votes again first, on the same object
    assert lock.holder is None and got == [a, b]     # held: b's turn
    _take(lock, b, got, [O])        # b's retry
    assert lock.holder is b
    lock.release(b)                 # b commits: its turn is over
    assert lock.holder is a and got == [a, b, b, a]


def test_transactions_on_other_objects_do_not_wait():
    lock, got = _refused_b(Clock())
    _take(lock, c, got, [P])
    assert lock.holder is c
    lock.release(c)
    _take(lock, a, got)             # oids unknown: it may store O, so it waits
    assert lock.holder is None


def test_the_wait_ends_when_its_time_runs_out_or_the_client_leaves():
    clock = Clock()
    lock, got = _refused_b(clock, wait=1.0)
    _take(lock, a, got, [O])
    clock.advance(0.5)
    assert lock.holder is None
    clock.advance(0.5)              # b did not come back in time: a goes
    assert lock.holder is a
    lock.release(a)
    lock, got = _refused_b(clock)
    _take(lock, a, got, [O])
    lock.forget(b)                  # b's client went away
    assert lock.holder is a


def test_oldest_refusal_first_and_a_ticket_survives_refusals():
    lock, got = _refused_b(Clock())          # b refused on O
    _take(lock, c, got, [P])
    lock.release(c, refused=[P])             # c refused on P, after b
    _take(lock, c, got, [O, P])              # c retries first...
    _take(lock, b, got, [O, P])
    assert lock.holder is b                  # ...but b was refused first
    lock.release(b, refused=[O])             # refused again: b keeps its place
    assert lock.holder is None               # c may store O: it waits for b
    _take(lock, b, got, [O])
    assert lock.holder is b
    lock.release(b)
    assert lock.holder is c


def test_the_turn_is_kept_only_once_the_first_refusal_is_old_enough():
    clock = Clock()
    lock, got = _refused_b(clock, after=0.5)
    _take(lock, a, got, [O])        # b refused just now: first come, first served
    assert lock.holder is a
    clock.advance(0.4)
    lock.release(a, refused=[O])    # a is refused too, after b
    _take(lock, b, got, [O])        # b's retry, refused (a committed meanwhile)...
    lock.release(b, refused=[O])
    _take(lock, c, got, [O])        # ...0.4 s after its first refusal: c goes
    assert lock.holder is c
    clock.advance(0.1)              # b's first refusal is 0.5 s old, a's 0.1
    lock.release(c)
    _take(lock, a, got, [O])        # a may store O: it waits for b's retry
    assert lock.holder is None
    _take(lock, b, got, [O])
    assert lock.holder is b and got == [a, b, a, b, c, b]
    lock.release(b)                 # b commits: its ticket is gone; a's is young,
    assert lock.holder is None      # parked while b may come back (the grace)...
    clock.advance(PARK_GRACE)
    assert lock.holder is a         # ...and b did not


def test_no_retry_wait_is_first_come_first_served():
    lock, got = _refused_b(Clock(), wait=0)
    _take(lock, a, got, [O])
    assert lock.holder is a


def test_a_transaction_names_the_oids_it_may_store():
    from zeotwist.server.txnbuffer import TransactionBuffer
    from zeotwist.wire.records import encode_check, encode_store, encode_undo
    buffer = TransactionBuffer()
    buffer.append(encode_store(O, b"\0" * 8, b"data") + encode_check(P, b"\0" * 8))
    assert buffer.oids() == {O, P}
    assert buffer.oids(limit=10) is None             # too long to read: unknown
    buffer.append(encode_undo(b"\0" * 8))
    assert buffer.oids() is None                     # an undo's oids: unknown


# -- a young ticket's votes on the refused objects are parked (PARK_GRACE) ----------

def _young_b(clock, after=1.0):
    """a commits, b is refused on O (its ticket young for ``after`` s), a votes
    again and b's retry on O waits behind it."""
    lock, got = _refused_b(clock, after=after)
    _take(lock, a, got, [O])
    _take(lock, b, got, [O])
    assert lock.holder is a
    return lock, got


def test_a_young_ticket_waits_while_the_last_committer_comes_back():
    clock = Clock()
    lock, got = _young_b(clock)
    for _ in range(3):
        lock.release(a)             # a commits: b's retry would be refused now
        assert lock.holder is None  # b is parked: a may come back
        _take(lock, a, got, [O])    # it does: a goes first, b still waits
        assert lock.holder is a
    assert got == [a, b, a, a, a, a] and lock.waiting() == 1


def test_a_parked_vote_goes_when_no_one_comes_back():
    clock = Clock()
    lock, got = _young_b(clock)
    lock.release(a)
    clock.advance(PARK_GRACE / 2)
    assert lock.holder is None
    clock.advance(PARK_GRACE / 2)   # the lock stayed free: nobody else wants O
    assert lock.holder is b


def test_a_waiter_on_the_refused_objects_goes_before_a_parked_one():
    lock, got = _young_b(Clock())
    _take(lock, c, got, None)       # no ticket; unknown oids: it may store O
    lock.release(a)
    assert lock.holder is c         # before b, which asked first


def test_a_parked_vote_gets_its_turn_when_its_ticket_comes_of_age():
    clock = Clock()
    lock, got = _young_b(clock, after=0.5)
    for _ in range(4):              # a keeps committing, 0.1 s a commit
        clock.advance(0.1)
        lock.release(a)
        _take(lock, a, got, [O])
        assert lock.holder is a     # b is parked
    clock.advance(0.1)
    lock.release(a)
    assert lock.holder is b         # 0.5 s after its refusal: b's turn
    lock.release(b, refused=[O])    # its stale vote is refused...
    _take(lock, a, got, [O])
    assert lock.holder is None      # ...a waits for its retry
    _take(lock, b, got, [O])
    assert lock.holder is b
    lock.release(b)
    assert lock.holder is a


def test_a_refused_client_storing_other_objects_is_not_parked():
    lock, got = _refused_b(Clock(), after=1.0)
    _take(lock, a, got, [O])
    _take(lock, b, got, [P])        # b's retry stores P, not O
    lock.release(a)
    assert lock.holder is b


def test_strict_turns_and_first_come_first_served_park_nothing():
    clock = Clock()
    lock, got = _refused_b(clock, wait=0)       # first come, first served
    _take(lock, a, got, [O])
    _take(lock, b, got, [O])
    lock.release(a)
    assert lock.holder is b
    lock, got = _refused_b(clock, after=0)      # strict: b's retry is its turn
    _take(lock, b, got, [O])
    assert lock.holder is b
    lock.release(b)
    _take(lock, a, got, [O])
    assert lock.holder is a


def test_a_parked_vote_goes_when_the_last_committer_leaves():
    clock = Clock()
    lock, got = _young_b(clock)
    lock.release(a)
    assert lock.holder is None
    lock.forget(a)                  # a's client went away: no grace for it
    assert lock.holder is b
