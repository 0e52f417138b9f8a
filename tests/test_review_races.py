"""Adversarial checks of the commit and load fast paths (issue 10's review).

Each test pins one way an optimisation could weaken MVCC, durability or the
error answers: a real server on 127.0.0.1 with a FileStorage in a temp dir,
blocking clients on zeotwist's background reactor (tests/conftest.py).
"""
import threading
import time

import pytest
from ZODB.Connection import TransactionMetaData
from twisted.protocols import amp
from ZODB.utils import p64, z64

from zeotwist.client.transaction import ClientTransaction
from zeotwist.errors import ClientDisconnected


def _commit(cs, oid, serial, data):
    t = TransactionMetaData()
    cs.tpc_begin(t)
    cs.store(oid, serial, data, "", t)
    cs.tpc_vote(t)
    return cs.tpc_finish(t)


def _wait_for(predicate, what, limit: float = 30.0):
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("never happened: " + (what if isinstance(what, str) else what()))
        time.sleep(0.005)


@pytest.mark.parametrize("path", ["thread", "reactor"])
def test_a_finish_answered_after_the_client_gave_up_still_reaches_its_cache(
        server, make_client, monkeypatch, path):
    """The server commits a transaction whose Finish the client stopped
    waiting for (its timeout): when the answer arrives after all, the cache
    must learn of the commit, or it serves the old revision as current for
    good (nobody else sends this client its own commit's invalidation)."""
    if path == "reactor":   # the Deferred path, not the committing thread's
        monkeypatch.setattr(ClientTransaction, "finish_from_thread",
                            lambda self, callback=None: None)
    served = server.server
    served.inline_commit_bytes = 0          # tpc_finish in the worker thread
    storage = served.storage
    entered, release = threading.Event(), threading.Event()
    real_finish = storage.tpc_finish

    def held_finish(*args, **kw):
        entered.set()
        release.wait(60)
        return real_finish(*args, **kw)

    cs = make_client(timeout=1.0)
    first = _commit(cs, z64, z64, b"one")
    assert cs.load(z64) == (b"one", first)
    monkeypatch.setattr(storage, "tpc_finish", held_finish)
    t = TransactionMetaData()
    cs.tpc_begin(t)
    cs.store(z64, first, b"two", "", t)
    cs.tpc_vote(t)
    try:
        with pytest.raises(ClientDisconnected):
            cs.tpc_finish(t)        # the client gives up waiting
        assert entered.is_set()
    finally:
        release.set()
    _wait_for(lambda: served.last_tid != first, "the held commit finished")
    second = served.last_tid
    cs.tpc_abort(t)                 # as ZODB does after tpc_finish raised
    with pytest.raises(Exception):
        cs.load(p64(999))           # a round trip: the Finish answer came before it
    assert cs.lastTransaction() == second
    assert cs.load(z64) == (b"two", second)


