"""Server-wide limits as plain logic (issue 12, items 4-6): the shared byte
budgets, transaction buffers drawing on them, the iterator table, guards
on sessions over an in-memory link, the rate-limited log."""
import pytest
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from ZODB.MappingStorage import MappingStorage
from ZODB.POSException import StorageError
from ZODB.utils import z64

from zeotwist.errors import TransactionTooLarge
from zeotwist.server.budgets import MemoryBudget, SharedBudget
from zeotwist.server.iterators import IteratorTable
from zeotwist.server.limits import ConnectionLimiter, RateLimitedLog
from zeotwist.server.txnbuffer import TransactionBuffer
from zeotwist.testing import connect_in_memory, memory_server
from zeotwist.wire import commands as C
from zeotwist.wire.records import encode_store

MiB = 2**20


def test_shared_budget_totals_and_greediest():
    budget = SharedBudget(100)
    budget.set("a", 30)
    budget.set("b", 50)
    budget.set("a", 60)
    assert budget.total == 110 and budget.over() and budget.room() == -10
    assert budget.greediest() == "a"
    budget.release("a")
    assert budget.total == 50 and budget.greediest() == "b"
    budget.refresh(lambda holder: 5)
    assert budget.total == 5


def test_output_room_is_remeasured_when_spent_at_most_every_interval():
    clock = Clock()
    budgets = MemoryBudget(clock, total=400)            # output: 200
    budgets.output.set("s", 250)
    measured = []

    def measure(holder):
        measured.append(holder)
        return 20
    assert budgets.output_room(measure) == 180          # stale figure corrected
    budgets.output.set("s", 250)
    assert budgets.output_room(measure) == -50          # not again within the interval
    clock.advance(MemoryBudget.REFRESH_INTERVAL)
    assert budgets.output_room(measure) == 180 and len(measured) == 2


def test_spool_moves_to_disk_when_the_memory_budget_is_spent():
    budgets = MemoryBudget(Clock(), total=4 * MiB)      # spool memory: 1 MiB
    first, second = TransactionBuffer(budgets=budgets), TransactionBuffer(budgets=budgets)
    first.append(b"a" * (MiB - 10))
    assert budgets.spool_memory.held(first) == MiB - 10
    second.append(b"b" * 100)                           # does not fit in memory
    assert budgets.spool_memory.held(second) == 0 and second._file._rolled
    assert budgets.spool.total == MiB - 10 + 100
    first.close()
    second.close()
    assert budgets.spool.total == 0 and budgets.spool_memory.total == 0


def test_a_small_stream_stays_in_its_pieces_a_larger_one_moves_to_a_file(monkeypatch):
    """A small commit's stream makes no spooled file (txnbuffer's
    SMALL_SPOOL_BYTES); past that size its pieces move into one, the
    records read the same either way, and memory is counted both ways."""
    import tempfile
    from zeotwist.server import txnbuffer
    from zeotwist.wire.records import encode_store
    made = []
    real = tempfile.SpooledTemporaryFile
    monkeypatch.setattr(txnbuffer.tempfile, "SpooledTemporaryFile",
                        lambda *a, **kw: made.append(1) or real(*a, **kw))
    budgets = MemoryBudget(Clock())
    records = [encode_store(bytes([0] * 7 + [i]), z64, b"r%d" % i * 1000) for i in range(40)]
    buffer = TransactionBuffer(budgets=budgets)
    for i, record in enumerate(records):
        buffer.append(record)
        assert bool(made) == (buffer.size > txnbuffer.SMALL_SPOOL_BYTES), i
        assert budgets.spool_memory.held(buffer) == buffer.size
        assert [r[3] for r in buffer.records()] == [r[21:] for r in records[:i + 1]]
    assert made == [1]
    buffer.close()
    assert budgets.spool_memory.total == 0


def test_total_spool_refuses_the_transaction_that_overflows_it():
    budgets = MemoryBudget(Clock(), max_spool=1000)
    first, second = TransactionBuffer(budgets=budgets), TransactionBuffer(budgets=budgets)
    first.append(b"a" * 600)
    second.append(b"b" * 300)
    second.append(b"b" * 300)                           # 1200 > 1000
    assert second.too_large and budgets.spool.held(second) == 0   # released at once
    with pytest.raises(TransactionTooLarge, match="spool is full"):
        second.records()
    third = TransactionBuffer(budgets=budgets)
    third.append(b"c" * 400)                            # the room second gave back
    assert not third.too_large
    for buffer in (first, second, third):
        buffer.close()
    assert budgets.spool.total == 0


class FakeSession:
    def __init__(self):
        self.open = {}

    def iterator_idle(self, iid):
        return self.open.get(iid) == "idle"

    def close_iterator(self, iid):
        self.open.pop(iid, None)
        self.table.discard(self, iid)


