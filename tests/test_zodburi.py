"""The ``zeotwist://`` zodburi resolver (issue 13, item 8): a real
``zodburi.resolve_uri`` against a live server over TCP and over a Unix
socket, the DB keyword arguments zodburi users pass, and the parsing on
its own (address forms, conversions, refusals).
"""
from importlib.metadata import entry_points

import pytest
import transaction
import zodburi
from ZODB import DB

import zeotwist.config
from zeotwist.client.reactorthread import background_reactor
from zeotwist.client.storage import ClientStorage
from zeotwist.testing import start_server
from zeotwist.uri import client_arguments, parse_address


@pytest.fixture(autouse=True)
def bg_reactor(monkeypatch):
    """URI-opened clients take zeotwist.config.reactor, as configured ones do."""
    monkeypatch.setattr(zeotwist.config, "reactor", background_reactor())


def _round_trip(db):
    with db.transaction() as conn:
        conn.root()["greeting"] = "hello"
    with db.transaction() as conn:
        assert conn.root()["greeting"] == "hello"


def test_resolve_uri_over_tcp(server):
    host, port = server.address
    factory, dbkw = zodburi.resolve_uri(
        "zeotwist://%s:%d?storage=1&cache_size=1MB&wait_timeout=10&database_name=main"
        "&connection_cache_size=5000&connection_pool_size=3" % (host, port))
    assert dbkw == {"database_name": "main", "cache_size": 5000, "pool_size": 3}
    storage = factory()
    assert isinstance(storage, ClientStorage)
    assert storage._cache.size_limit == 2**20
    db = DB(storage, **dbkw)
    try:
        assert db.database_name == "main" and db.getCacheSize() == 5000
        assert db.getPoolSize() == 3
        _round_trip(db)
        assert server.server.info()["commits"] >= 1        # it went to this server
    finally:
        db.close()
    transaction.abort()


def test_resolve_uri_over_a_unix_socket(tmp_path):
    path = str(tmp_path / "zt.sock")
    server = start_server(str(tmp_path / "data.fs"), listen="unix:%s" % path)
    try:
        factory, dbkw = zodburi.resolve_uri("zeotwist://%s?wait_timeout=10" % path)
        db = DB(factory(), **dbkw)
        try:
            _round_trip(db)
            assert db.storage._addr == path
        finally:
            db.close()
    finally:
        server.stop()


def test_read_only_from_the_uri(server):
    factory, dbkw = zodburi.resolve_uri(
        "zeotwist://%s:%d?read_only=true&wait_timeout=10" % server.address)
    storage = factory()
    try:
        assert storage.isReadOnly()
    finally:
        storage.close()


def test_registered_as_a_zodburi_entry_point():
    names = {ep.name: ep.value for ep in entry_points(group="zodburi.resolvers")}
    assert names["zeotwist"] == "zeotwist.uri:resolve_uri"


def test_address_forms():
    assert parse_address("zeotwist://db.example.com:8200") == (("db.example.com", 8200), "")
    assert parse_address("zeotwist://db.example.com?storage=x") == \
        (("db.example.com", 8100), "storage=x")
    assert parse_address("zeotwist://[::1]:8300") == (("::1", 8300), "")
    assert parse_address("zeotwist:///var/run/zt.sock?read_only=1") == \
        ("/var/run/zt.sock", "read_only=1")
    for bad in ("zeotwist://host:port", "zeotwist://", "zeo://host:1", "zeotwist:host"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_query_conversions():
    kw, rest = client_arguments(
        "storage=main&cache_size=50MB&blob_cache_size=1gb&wait_timeout=2.5&read_only=on"
        "&wait=false&blob_dir=/b&tls_ca=/ca.pem&tls_hostname=db&database_name=x"
        "&drop_cache_rather_verify=0")
    assert kw == dict(storage="main", cache_size=50 * 2**20, blob_cache_size=2**30,
                      wait_timeout=2.5, read_only=True, wait=False, blob_dir="/b",
                      tls=dict(ca="/ca.pem", hostname="db"))
    assert rest == {"database_name": "x"}
    assert client_arguments("tls=1")[0] == {"tls": True}
    assert client_arguments("tls=0")[0] == {}


@pytest.mark.parametrize("query, words", [
    ("cache_size=lots", "cache_size"),
    ("read_only=maybe", "not a boolean"),
    ("client_label=x", "zeotwist has no client_label"),
])
def test_bad_query_values_are_named(query, words):
    with pytest.raises(ValueError, match=words):
        client_arguments(query)


def test_unknown_keys_are_refused_by_zodburi():
    with pytest.raises(zodburi.UnknownDatabaseKeywords, match="colour"):
        zodburi.resolve_uri("zeotwist://localhost:8100?colour=blue")
