"""The protocol over in-memory transports: deterministic, no reactor, no sockets.

A real FileStorage sits behind the server; storage calls run synchronously
and time is a Clock, so every ordering below is exact.
"""
import pytest
from twisted.internet.task import Clock
from twisted.protocols import amp
from ZODB.FileStorage import FileStorage
from ZODB.POSException import ConflictError, POSKeyError, ReadOnlyError, StorageTransactionError
from ZODB.utils import maxtid, p64, z64

from zeotwist.errors import (
    ClientDisconnected, ProtocolVersionError, TransactionTimeout, UnknownStorage)
from zeotwist.testing import call_in_memory as call, connect_in_memory, memory_server
from zeotwist.wire import commands as C
from zeotwist.wire.records import encode_check, encode_store


@pytest.fixture
def world(tmp_path):
    clock = Clock()
    fs = FileStorage(str(tmp_path / "data.fs"))
    server = memory_server(fs, clock, transaction_timeout=60)
    yield clock, {"1": server}
    server.close()


def register(client, pump, read_only=False, storage="1"):
    return call(client, pump, C.Register, protocol=C.PROTOCOL_VERSION,
                storage=storage, read_only=read_only)


def open_txn(client, data=b""):
    """TpcBegin and one StoreData piece carrying ``data`` (one-way, unanswered)."""
    client.send(C.TpcBegin, user=b"", description=b"", extension=b"")
    if data:
        client.send(C.StoreData, data=data)


def commit(client, pump, records, oids=None):
    """Drive one two-phase commit; returns (vote answer, tid or None)."""
    open_txn(client, b"".join(records))
    voted = call(client, pump, C.Vote)
    if voted["conflicts"]:
        return voted, None
    return voted, call(client, pump, C.Finish)["tid"]


def two_links(world):
    """Two registered clients, each ``(client, server session, pump, recorder)``."""
    clock, servers = world
    links = [connect_in_memory(servers, clock) for _ in range(2)]
    for client, _, pump, _ in links:
        register(client, pump)
    return links


def two_clients(world):
    """Two registered clients: ``(a, pump_a, b, pump_b, b's recorder)``."""
    (a, _, pa, _), (b, _, pb, rec_b) = two_links(world)
    return a, pa, b, pb, rec_b


def test_register_answers_last_tid_and_mode(world):
    clock, servers = world
    client, session, pump, _ = connect_in_memory(servers, clock)
    r = register(client, pump)
    assert r["last_tid"] == z64 and r["read_only"] is False
    assert session.server is servers["1"]


def test_register_refusals(world):
    clock, servers = world
    client, _, pump, _ = connect_in_memory(servers, clock)
    with pytest.raises(UnknownStorage):
        register(client, pump, storage="nope")
    with pytest.raises(ProtocolVersionError):
        call(client, pump, C.Register, protocol="zeotwist-0", storage="1", read_only=False)
    servers["1"].read_only = True
    with pytest.raises(ReadOnlyError):
        register(client, pump)
    assert register(client, pump, read_only=True)["read_only"] is True


def test_commit_load_and_invalidate_other_clients(world):
    a, pa, b, pb, rec_b = two_clients(world)
    oid = call(a, pa, C.NewOids, count=3)["oids"][0]
    voted, tid = commit(a, pa, [encode_store(oid, z64, b"hello")])
    assert voted == {"resolved": [], "conflicts": b"", "to_resolve": None, "current": None}
    pb.flush()
    assert rec_b.invalidations == [(tid, [oid])]
    r = call(b, pb, C.LoadBefore, oid=oid, tid=maxtid)
    assert (r["found"], r["data"], r["start"], r["end"]) == (True, b"hello", tid, None)
    r = call(b, pb, C.LoadBefore, oid=oid, tid=tid)        # before it existed
    assert r["found"] is False
    assert call(b, pb, C.LastTransaction)["tid"] == tid


