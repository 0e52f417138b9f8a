"""The Client (connector, verification, reconnection, two-phase commit) in
memory: a real ServerSession and FileStorage behind iosim's fake link, time
on a Clock, no socket and no reactor (zeotwist.testing.MemoryEndpoint)."""
import pytest
from twisted.internet.task import Clock
from ZODB.FileStorage import FileStorage
from ZODB.POSException import ConflictError
from ZODB.utils import maxtid, p64, z64

from zeotwist.client.client import Client
from zeotwist.errors import ClientDisconnected
from zeotwist.testing import MemoryEndpoint, memory_server
from zeotwist.wire import commands as C


@pytest.fixture
def world(tmp_path):
    clock = Clock()
    server = memory_server(FileStorage(str(tmp_path / "data.fs")), clock,
                           transaction_timeout=60)
    endpoint = MemoryEndpoint({"1": server}, clock)
    yield clock, server, endpoint
    server.close()


def make_client(clock, endpoint, **kw):
    kw.setdefault("retry_policy", lambda attempt: 1.0)
    client = Client(clock, endpoint, **kw)
    client.start()
    endpoint.flush()
    return client


def result(d, endpoint):
    """The value of Deferred ``d`` once the link is quiet (raises its failure)."""
    out = []
    d.addBoth(out.append)
    endpoint.flush()
    assert out, "the Deferred did not fire"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def commit(client, endpoint, records: dict) -> bytes:
    """One transaction through the Deferred API: store ``records``, vote, finish."""
    txn = client.begin(description="test")
    for oid, (serial, data) in records.items():
        txn.store(oid, serial, data)
    result(txn.vote(), endpoint)
    return result(txn.finish(), endpoint)


def test_registration(world):
    clock, server, endpoint = world
    client = make_client(clock, endpoint)
    assert client.is_connected and client.connections == 1
    assert client.server_read_only is False and client.supports_undo
    assert client.last_transaction() == server.last_tid
    assert result(client.when_connected(), endpoint) is client.protocol
    assert len(server.sessions) == 1


def test_refused_connection_times_out_with_the_reason(world):
    clock, server, endpoint = world
    endpoint.refuse = True
    client = Client(clock, endpoint, wait_timeout=3, retry_policy=lambda attempt: 1.0)
    client.start()
    d = client.when_connected()
    clock.advance(1)
    clock.advance(1)
    assert endpoint.attempts == 3 and not d.called
    clock.advance(1)
    with pytest.raises(ClientDisconnected, match="within 3 s.*refuses"):
        result(d, endpoint)


def test_a_call_waits_wait_timeout_for_a_reconnection(world):
    """A call made while the server is away waits for a reconnection: it is
    answered if one comes within wait_timeout, and fails exactly then if not
    (what the live tests see as the message "within 1 s")."""
    clock, server, endpoint = world
    client = make_client(clock, endpoint, wait_timeout=3)
    endpoint.refuse = True
    endpoint.drop()
    assert not client.is_connected
    answered = client.info()
    clock.advance(1.5)
    assert not answered.called
    endpoint.refuse = False
    clock.advance(1)                 # the next retry reconnects; the call goes out
    assert result(answered, endpoint)["last_tid"] == server.last_tid
    endpoint.refuse = True
    endpoint.drop()
    failed = client.info()
    clock.advance(2.999)
    assert not failed.called
    clock.advance(0.001)
    with pytest.raises(ClientDisconnected, match="^no connection .* within 3 s"):
        result(failed, endpoint)


def test_commit_sequence_updates_cache_events_and_other_clients(world):
    clock, server, endpoint = world
    writer = make_client(clock, endpoint)
    reader = make_client(clock, endpoint)
    seen = {"writer": [], "reader": []}
    writer.events.subscribe(seen["writer"].append)
    reader.events.subscribe(seen["reader"].append)
    oid = result(writer.new_oid(), endpoint)
    tid = commit(writer, endpoint, {oid: (None, b"first")})
    assert writer.last_transaction() == tid == server.last_tid
    assert writer.cache.loadBefore(oid, maxtid) == (b"first", tid, None)  # from our own write
    [event] = seen["writer"]
    assert event.local and event.tid == tid and event.oids == (oid,)
    # the other client heard of it through Invalidate, before anything else
    [pushed] = seen["reader"]
    assert not pushed.local and pushed.oids == (oid,) and reader.last_transaction() == tid
    assert result(reader.load(oid), endpoint) == (b"first", tid)


