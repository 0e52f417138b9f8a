"""ZEO's names and habits that tools and programs written for ZEO rely on
(issue 13, items 13 and 14): ``storage._cache.clear()`` and ``ping()``,
``zeotwist.DB(port)`` with a bare port, a thread waiting in ``tpc_begin``
when the storage is closed, a text serial given to ``store()``.

Live server on 127.0.0.1 with a FileStorage in tmp_path (conftest).
"""
import threading
import time

import pytest
import transaction
from ZODB.Connection import TransactionMetaData
from ZODB.utils import p64, z64

import zeotwist
from zeotwist.client.reactorthread import background_reactor
from zeotwist.errors import ClientDisconnected


def _commit(storage, oid, data, serial=z64):
    t = TransactionMetaData()
    storage.tpc_begin(t)
    storage.store(oid, serial, data, "", t)
    storage.tpc_vote(t)
    return storage.tpc_finish(t)


def _server_loads(storage) -> int:
    return storage.server_status()["loads"]


def test_cache_clear_sends_the_next_load_to_the_server(make_client):
    cs = make_client()
    oid = cs.new_oid()
    tid = _commit(cs, oid, b"record")
    assert cs.load(oid) == (b"record", tid)      # cached at commit
    before = _server_loads(cs)
    assert cs.load(oid) == (b"record", tid)
    assert _server_loads(cs) == before           # a cache hit: no load sent
    assert len(cs._cache) >= 1 and cs._cache.getLastTid() == tid

    cs._cache.clear()
    assert len(cs._cache) == 0
    assert cs.load(oid) == (b"record", tid)
    assert _server_loads(cs) == before + 1       # went to the server
    assert cs.load(oid) == (b"record", tid)
    assert _server_loads(cs) == before + 1       # and is cached again


@pytest.mark.parametrize("prefetch", [False, True])
def test_cold_reads_through_zodb_after_cache_clear(make_client, prefetch):
    """zodbshootout's cold read: minimize ZODB's cache, clear the client
    cache, read every object: each one comes from the server — in its own
    round trip without reference prefetch; with it, the 20 objects ride along
    with the root's answer (docs/performance.md, "Reference prefetch")."""
    from ZODB import DB
    from persistent.mapping import PersistentMapping
    db = DB(make_client(reference_prefetch=prefetch))
    try:
        with db.transaction() as conn:
            for i in range(20):
                conn.root()[i] = PersistentMapping(value=i)
        db.cacheMinimize()
        storage = db.storage
        storage._cache.clear()
        before = _server_loads(storage)
        with db.transaction() as conn:
            assert sum(conn.root()[i]["value"] for i in range(20)) == sum(range(20))
        # the root and 20 objects; with prefetch, the root only
        assert _server_loads(storage) - before == (1 if prefetch else 21)
    finally:
        db.close()


def test_ping_is_a_round_trip(make_client, server):
    cs = make_client()
    assert cs.ping() is None
    server.stop()
    with pytest.raises(ClientDisconnected):
        cs._client.wait_timeout = 0.5
        cs.ping()


def test_DB_with_a_bare_port(server):
    host, port = server.address
    assert host == "127.0.0.1"
    db = zeotwist.DB(port, reactor=background_reactor(), wait_timeout=10)
    try:
        with db.transaction() as conn:
            conn.root()["x"] = 1
        with db.transaction() as conn:
            assert conn.root()["x"] == 1
        assert db.storage.is_connected()
    finally:
        db.close()


def test_bare_port_endpoint_strings():
    from zeotwist.client.addresses import endpoint_string, to_endpoint
    assert endpoint_string(8100) == "tcp:host=127.0.0.1:port=8100"
    with pytest.raises(TypeError):
        endpoint_string(True)
    assert to_endpoint(background_reactor(), 8100)._port == 8100


def test_text_serial_in_store_is_a_type_error_naming_it(make_client):
    cs = make_client()
    oid = cs.new_oid()
    t = TransactionMetaData()
    cs.tpc_begin(t)
    with pytest.raises(TypeError, match="serial must be 8 bytes, not str"):
        cs.store(oid, "0000000000000000", b"data", "", t)
    with pytest.raises(TypeError, match="oid must be 8 bytes"):
        cs.store(b"\0" * 4, z64, b"data", "", t)
    with pytest.raises(TypeError, match="data must be bytes"):
        cs.store(oid, z64, "text", "", t)
    cs.tpc_abort(t)
    # nothing was lost: the same storage commits the right values
    tid = _commit(cs, oid, b"data")
    assert cs.load(oid) == (b"data", tid)


def test_records_refuse_bad_arguments_in_memory():
    from zeotwist.wire.records import encode_check, encode_store
    assert len(encode_store(p64(1), z64, b"x")) == 22
    with pytest.raises(TypeError, match="serial"):
        encode_store(p64(1), "\0" * 8, b"x")
    with pytest.raises(TypeError, match="serial"):
        encode_check(p64(1), b"\0" * 9)


def test_tpc_begin_waiting_when_the_storage_closes_fails(make_client):
    cs = make_client()
    first, second = TransactionMetaData(), TransactionMetaData()
    cs.tpc_begin(first)
    outcome = []

    def begin_second():
        try:
            cs.tpc_begin(second)
            outcome.append("began")
        except Exception as e:
            outcome.append(e)

    waiter = threading.Thread(target=begin_second, daemon=True)
    waiter.start()
    deadline = time.monotonic() + 10
    while not cs._tpc_cond._waiters:           # the thread waits in tpc_begin
        assert time.monotonic() < deadline and waiter.is_alive()
        time.sleep(0.005)                      # polling a real condition, bounded
    cs.close()
    waiter.join(5)
    assert not waiter.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], ClientDisconnected)
    assert "closed" in str(outcome[0])
    with pytest.raises(ClientDisconnected):
        cs.tpc_begin(TransactionMetaData())
    transaction.abort()
