"""The commit path's invariants that performance depends on (docs/performance.md,
"Where the time of a commit goes"): the client writes TpcBegin, the last
store pieces and Vote with one system call, in that order; a thread that
allocates oids steadily takes them from the pool and asks for each next
batch itself, without the reactor thread, and never gets one twice; a big
record goes through a live server in long entries and comes back whole."""
import traceback

import pytest
import transaction
from twisted.internet.testing import StringTransport
from twisted.protocols import amp
from ZODB import DB
from ZODB.Connection import TransactionMetaData
from ZODB.POSException import ConflictError
from ZODB.utils import p64, z64

from zeotwist.client.oids import OID_BATCH, OID_BATCH_MAX
from zeotwist.client.protocol import ClientProtocol
from zeotwist.client.transaction import ClientTransaction
from zeotwist.testing import Recorder
from zeotwist.wire import commands as C
from zeotwist.wire import commitframes, loadframes
from zeotwist.wire.framing import BoundedAMP


class CountingTransport(StringTransport):
    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, data):
        self.writes += 1
        super().write(data)


class _Client:
    """What a ClientTransaction needs of its Client: a connected protocol."""

    def __init__(self, proto):
        self.protocol = proto


def test_vote_leaves_with_the_transaction_in_one_write():
    proto = ClientProtocol(Recorder())
    proto.makeConnection(CountingTransport())
    txn = ClientTransaction(_Client(proto), TransactionMetaData(u"u", u"d"))
    txn.store(p64(1), z64, b"record one")
    txn.store(p64(2), None, b"record two")
    txn.vote_once()
    assert proto.transport.writes == 1
    boxes = amp.parseString(proto.transport.value())
    assert [b[amp.COMMAND] for b in boxes] == [b"TpcBegin", b"StoreData", b"Vote"]
    assert commitframes.read_store_data(boxes[1]) == (
        b"s" + p64(1) + z64 + (10).to_bytes(4, "big") + b"record one"
        + b"s" + p64(2) + z64 + (10).to_bytes(4, "big") + b"record two")


def test_steady_oid_allocation_asks_from_the_thread(make_client, monkeypatch):
    cs = make_client()
    through_reactor, asked, read_here = [], [], []
    real_call = cs._call
    monkeypatch.setattr(cs, "_call", lambda f, *a, **kw: (
        through_reactor.append(f), real_call(f, *a, **kw))[1])
    pool = cs.client.oids
    real_ask = pool.from_thread
    monkeypatch.setattr(pool, "from_thread", lambda: (asked.append(1), real_ask())[1])
    proto = cs.client.protocol
    real_read = type(proto).read_answer
    monkeypatch.setattr(proto, "read_answer", lambda waiter, timeout: (
        read_here.append(waiter.name), real_read(proto, waiter, timeout))[1])
    oids = [cs.new_oid() for _ in range(250)]
    assert through_reactor == []                 # no oid waited for through the reactor
    assert len(asked) == 2                       # OID_BATCH, then twice as many
    assert read_here and set(read_here) == {"NewOids"}     # answers read by this thread
    assert len(pool) == 3 * OID_BATCH - 250
    assert len(set(oids) | set(pool)) == 3 * OID_BATCH      # never twice
    assert not pool.refilling
    more = [cs.new_oid() for _ in range(len(pool) + 2 * OID_BATCH + OID_BATCH_MAX)]
    assert len(asked) == 4 and pool.thread_batch == OID_BATCH_MAX   # 400, then 800
    assert len(set(oids + more)) == len(oids) + len(more)
    pool.clear()                                 # a registration: ZEO's batch again
    assert pool.thread_batch == OID_BATCH


def test_a_thread_asked_batch_is_not_added_twice_when_taken_again(make_client):
    """A signal handler's exception cutting the take short runs the
    answer's ``then`` again (ThreadAnswer.retake): nothing handed out twice."""
    cs = make_client()
    pool = cs.client.oids
    answer = pool.from_thread()
    assert answer is not None
    batch = [p64(n) for n in range(1000, 1000 + OID_BATCH)]
    first = answer.here[1](batch)
    again = answer.here[1](batch)
    assert first == again == batch[0]
    assert sorted(pool) == sorted(batch[1:])
    answer.wait(10)                              # the real answer: nothing more added
    assert len(set(pool)) == len(pool)