def test_a_client_gone_in_the_middle_of_a_big_answer_frees_its_output(server, make_client):
    """A 6 MB record is written from its own object (emit_parts, adopted
    by the transport); a raw client that reads a little of it and closes
    leaves nothing counted against the server's output budget, and the
    server goes on serving (no error logged: the autouse fixture)."""
    import socket
    from twisted.protocols import amp
    from zeotwist.wire import commands as C
    from zeotwist.wire import loadframes
    from rawamp import RawClient
    cs = make_client()
    oid = cs.new_oid()
    record = bytes(range(256)) * (6 * 2**20 // 256)
    _commit(cs, oid, z64, record)
    budgets = server.service.factory.budgets
    for _ in range(3):
        raw = RawClient(server.address)
        answer = raw.ask(C.Register, protocol=C.PROTOCOL_VERSION, storage="1",
                         read_only=True, long_values=True)
        assert amp.ANSWER in answer, answer
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.sock.sendall(loadframes.load_before_request(b"9", oid, b"\xff" * 8))
        assert raw.sock.recv(100)           # the answer has begun
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        raw.close()                         # a reset, the answer half sent
    _wait_for(lambda: budgets.output.total == 0, "the output budget freed")
    assert make_client().load(oid)[0] == record     # a cold load, served as before


def test_a_vote_the_timeout_aborted_is_never_answered_as_a_success(tmp_path):
    """An older client (no ``timeout_notice``) whose vote, running in the
    storage's worker, ends just as the transaction timeout aborts it: the
    connection is aborted, and the vote's late result must not reach the
    client as a successful vote (it would call tpc_finish on a transaction
    the server threw away).  The storage's vote ends when the server logs
    its timeout line, and the reactor waits there until the worker has
    handed the result back, so the result lands between the abort and
    connectionLost every time."""
    from twisted.logger import formatEvent, globalLogPublisher
    from twisted.protocols import amp
    from rawamp import RawClient
    from zeotwist.testing import start_server
    from zeotwist.wire import commands as C
    from zeotwist.wire.records import encode_store

    running = start_server(str(tmp_path / "data.fs"), transaction_timeout=0.5)
    served = running.server
    served.inline_commit_bytes = 0              # the vote runs in the worker
    storage = served.storage
    go, voted = threading.Event(), threading.Event()
    real_vote = storage.tpc_vote

    def held_vote(txn):
        go.wait(30)
        try:
            return real_vote(txn)
        finally:
            voted.set()

    def observe(event):
        if str(event.get("log_namespace")) == "zeotwist.server.session" and \
                formatEvent(event).startswith("transaction timeout"):
            go.set()                    # the vote ends now, the abort is under way
            voted.wait(30)
            deadline = time.monotonic() + 30
            while not running.reactor.threadCallQueue and time.monotonic() < deadline:
                time.sleep(0.001)       # the worker hands its result to the reactor

    raw = RawClient(running.address)
    globalLogPublisher.addObserver(observe)
    try:
        raw.register("1")
        oid = C.NewOids.parseResponse(raw.ask(C.NewOids, count=1), None)["oids"][0]
        storage.tpc_vote = held_vote
        raw.send(C.TpcBegin, user=b"", description=b"", extension=b"")
        raw.send(C.StoreData, data=encode_store(oid, z64, b"data"))
        raw.sock.sendall(raw.box(C.Vote, True))
        answers = []
        try:
            while True:
                answers.append(raw.reader.box())
        except (ConnectionError, OSError):
            pass                        # the server dropped the connection
        assert not [a for a in answers if amp.ANSWER in a], answers
        assert go.is_set()
        assert storage.lastTransaction() == z64     # nothing committed
    finally:
        go.set()
        globalLogPublisher.removeObserver(observe)
        raw.close()
        storage.tpc_vote = real_vote
        running.stop()


@pytest.mark.logs_errors("the storage's vote and finish raise on purpose")
@pytest.mark.parametrize("path", ["thread", "reactor"])
@pytest.mark.parametrize("inline", [True, False])
def test_an_unexpected_storage_error_in_vote_or_finish_is_a_typed_answer(
        server, make_client, monkeypatch, path, inline):
    """Vote and Finish are answered without AMP's dispatch (session._fast_ask):
    a storage error no command declares still reaches the client as a typed
    error (StorageServerError), at once, and the connection goes on serving."""
    from ZODB.POSException import StorageError
    from zeotwist.errors import StorageServerError
    if path == "reactor":
        monkeypatch.setattr(ClientTransaction, "vote_from_thread", lambda self: None)
        monkeypatch.setattr(ClientTransaction, "finish_from_thread",
                            lambda self, callback=None: None)
    served = server.server
    if not inline:
        served.inline_commit_bytes = 0
    storage = served.storage
    cs = make_client()
    first = _commit(cs, z64, z64, b"one")
    for method in ("tpc_vote", "tpc_finish"):
        real = getattr(storage, method)

        def broken(*args, **kw):
            raise RuntimeError("disk on fire")
        monkeypatch.setattr(storage, method, broken)
        t = TransactionMetaData()
        cs.tpc_begin(t)
        cs.store(z64, first, b"two", "", t)
        with pytest.raises((StorageServerError, StorageError)) as caught:
            cs.tpc_vote(t)
            cs.tpc_finish(t)
        assert "disk on fire" in str(caught.value)
        cs.tpc_abort(t)
        monkeypatch.setattr(storage, method, real)
        assert cs.is_connected()
    second = _commit(cs, z64, first, b"three")     # the same connection commits
    assert cs.load(z64) == (b"three", second)
    assert cs.client.connections == 1               # never dropped


def test_loaders_that_do_not_read_cannot_spend_the_output_budget_many_times(
        tmp_path, monkeypatch):
    """Connections that each ask for one 8 MB record and read nothing: a
    burst that begins while the server's output budget is spent must wait
    (its boxes held) instead of having its first answer written anyway, or
    N connections hold N big records however small --memory-budget is.
    (The budget's periodic re-check, which drops the greediest reader, is
    held off here, so what is written is what the bursts decided.)"""
    import socket
    from twisted.protocols import amp
    from rawamp import RawClient
    from zeotwist import ClientStorage
    from zeotwist.client.reactorthread import background_reactor
    from zeotwist.server.session import ServerSession
    from zeotwist.testing import start_server
    from zeotwist.wire import commands as C
    from zeotwist.wire import loadframes

    size, connections = 8 * 2**20, 8
    monkeypatch.setattr(ServerSession, "OUTPUT_CHECK_INTERVAL", 3600.0)
    running = start_server(str(tmp_path / "data.fs"), memory_budget=16 * 2**20)
    cs = ClientStorage(running.address, reactor=background_reactor(), wait_timeout=10)
    raws = []
    try:
        oid = cs.new_oid()
        _commit(cs, oid, z64, b"r" * size)
        served = running.server
        for i in range(connections):
            raw = RawClient(running.address)
            raws.append(raw)
            answer = raw.ask(C.Register, protocol=C.PROTOCOL_VERSION, storage="1",
                             read_only=True, long_values=True)
            assert amp.ANSWER in answer, answer
            raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        for raw in raws:        # registered while the budget had room; now each asks
            raw.sock.sendall(loadframes.load_before_request(b"9", oid, b"\xff" * 8))
        loaders = lambda: [s for s in list(served.sessions) if s.read_only]     # noqa: E731
        _wait_for(lambda: len(loaders()) == connections and all(
            s._unread >= size or s._held or s.transport is None for s in loaders()),
            lambda: "every loader's request read: %r" % [
                (s._unread, s._held, s.transport is None, s._budget) for s in loaders()])
        answered = [s for s in loaders() if s._unread >= size]
        assert 1 <= len(answered) <= 3, "%d of %d non-reading loaders got their %d MB " \
            "answer with a 8 MB output budget" % (len(answered), connections, size >> 20)
    finally:
        for raw in raws:
            raw.close()
        cs.close()
        running.stop()


@pytest.mark.parametrize("in_worker", ["vote", "finish"])
def test_one_commit_split_between_the_worker_and_the_reactor_thread(
        server, make_client, monkeypatch, in_worker):
    """A small commit's calls run inline only while the worker is idle, so
    one transaction may vote in the worker and finish on the reactor thread
    (or the reverse): the storage's commit lock, taken in one thread and
    released in the other, must allow it, and the commits go on."""
    from zeotwist.server import commit
    threads = server.server.threads
    inline = threads.inline_or_in_order
    where = {}

    def split(f, *args):
        name = f.__name__
        run = threads.in_order if name == in_worker else inline
        where[name] = threading.current_thread().name if run is inline else "worker"
        return run(f, *args)

    monkeypatch.setattr(threads, "inline_or_in_order", split)
    cs = make_client()
    serial = z64
    for data in (b"one", b"two", b"three"):
        serial = _commit(cs, z64, serial, data)
    assert where[in_worker] == "worker" and set(where) >= {commit.vote.__name__, "finish"}
    assert threads.inline_calls >= 3                # the other half ran inline
    assert make_client().load(z64) == (b"three", serial)


@pytest.mark.parametrize("how", ["emit_parts", "sendBox"])
def test_a_big_value_the_reactor_writes_waits_behind_a_threads_unfinished_frame(how):
    """The client's writes from the reactor thread and from application
    threads (threadwrites) share one lock and queue behind a thread's
    partly sent frame: a frame sent from a big value's own object
    (emit_parts, and sendBox for a long value) too, or its bytes land in the
    middle of the thread's frame and the server reads garbage."""
    from test_thread_loads import OID, TID, connected, stored
    from zeotwist.wire import commands as C
    from zeotwist.wire.sending import BULK_MIN
    proto, sock, owner = connected()
    sock.room = 5
    load = proto.load_before_from_thread(OID, TID, stored()[1])
    from zeotwist.wire import loadframes
    fast_request = loadframes.load_before_request(load.tag, OID, TID)
    assert sock.sent == [fast_request[:5]]
    sock.room = 10**9
    value = b"v" * BULK_MIN
    if how == "emit_parts":
        proto.emit_parts(b"HEAD", value, b"TAIL")
        frame = b"HEAD" + value + b"TAIL"
    else:
        proto.long_values = True
        box = amp.AmpBox(_command=C.LoadBlobChunk.commandName)
        box[b"data"] = value
        proto.sendBox(box)
        frame = None                    # a long entry: compared below by its length
    assert sock.sent == [fast_request[:5]]          # nothing overtook the rest
    f, a = owner.queued.pop()
    f(*a)
    sock.flush()
    sent = b"".join(sock.sent)
    assert sent.startswith(fast_request)
    if frame is not None:
        assert sent == fast_request + frame
    else:
        assert value in sent and len(sent) > len(fast_request) + len(value)


def test_blob_chunks_answered_by_a_busy_worker_stay_within_the_output_budget(tmp_path):
    """A client that pipelines LoadBlobChunk requests (1 MiB each) and reads
    nothing, while the storage's worker is busy: the reads queue in the
    worker, so the burst that read the requests emitted nothing and did not
    pause; once the worker answers, every chunk lands in the transport.  The
    unread output must stay near the budget (or the reader be dropped),
    not grow by a MiB per request."""
    import socket
    from rawamp import RawClient
    from zeotwist import ClientStorage
    from zeotwist.client.reactorthread import background_reactor, blocking_call
    from zeotwist.server.limits import pending_output
    from zeotwist.testing import start_server
    from zeotwist.wire import commands as C

    size, requests, budget = 4 * 2**20, 64, 16 * 2**20
    running = start_server(str(tmp_path / "data.fs"), blob_dir=str(tmp_path / "blobs"),
                           memory_budget=budget)
    cs = ClientStorage(running.address, reactor=background_reactor(), wait_timeout=10,
                       blob_dir=str(tmp_path / "cache"))
    gate = threading.Event()
    raw = None
    try:
        src = tmp_path / "blob.bin"
        src.write_bytes(b"b" * size)
        oid = cs.new_oid()
        t = TransactionMetaData()
        cs.tpc_begin(t)
        cs.storeBlob(oid, z64, b"record", str(src), "", t)
        cs.tpc_vote(t)
        serial = cs.tpc_finish(t)
        served = running.server
        worker = served.threads._worker
        blocking_call(running.reactor, lambda: served.threads.in_order(gate.wait, 60) and None)
        _wait_for(lambda: worker.pending == 1, "the worker busy")
        raw = RawClient(running.address)
        raw.ask(C.Register, protocol=C.PROTOCOL_VERSION, storage="1", read_only=True,
                long_values=True)
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        session = next(s for s in list(served.sessions) if s.read_only)
        raw.sock.sendall(b"".join(
            raw.box(C.LoadBlobChunk, True, oid=oid, serial=serial, offset=0,
                    length=C.BLOB_LOAD_MAX) for _ in range(requests)))
        _wait_for(lambda: worker.pending >= requests + 1 or session._held is not None,
                  "the requests read (or the reading paused)")
        gate.set()
        _wait_for(lambda: worker.pending == 0 and (
            session._held is None or session.transport is None), "the worker answered")
        unread = pending_output(session.transport) if session.transport is not None else 0
        assert unread <= budget, "%.0f MiB unread by a client that reads nothing " \
            "(--memory-budget %d MiB)" % (unread / 2**20, budget >> 20)
    finally:
        gate.set()
        if raw is not None:
            raw.close()
        cs.close()
        running.stop()
