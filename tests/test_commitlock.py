"""The commit lock: FIFO, withdrawal, timeout (pure logic, Clock-driven)."""
from twisted.internet.task import Clock

from zeotwist.server.commitlock import PARK_GRACE, CancelledError, CommitLock


class Owner:
    """A lock owner (a session in the server); compared by identity."""

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


a, b, c, d = Owner("a"), Owner("b"), Owner("c"), Owner("d")


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
    assert buffer.oids(limit=1) is None              # too many records: unknown
    buffer.append(encode_undo(b"\0" * 8))
    assert buffer.oids() is None                     # an undo's oids: unknown


def test_a_big_transaction_names_its_oids_too():
    """Over 64 KiB (the stream spooled): its records' headers are read, a
    big payload skipped; records cut across pieces, headers across blocks."""
    from zeotwist.server.txnbuffer import TransactionBuffer
    from zeotwist.wire.records import encode_store
    many = [(b"%08d" % i, b"x" * (i % 50)) for i in range(3000)]     # ~110 KB
    stream = b"".join(encode_store(oid, b"\0" * 8, data) for oid, data in many)
    stream += encode_store(O, b"\0" * 8, b"y" * 300_000) + encode_store(P, b"\0" * 8, b"z")
    buffer = TransactionBuffer(spool_bytes=100_000)  # in memory, then on disk
    for at in range(0, len(stream), 7777):
        buffer.append(stream[at:at + 7777])
    assert buffer.oids() == {oid for oid, _ in many} | {O, P}
    assert buffer.oids(limit=3001) is None
    buffer.append(b"s" + O)                          # a truncated record: unknown
    assert buffer.oids() is None
    buffer.close()



def test_naming_the_oids_of_big_records_reads_little_more_than_their_headers():
    """A transaction of big records: each payload is skipped with a seek and
    only a small read follows it (the reactor thread reads ~512 bytes a
    record, not a 64 KiB block: 200 records of 100 KB read 13 MB before)."""
    import io
    from zeotwist.server.txnbuffer import _named
    from zeotwist.wire.records import encode_store

    class Counting(io.BytesIO):
        read_bytes = 0

        def read(self, n=-1):
            data = super().read(n)
            self.read_bytes += len(data)
            return data

    oids = [b"%08d" % i for i in range(200)]
    stream = b"".join(encode_store(oid, b"\0" * 8, b"x" * 100_000) for oid in oids)
    stream += b"".join(encode_store(b"s%07d" % i, b"\0" * 8, b"y") for i in range(50))
    f = Counting(stream)
    assert _named(f, len(stream), 10_000) == set(oids) | {b"s%07d" % i for i in range(50)}
    assert f.read_bytes < 200 * 1024

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
    _take(lock, c, got, [O])        # no ticket; it stores O
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


def test_an_aborted_vote_parks_nothing():
    """a's next vote fails otherwise, or a aborts after it: it stored
    nothing, so b's retry goes without waiting for a to come back."""
    clock = Clock()
    lock, got = _young_b(clock)
    clock.advance(PARK_GRACE)       # a's commit is past its grace
    lock.release(a, committed=False)
    assert lock.holder is b


# -- oids unknown (an undo, over OIDS_SCAN_RECORDS records): nothing is parked
# for them, and a parked vote goes when what it waited for leaves -----------------

def test_a_waiter_of_unknown_oids_parks_no_vote():
    clock = Clock()
    lock, got = _refused_b(clock, after=1.0)    # b's ticket young
    clock.advance(PARK_GRACE)
    _take(lock, d, got, [P])        # d commits another object meanwhile
    _take(lock, b, got, [O])
    _take(lock, c, got, None)       # no ticket; unknown oids (an undo, say)
    lock.release(d)
    assert lock.holder is b         # b asked first; c is not known to store O


def test_a_commit_of_unknown_oids_parks_no_vote():
    """Commits of unknown oids back to back (an undo, or a transaction of
    many records, within the grace of each other) do not hold a parked
    vote until its ticket comes of age."""
    clock = Clock()
    lock, got = _young_b(clock)
    _take(lock, c, got, None)
    lock.release(a)                 # b is parked while a may come back...
    assert lock.holder is c
    clock.advance(PARK_GRACE / 2)
    lock.release(c)                 # ...but c's commit is not known to store O
    assert lock.holder is b


def test_an_unknown_waiter_still_waits_for_a_kept_turn():
    clock = Clock()
    lock, got = _refused_b(clock)   # b's turn kept from its refusal
    _take(lock, c, got, None)       # unknown: it may store O
    assert lock.holder is None
    _take(lock, b, got, [O])
    assert lock.holder is b
    lock.release(b)
    assert lock.holder is c


def _c_parked_behind_d(clock):
    """c is parked behind d (no ticket, stores P, which c was refused for),
    and d waits for b's kept turn on O; the lock is free.  d's request."""
    lock, got = CommitLock(clock, retry_wait=1.0, turn_after=0.5), []
    _take(lock, a, got)
    _take(lock, b, got)
    lock.release(a)
    lock.release(b, refused=[O])    # b's first refusal, at 0
    clock.advance(0.5)
    _take(lock, b, got, [O])        # its turn (the refusal is 0.5 s old)...
    lock.release(b, refused=[O])    # ...refused again: expected until 1.5
    _take(lock, c, got, [P])
    lock.release(c, refused=[P])    # c refused on P: a young ticket
    asked = lock.acquire(d, lambda: frozenset([O, P]))  # waits for b's retry
    _take(lock, c, got, [P])        # parked: d goes first on P
    assert lock.holder is None and lock.waiting() == 2
    return lock, asked


def test_a_parked_vote_goes_when_the_waiter_it_let_go_first_leaves():
    """d's client leaves (or its request is cancelled): c goes at once,
    not when b's time runs out."""
    lock, _ = _c_parked_behind_d(Clock())
    lock.forget(d)
    assert lock.holder is c
    lock, asked = _c_parked_behind_d(Clock())
    asked.addErrback(lambda f: f.trap(CancelledError))
    asked.cancel()
    assert lock.holder is c


def test_a_retry_slower_than_the_retry_wait_starts_over():
    """A known limit, pinned: b retries after its time ran out (a slow
    client): its ticket is gone, so a was not held for it, and b's next
    refusal is a young ticket again, its turn 0.5 s away, not next."""
    clock = Clock()
    lock, got = _refused_b(clock, wait=0.05, after=0.5)     # b refused at 0
    clock.advance(0.6)
    _take(lock, a, got, [O])        # b is late: a is not held for it
    assert lock.holder is a
    _take(lock, b, got, [O])
    lock.release(a)
    assert lock.holder is b         # no ticket: its stale vote goes...
    lock.release(b, refused=[O])    # ...and is refused: a new ticket
    _take(lock, a, got, [O])
    assert lock.holder is a         # not b's turn (kept only from 1.1 s)