def test_a_conflict_fails_the_vote_and_frees_the_server(world):
    clock, server, endpoint = world
    a, b = make_client(clock, endpoint), make_client(clock, endpoint)
    oid = result(a.new_oid(), endpoint)
    tid1 = commit(a, endpoint, {oid: (None, b"one")})
    commit(a, endpoint, {oid: (tid1, b"two")})
    txn = b.begin()
    txn.store(oid, tid1, b"stale")
    with pytest.raises(ConflictError):
        result(txn.vote(), endpoint)
    result(txn.abort(), endpoint)
    assert server.lock.holder is None


def test_a_link_cut_during_the_handshake_is_one_retry_then_registered(world):
    """The Register is lost with its link: the connection's loss and the
    handshake's failure make one retry (zeotwist.client.reconnect)."""
    clock, server, endpoint = world
    client = Client(clock, endpoint, retry_policy=lambda attempt: 1.0)
    client.start()                   # connected; Register written, not delivered
    endpoint.links[-1][0].transport.getOutBuffer()      # and lost on the way
    endpoint.drop()
    assert not client.is_connected and len(clock.getDelayedCalls()) == 1
    clock.advance(1)
    endpoint.flush()
    assert client.is_connected and client.connections == 1 and endpoint.attempts == 2


def test_stop_during_the_handshake_closes_the_connection_and_ends(world):
    clock, server, endpoint = world
    client = Client(clock, endpoint, retry_policy=lambda attempt: 1.0)
    client.start()
    waiting = []
    client.when_connected().addBoth(waiting.append)
    stopped = client.stop()
    endpoint.flush()
    assert result(stopped, endpoint) is None
    assert waiting[0].check(ClientDisconnected)
    assert not client.is_connected and len(server.sessions) == 0
    clock.advance(10)
    assert endpoint.attempts == 1 and clock.getDelayedCalls() == []


def test_verification_after_reconnection_invalidates_what_changed(world):
    clock, server, endpoint = world
    client = make_client(clock, endpoint)
    other = make_client(clock, endpoint)
    oid = result(client.new_oid(), endpoint)
    tid1 = commit(client, endpoint, {oid: (None, b"one")})
    result(other.load(oid), endpoint)
    client_link = endpoint.links[0]
    client_link[0].transport.loseConnection()
    endpoint.flush()
    assert not client.is_connected
    tid2 = commit(other, endpoint, {oid: (tid1, b"two")})     # while client is away
    assert client.cache.loadBefore(oid, maxtid) == (b"one", tid1, None)     # stale for now
    early = []

    def before_visible(event):       # ZODB's DB sees it before the tid is visible
        early.append((event.tid, event.oids, client.last_transaction()))

    client.events.subscribe(before_visible, before_visible=True)
    clock.advance(1)                 # the retry policy's delay
    endpoint.flush()
    assert client.is_connected and client.connections == 2
    assert early == [(tid2, (oid,), tid1)]
    assert client.last_transaction() == tid2
    assert client.cache.loadBefore(oid, maxtid) is None
    assert result(client.load(oid), endpoint) == (b"two", tid2)


def future_cache_client(clock, endpoint, **kw):
    client = Client(clock, endpoint, retry_policy=lambda attempt: 1.0, **kw)
    client.cache.store(p64(1), p64(5), None, b"from a lost future")
    client.cache.last_tid = p64(2**60)
    return client


def test_a_server_older_than_the_cache_is_refused(world):
    clock, server, endpoint = world
    client = future_cache_client(clock, endpoint)
    client.start()
    endpoint.flush()
    assert not client.is_connected and len(client.cache) == 1
    assert "older than this client's cache" in str(client.connector.last_error)
    result(client.stop(), endpoint)


def test_an_allowed_older_server_drops_the_cache(world):
    clock, server, endpoint = world
    client = future_cache_client(clock, endpoint, allow_older_server=True)
    events = []
    client.events.subscribe(events.append)
    client.start()
    endpoint.flush()
    assert client.is_connected and len(client.cache) == 0
    assert events[-1].reset and client.last_transaction() == server.last_tid


def test_a_transaction_does_not_survive_a_reconnection(world):
    clock, server, endpoint = world
    client = make_client(clock, endpoint)
    oid = result(client.new_oid(), endpoint)
    txn = client.begin()
    txn.store(oid, z64, b"x" * (C.STORE_CHUNK + 1))     # the first piece is sent now
    endpoint.drop()
    clock.advance(1)
    endpoint.flush()
    assert client.is_connected
    with pytest.raises(ClientDisconnected):
        result(txn.vote(), endpoint)
    assert server.lock.holder is None


def test_oids_are_not_reused_after_reconnection(world):
    clock, server, endpoint = world
    client = make_client(clock, endpoint)
    first = result(client.new_oid(), endpoint)
    assert client.oids.take() is not None        # the pool was filled
    endpoint.drop()
    clock.advance(1)
    endpoint.flush()
    assert client.oids.take() is None            # emptied at registration
    assert result(client.new_oid(), endpoint) > first