def test_a_big_record_round_trips_through_a_live_server(make_client, monkeypatch):
    seen, collected = [], []
    for module, name in ((commitframes, "read_store_data"),
                         (loadframes, "read_load_before_answer")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda box, *a, real=real: (
            b"data" in box and seen.append(sorted(box)), real(box, *a))[1])
    real_collect = BoundedAMP._collect_long
    monkeypatch.setattr(BoundedAMP, "_collect_long", lambda self, data: (
        collected.append(type(self).__name__), real_collect(self, data))[1])
    data = bytes(range(256)) * (5 * 2**20 // 256)      # 5 MiB: six store pieces
    writer, reader = DB(make_client()), DB(make_client())
    try:
        conn = writer.open()
        conn.root()["big"] = data
        transaction.commit()
        assert reader.open().root()["big"] == data      # a cold load of the root
    finally:
        writer.close()
        reader.close()
    assert seen and not [keys for keys in seen if b"data.1" in keys]
    # the values arrived over several reads on both ends, each joined once
    assert {"ServerSession", "ClientProtocol"} <= set(collected)


def test_a_refill_answered_on_a_former_connection_is_dropped(tmp_path):
    """Oids come from the pool only if the connection that asked for them
    is still the current one (the pool is emptied at every registration;
    a refill in flight across a reconnection must not refill it)."""
    from twisted.internet.task import Clock
    from ZODB.FileStorage import FileStorage
    from zeotwist.client.client import Client
    from zeotwist.testing import connect_in_memory, memory_server
    clock = Clock()
    server = memory_server(FileStorage(str(tmp_path / "data.fs")), clock)
    try:
        for reconnected in (False, True):
            client = Client(clock, None)
            proto, _, pump, _ = connect_in_memory({"1": server}, clock, recorder=client.connector)
            out = []
            proto.call(C.Register, protocol=C.PROTOCOL_VERSION, storage="1",
                       read_only=False).addBoth(out.append)
            pump.flush()
            assert isinstance(out[0], dict)
            client.connector.protocol = proto
            client.oids.refilling = True
            client.oids.refill()             # asked on proto, not answered yet
            if reconnected:
                client.connector.protocol = object()     # a new connection meanwhile
            pump.flush()
            assert client.oids.refilling is False
            assert len(client.oids) == (0 if reconnected else OID_BATCH)
    finally:
        server.close()


def test_a_small_commit_is_sent_by_the_committing_thread(make_client, monkeypatch):
    """The blocking client's Vote (with TpcBegin and the store stream) and
    Finish leave from the committing thread (zeotwist.client.threadwrites):
    no call handed to the reactor thread; a conflict and a bigger transaction
    still work, the latter through the reactor.  The server aborted the
    refused vote's transaction before answering, so tpc_abort sends nothing,
    and the ConflictError comes from tpc_vote's frame alone (the transaction
    package formats the failed commit's traceback, at a cost per frame)."""
    cs = make_client()
    oid = z64                   # the root's oid: no new_oid, whose refill uses the reactor
    handed = []
    real_call = cs._call
    monkeypatch.setattr(cs, "_call", lambda f, *a, **kw: (handed.append(f), real_call(f, *a, **kw))[1])
    serial = z64
    for data in (b"one", b"two"):
        t = TransactionMetaData()
        cs.tpc_begin(t)
        cs.store(oid, serial, data, "", t)
        cs.tpc_vote(t)
        serial = cs.tpc_finish(t)
    assert handed == []
    assert cs.load(oid) == (b"two", serial)
    t = TransactionMetaData()
    cs.tpc_begin(t)
    cs.store(oid, z64, b"stale", "", t)
    with pytest.raises(ConflictError) as refused:
        cs.tpc_vote(t)
    assert [f.name for f in traceback.extract_tb(refused.tb)] == [
        "test_a_small_commit_is_sent_by_the_committing_thread", "tpc_vote"]
    assert refused.value.serials == (serial, z64)
    cs.tpc_abort(t)                         # no Abort: the server has aborted it
    assert handed == []
    t = TransactionMetaData()               # over one store piece: opened by the reactor,
    cs.tpc_begin(t)                         # voted from here once it has (384af14), else
    cs.store(oid, serial, b"x" * (C.STORE_CHUNK + 1), "", t)   # through it: either way
    cs.tpc_vote(t)
    big = cs.tpc_finish(t)
    assert len(handed) <= 1 and cs.load(oid) == (b"x" * (C.STORE_CHUNK + 1), big)