def test_load_of_missing_object_is_poskeyerror(world):
    clock, servers = world
    a, _, pa, _ = connect_in_memory(servers, clock)
    register(a, pa)
    with pytest.raises(POSKeyError) as e:
        call(a, pa, C.LoadBefore, oid=p64(42), tid=maxtid)
    assert e.value.args[0] == p64(42)      # the oid survives the trip


def test_unresolvable_conflict_comes_back_as_data_and_frees_the_lock(world):
    clock, servers = world
    a, _, pa, _ = connect_in_memory(servers, clock)
    register(a, pa)
    oid = call(a, pa, C.NewOids, count=1)["oids"][0]
    _, tid1 = commit(a, pa, [encode_store(oid, z64, b"one")])
    _, tid2 = commit(a, pa, [encode_store(oid, tid1, b"two")])
    voted, tid = commit(a, pa, [encode_store(oid, tid1, b"stale")])
    assert tid is None
    assert voted["conflicts"] == oid + tid2 + tid1
    assert servers["1"].lock.holder is None


def test_check_current_serial_read_conflict(world):
    clock, servers = world
    a, _, pa, _ = connect_in_memory(servers, clock)
    register(a, pa)
    oid = call(a, pa, C.NewOids, count=1)["oids"][0]
    _, tid1 = commit(a, pa, [encode_store(oid, z64, b"one")])
    commit(a, pa, [encode_store(oid, tid1, b"two")])
    open_txn(a, encode_check(oid, tid1))
    with pytest.raises(ConflictError):
        call(a, pa, C.Vote)
    assert servers["1"].lock.holder is None


def test_read_only_session_cannot_commit(world):
    clock, servers = world
    a, _, pa, _ = connect_in_memory(servers, clock)
    register(a, pa, read_only=True)
    with pytest.raises(ReadOnlyError):
        call(a, pa, C.NewOids, count=1)
    open_txn(a, encode_store(p64(1), z64, b"x"))
    with pytest.raises(ReadOnlyError):
        call(a, pa, C.Vote)


def test_lock_waiter_is_served_when_holder_disconnects(world):
    _, servers = world
    (a, sa, pa, _), (b, _, pb, _) = two_links(world)
    oid = call(a, pa, C.NewOids, count=2)["oids"]
    open_txn(a, encode_store(oid[0], z64, b"a"))
    call(a, pa, C.Vote)                              # a holds the lock
    open_txn(b, encode_store(oid[1], z64, b"b"))
    waiting = []
    b.call(C.Vote).addBoth(waiting.append)
    pb.flush()
    assert waiting == [] and servers["1"].lock.waiting() == 1
    sa.transport.loseConnection()                     # a's link drops mid-commit
    pa.flush()
    pb.flush()
    assert waiting and waiting[0]["conflicts"] == b""
    assert call(b, pb, C.Finish)["tid"] > z64


def test_transaction_timeout_drops_the_holder(world):
    """A client that did not declare ``timeout_notice`` (an older one) is
    dropped without a word, as before TransactionTimedOut existed."""
    clock, servers = world
    a, sa, pa, rec = connect_in_memory(servers, clock)
    register(a, pa)
    a.send(C.TpcBegin, user=b"", description=b"", extension=b"")
    call(a, pa, C.Vote)
    assert servers["1"].lock.holder is sa
    clock.advance(61)
    pa.flush()
    assert rec.lost and servers["1"].lock.holder is None
    assert a.timed_out is None and not clock.getDelayedCalls()