def test_iterator_table_caps_server_wide_and_takes_descriptor_slots():
    clock = Clock()
    limiter = ConnectionLimiter(clock, 10)
    limiter.cap = 10
    table = IteratorTable(clock, limiter, cap=3, timeout=60)
    sessions = [FakeSession() for _ in range(2)]
    for s in sessions:
        s.table = table
    for iid, s in enumerate([sessions[0]] * 2 + [sessions[1]] * 2):
        table.reserve(s, iid)
        s.open[iid] = "idle"
        clock.advance(1)
    assert len(table) == 3 and limiter.active == 3
    assert 0 not in sessions[0].open                   # the least recently used went
    for s in sessions:                                  # all busy: none can be closed
        for iid in s.open:
            s.open[iid] = "busy"
    with pytest.raises(StorageError, match="all busy"):
        table.reserve(sessions[1], 9)
    limiter.active = limiter.cap                        # descriptors all taken
    table.cap = 10
    with pytest.raises(StorageError, match="no file descriptor"):
        table.reserve(sessions[1], 9)
    table.stop()


def test_idle_iterators_expire():
    clock = Clock()
    limiter = ConnectionLimiter(clock, 10)
    table = IteratorTable(clock, limiter, cap=10, timeout=8)
    session = FakeSession()
    session.table = table
    table.reserve(session, 1)
    session.open[1] = "idle"
    clock.advance(4)
    table.reserve(session, 2)
    session.open[2] = "idle"
    clock.advance(5)                                    # 1 unused for 9 s, 2 for 5
    assert list(session.open) == [2] and limiter.active == 1
    clock.advance(4)
    assert session.open == {} and limiter.active == 0 and len(table) == 0


def test_rate_limited_log_allows_a_burst_then_counts():
    clock = Clock()
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        log = RateLimitedLog(clock, interval=10, burst=3)
        logged = [log.warn("line {n}", n=n) for n in range(10)]
        clock.advance(10)
        assert log.warn("line {n}", n=10)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert logged == [True] * 3 + [False] * 7
    assert events[-1]["suppressed"] == 7


# -- guards on a session, in memory ----------------------------------------------------

def registered_pair(**guards):
    clock = Clock()
    server = memory_server(MappingStorage(), clock)
    client, session, pump, _ = connect_in_memory({"1": server}, clock)
    for name, value in guards.items():
        setattr(session, name, value)
    d = client.callRemote(C.Register, protocol=C.PROTOCOL_VERSION, storage="1",
                          read_only=False)
    pump.flush()
    assert d.called
    return clock, client, session, pump


def test_idle_session_is_closed_and_an_active_one_is_not():
    clock, client, session, pump = registered_pair(idle_timeout=10)
    for _ in range(5):                                  # a request every 4 s
        clock.advance(4)
        client.callRemote(C.LastTransaction)
        pump.flush()
    assert not session._violated
    clock.advance(10)
    assert session._violated


def test_transaction_that_does_not_vote_in_time_is_dropped():
    clock, client, session, pump = registered_pair(vote_timeout=30)
    client.callRemote(C.TpcBegin, user=b"", description=b"", extension=b"")
    client.callRemote(C.StoreData, data=b"s" + z64 + z64 + b"\0\0\0\1x")
    pump.flush()
    clock.advance(29)
    assert not session._violated
    clock.advance(1)
    assert session._violated


def test_one_vote_timer_per_connection_looks_at_the_transaction_of_its_time(monkeypatch):
    """Transactions that vote in time leave one timer (not one each, set and
    cancelled); a later transaction that does not vote is dropped at its
    own deadline, counted from its TpcBegin, not the first's."""
    clock, client, session, pump = registered_pair(vote_timeout=30)
    timers = []
    real = clock.callLater
    monkeypatch.setattr(clock, "callLater", lambda *a: timers.append(a[1]) or real(*a))
    serial = z64
    for i in range(5):                                  # one commit every 10 s
        client.callRemote(C.TpcBegin, user=b"", description=b"", extension=b"")
        client.callRemote(C.StoreData, data=encode_store(z64, serial, b"%d" % i))
        client.callRemote(C.Vote)
        serial = []
        client.callRemote(C.Finish).addCallback(lambda a: serial.append(a["tid"]))
        pump.flush()
        serial = serial[0]
        clock.advance(10)
    assert not session._violated
    # set at 0 s, and at 30 s (the first fired then, nothing due: no timer until the next)
    assert timers.count(session._vote_overdue) == 2
    client.callRemote(C.TpcBegin, user=b"", description=b"", extension=b"")
    pump.flush()                                        # at 50 s; the timer is due at 60
    clock.advance(29)
    assert not session._violated
    clock.advance(1)
    assert session._violated


def test_answered_command_without_ask_is_a_violation():
    from twisted.protocols import amp
    clock, client, session, pump = registered_pair()
    client.callRemote(C.NewOids, count=1)
    pump.flush()
    assert not session._violated
    client.transport.write(amp.AmpBox(_command=b"NewOids", count=b"1").serialize())
    pump.flush()
    assert session._violated