def test_transaction_timeout_is_announced_and_the_lock_passes_at_once(world):
    clock, servers = world
    a, sa, pa, rec = connect_in_memory(servers, clock)
    b, sb, pb, _ = connect_in_memory(servers, clock)
    for client, pump in ((a, pa), (b, pb)):
        call(client, pump, C.Register, protocol=C.PROTOCOL_VERSION, storage="1",
             read_only=False, timeout_notice=True)
    oids = call(a, pa, C.NewOids, count=2)["oids"]
    open_txn(a, encode_store(oids[0], z64, b"a"))
    call(a, pa, C.Vote)                              # a holds the lock, then stalls
    open_txn(b, encode_store(oids[1], z64, b"b"))
    waiting = []
    b.call(C.Vote).addBoth(waiting.append)
    pb.flush()
    assert waiting == []
    clock.advance(61)
    assert servers["1"].lock.holder is sb            # passed on before a's link closes
    pb.flush()
    assert waiting[0]["conflicts"] == b""
    pa.flush()
    assert isinstance(a.timed_out, TransactionTimeout) and a.timed_out.timeout == 60
    # b's lock timer (and b's vote timer, which stays until it fires: guards);
    # a's grace timer is gone
    assert rec.lost and [c.func for c in clock.getDelayedCalls()
                         if c.func != sb._vote_overdue] == [servers["1"].lock._expired]
    finished = []
    a.call(C.Finish).addBoth(finished.append)       # too late: the link is gone
    pa.flush()
    assert isinstance(finished[0].value, ClientDisconnected)
    assert call(b, pb, C.Finish)["tid"] > z64
    assert servers["1"].traffic["transaction_timeouts"] == 1
    with pytest.raises(POSKeyError):                 # nothing of a's was committed
        servers["1"].storage.load(oids[0])


@pytest.fixture
def held(tmp_path):
    """A server whose storage calls wait while ``threads.held`` (a busy
    storage thread), with one client registered with ``timeout_notice``
    and one transaction storing a new object: ``(clock, threads, server,
    (client, session, pump, recorder), oid)``."""
    from test_client_resolution import HeldCalls
    from zeotwist.server.storageserver import StorageServer
    clock, threads = Clock(), HeldCalls()
    server = StorageServer(FileStorage(str(tmp_path / "data.fs")), reactor=clock,
                           threads=threads, transaction_timeout=60)
    a, sa, pa, rec = connect_in_memory({"1": server}, clock)
    call(a, pa, C.Register, protocol=C.PROTOCOL_VERSION, storage="1", read_only=False,
         timeout_notice=True)
    oid = call(a, pa, C.NewOids, count=1)["oids"][0]
    open_txn(a, encode_store(oid, z64, b"a"))
    yield clock, threads, server, (a, sa, pa, rec), oid
    server.close()


def test_timeout_during_a_slow_vote_leaves_its_answer_unsent(held):
    """The storage is still voting when the timeout fires: the client hears
    of the timeout, never of a vote that succeeded; the storage's tpc_abort
    runs after its vote."""
    clock, threads, server, (a, sa, pa, rec), oid = held
    threads.held = True
    voted = []
    a.call(C.Vote).addBoth(voted.append)
    pa.flush()
    assert voted == [] and server.lock.holder is sa
    # As over TCP, what is written after loseConnection still goes out
    # before the close (iosim would drop it): the vote ends (then its
    # tpc_abort runs) while the link is closing.
    transport, closing = sa.transport, []
    transport.loseConnection = lambda: closing.append(True)
    clock.advance(61)
    threads.release()
    assert closing
    type(transport).loseConnection(transport)
    pa.flush()
    assert isinstance(a.timed_out, TransactionTimeout)
    assert isinstance(voted[0].value, ClientDisconnected) and rec.lost
    assert server.lock.holder is None and len(voted) == 1
    with pytest.raises(POSKeyError):
        server.storage.load(oid)


def test_no_notice_while_the_storage_finishes(held):
    """Once tpc_finish runs the outcome is the storage's: the client is
    only disconnected (ClientDisconnected), never told it timed out."""
    clock, threads, server, (a, sa, pa, rec), oid = held
    call(a, pa, C.Vote)
    threads.held = True
    finished = []
    a.call(C.Finish).addBoth(finished.append)
    pa.flush()
    clock.advance(61)
    pa.flush()
    assert a.timed_out is None and rec.lost
    assert isinstance(finished[0].value, ClientDisconnected)
    threads.release()                                # the finish commits anyway
    assert server.lock.holder is None
    assert server.storage.load(oid)[0] == b"a"


def test_handshake_timeout_closes(world):
    clock, servers = world
    a, sa, pa, rec = connect_in_memory(servers, clock)
    clock.advance(4.9)
    pa.flush()
    assert not rec.lost
    clock.advance(0.2)
    pa.flush()
    assert rec.lost


@pytest.mark.parametrize("garbage", [
    b"\xff\xfe" + b"x" * 100,                    # key longer than 255
    b"\xff\xff" + b"x" * 100,                    # a long entry with a key over 255
    b"\x00\x04_ask\x00\x011\x00\x08_command\x00\x07Nothing\x00\x00",   # unknown command
    b"\x00\x08_command\x00\x0aLoadSerial\x00\x00",   # before Register
])
def test_bad_frames_close_the_connection(world, garbage):
    clock, servers = world
    a, sa, pa, rec = connect_in_memory(servers, clock)
    sa.dataReceived(garbage)
    pa.flush()
    assert rec.lost


@pytest.mark.parametrize("name", [b"St\xa4reData", b"\xff", b"Vote\x80"])
def test_a_command_name_not_ascii_is_an_unknown_command(world, name):
    """A registered client's command name that is not ASCII: AMP's lookup
    decodes it as ASCII and raised (an unhandled error, logged with its
    traceback: the autouse fixture fails the test); it is a protocol
    violation like any unknown command, one line."""
    clock, servers = world
    a, sa, pa, rec = connect_in_memory(servers, clock)
    register(a, pa)
    sa.dataReceived(amp.AmpBox({b"_ask": b"9", b"_command": name}).serialize())
    pa.flush()
    assert rec.lost and sa._violated


def test_oversized_box_refused_before_buffering(world):
    clock, servers = world
    a, sa, pa, rec = connect_in_memory(servers, clock)
    register(a, pa)
    value = b"v" * 65535
    piece = b"\x00\x01k" + b"\xff\xff" + value
    sent = 0
    while not rec.lost and sent < 200:
        sa.dataReceived(piece)                     # one never-ending box
        sent += 1
        pa.flush()
    assert rec.lost
    assert sent * len(piece) < 5 * 2**20          # refused near the 4 MiB cap
    assert len(sa._buf) < 70_000 and sa._box is None


def test_malformed_argument_closes(world):
    clock, servers = world
    a, sa, pa, rec = connect_in_memory(servers, clock)
    register(a, pa)
    box = amp.AmpBox({b"_ask": b"9", b"_command": b"LoadBefore", b"oid": b"short", b"tid": b"x" * 8})
    sa.dataReceived(box.serialize())
    pa.flush()
    assert rec.lost


def test_malformed_store_stream_closes_and_frees_lock(world):
    clock, servers = world
    a, sa, pa, rec = connect_in_memory(servers, clock)
    register(a, pa)
    a.send(C.TpcBegin, user=b"", description=b"", extension=b"")
    a.send(C.StoreData, data=b"s" + b"\x00" * 10)     # truncated record
    a.call(C.Vote).addErrback(lambda f: None)
    pa.flush()
    assert rec.lost and servers["1"].lock.holder is None


def test_large_record_round_trips(world):
    clock, servers = world
    a, _, pa, _ = connect_in_memory(servers, clock)
    register(a, pa)
    oid = call(a, pa, C.NewOids, count=1)["oids"][0]
    data = bytes(range(256)) * (6 * 2**20 // 256)     # 6 MiB: many StoreData pieces
    stream = encode_store(oid, z64, data)
    a.send(C.TpcBegin, user=b"", description=b"", extension=b"")
    for off in range(0, len(stream), C.STORE_CHUNK):
        a.send(C.StoreData, data=stream[off:off + C.STORE_CHUNK])
    call(a, pa, C.Vote)
    call(a, pa, C.Finish)
    assert call(a, pa, C.LoadBefore, oid=oid, tid=maxtid)["data"] == data


def test_transaction_cap(tmp_path):
    clock = Clock()
    server = memory_server(FileStorage(str(tmp_path / "cap.fs")), clock,
                           max_transaction_bytes=1000)
    try:
        a, _, pa, _ = connect_in_memory({"1": server}, clock)
        register(a, pa)
        open_txn(a, encode_store(p64(1), z64, b"x" * 2000))
        from zeotwist.errors import TransactionTooLarge
        with pytest.raises(TransactionTooLarge):
            call(a, pa, C.Vote)
        assert server.lock.holder is None
    finally:
        server.close()


def test_client_stopped_before_vote_delays_nobody(world):
    _, servers = world
    a, pa, b, pb, _ = two_clients(world)
    oids = call(a, pa, C.NewOids, count=2)["oids"]
    open_txn(a, encode_store(oids[0], z64, b"a"))
    pa.flush()                   # a stops here: stores sent, never votes
    _, tid = commit(b, pb, [encode_store(oids[1], z64, b"b")])
    assert tid is not None and servers["1"].lock.holder is None


def test_waiters_are_served_in_arrival_order(world):
    clock, servers = world
    clients = [connect_in_memory(servers, clock) for _ in range(4)]
    for c, _, p, _ in clients:
        register(c, p)
    oids = call(clients[0][0], clients[0][2], C.NewOids, count=4)["oids"]
    for (c, _, p, _), oid in zip(clients, oids):
        open_txn(c, encode_store(oid, z64, b"x"))
    order = []
    first, _, p0, _ = clients[0]
    call(first, p0, C.Vote)                                    # holds the lock
    for name, (c, _, p, _) in zip("bcd", clients[1:]):
        c.call(C.Vote).addCallback(lambda _, n=name: order.append(n))
        p.flush()
    assert order == [] and servers["1"].lock.waiting() == 3
    call(first, p0, C.Finish)
    for name, (c, _, p, _) in zip("bcd", clients[1:]):
        for _, _, q, _ in clients:
            q.flush()
        assert order[-1] == name                               # the next in line voted
        call(c, p, C.Finish)
    assert order == ["b", "c", "d"]


def test_vote_and_finish_are_answered_without_amps_dispatch(world, monkeypatch):
    """Vote and Finish (every commit) take the session's fast path; their
    answers and error answers are the ones AMP's path gives."""
    from zeotwist.server.session import ServerSession
    clock, servers = world
    client, session, pump, _ = connect_in_memory(servers, clock)
    register(client, pump)
    dispatched = []
    real = ServerSession.dispatchCommand
    monkeypatch.setattr(ServerSession, "dispatchCommand", lambda self, box: (
        dispatched.append(box[amp.COMMAND]), real(self, box))[1])
    with pytest.raises(StorageTransactionError):
        call(client, pump, C.Vote)          # no transaction: STORAGE_TRANSACTION
    with pytest.raises(StorageTransactionError):
        call(client, pump, C.Finish)
    oid = call(client, pump, C.NewOids, count=1)["oids"][0]
    voted, tid = commit(client, pump, [encode_store(oid, z64, b"fast")])
    assert voted["conflicts"] == b"" and len(tid) == 8
    assert dispatched == [b"NewOids"]
    assert session._txn.state.final


def test_invalidations_reach_the_client_without_amps_dispatch(world, monkeypatch):
    """A plain Invalidate (every commit of another client) is applied by
    ClientProtocol.ampBoxReceived; AMP's responder only for other forms."""
    from zeotwist.client.protocol import ClientProtocol
    a, pa, b, pb, rec_b = two_clients(world)
    dispatched = []
    real = ClientProtocol.dispatchCommand
    monkeypatch.setattr(ClientProtocol, "dispatchCommand", lambda self, box: (
        dispatched.append(box[amp.COMMAND]), real(self, box))[1])
    oids = call(a, pa, C.NewOids, count=2)["oids"]
    _, tid = commit(a, pa, [encode_store(oid, z64, b"x") for oid in oids])
    pb.flush()
    assert rec_b.invalidations == [(tid, oids)] and dispatched == []
    b.dataReceived(amp.AmpBox({b"_command": b"Invalidate", b"tid": tid, b"oids": b"",
                               b"oids.1": oids[0]}).serialize())   # AMP's split form
    assert rec_b.invalidations[1:] == [(tid, [oids[0]])] and dispatched == [b"Invalidate"]


@pytest.mark.logs_errors("an invalidation the client cannot apply drops the connection")
def test_an_invalidation_that_fails_to_apply_drops_the_connection(world):
    a, pa, b, pb, rec_b = two_clients(world)

    def broken(proto, tid, oids):
        raise RuntimeError("the cache is gone")
    rec_b.invalidated = broken
    oid = call(a, pa, C.NewOids, count=1)["oids"][0]
    commit(a, pa, [encode_store(oid, z64, b"x")])
    pb.flush()
    assert b.transport is None          # lost, as after AMP's unhandledError


def test_an_unknown_register_field_is_ignored_so_features_can_be_negotiated():
    """An older server ignores the optional fields a newer client adds to
    Register (``timeout_notice`` to one that predates it): AMP parses only
    the fields it declares."""
    box = amp.AmpBox({b"protocol": C.PROTOCOL_VERSION.encode(), b"storage": b"1",
                      b"read_only": b"False", b"a_future_flag": b"True"})
    assert C.Register.parseArguments(box, None) == dict(
        protocol=C.PROTOCOL_VERSION, storage="1", read_only=False, prefetch=None,
        long_values=None, timeout_notice=None, vote_timeout_notice=None)


def test_load_before_questions_are_answered_from_the_bytes_without_a_box(world, monkeypatch):
    """A plain LoadBefore is read by session.fast_frame; a box only for the rest."""
    from zeotwist.server.session import ServerSession
    clock, servers = world
    client, session, pump, _ = connect_in_memory(servers, clock)
    register(client, pump)
    boxes = []
    real = ServerSession.ampBoxReceived
    monkeypatch.setattr(ServerSession, "ampBoxReceived",
                        lambda self, box: boxes.append(dict(box)) or real(self, box))
    _, tid = commit(client, pump, [encode_store(z64, z64, b"root")])
    boxes.clear()
    answers = []
    for oid in (z64, z64, b"\0" * 7 + b"\5"):
        client.load_before(oid, maxtid).addBoth(answers.append)
    pump.flush()
    assert answers[:2] == [(b"root", tid, None), (b"root", tid, None)]
    # an error to map (no such object) falls back to the box and AMP's path
    assert answers[2].check(POSKeyError)
    assert [b.get(b"_command") for b in boxes] == [b"LoadBefore"]
    call(client, pump, C.LastTransaction)                 # other boxes: AMP's parser
    assert [b.get(b"_command") for b in boxes] == [b"LoadBefore", b"LastTransaction"]


def test_load_before_answers_reach_the_load_from_the_bytes_without_a_box(world, monkeypatch):
    """The client reads a plain LoadBefore answer in ClientProtocol.fast_frame."""
    from zeotwist.client.protocol import ClientProtocol
    clock, servers = world
    client, session, pump, _ = connect_in_memory(servers, clock)
    register(client, pump)
    _, tid = commit(client, pump, [encode_store(z64, z64, b"root")])
    boxes = []
    real = ClientProtocol.ampBoxReceived
    monkeypatch.setattr(ClientProtocol, "ampBoxReceived",
                        lambda self, box: boxes.append(dict(box)) or real(self, box))
    answers = []
    client.load_before(z64, maxtid).addBoth(answers.append)
    client.load_before(b"\0" * 7 + b"\5", maxtid).addBoth(answers.append)   # an error answer
    pump.flush()
    assert answers[0] == (b"root", tid, None) and answers[1].check(POSKeyError)
    assert [sorted(b) for b in boxes] == [[b"_error", b"_error_code", b"_error_description"]]
