"""The ZConfig component (``%import zeotwist`` / ``<zeotwistclient>``) and
the ZEO-shaped helpers ``zeotwist.client``, ``zeotwist.DB`` and
``zeotwist.connection``, against a live server.

Configured ClientStorages get their reactor from ``zeotwist.config.reactor``
(configuration text cannot name one); the ``bg_config`` fixture points it at
the background reactor, as every blocking client in this suite must use.
"""
import io

import pytest
import transaction
import ZConfig
import ZODB.config
from ZODB.POSException import ReadOnlyError

import zeotwist
import zeotwist.config
from zeotwist.client.reactorthread import background_reactor
from zeotwist.client import storage as storage_module
from zeotwist.client.storage import ClientStorage
from zeotwist.errors import ClientDisconnected, UnknownStorage
from zeotwist.testing import start_server


@pytest.fixture
def bg_config(monkeypatch):
    monkeypatch.setattr(zeotwist.config, "reactor", background_reactor())


@pytest.fixture
def closing():
    """Close every storage or DB handed to it at the end of the test."""
    things = []
    yield lambda x: things.append(x) or x
    for x in reversed(things):
        x.close()


def hostport(server) -> str:
    host, port = server.address
    return "%s:%d" % (host, port)


def section(server_line: str, *keys: str) -> str:
    body = "\n".join("    " + k for k in (server_line,) + keys)
    return "%%import zeotwist\n<zeotwistclient>\n%s\n</zeotwistclient>\n" % body


def database_conf(server_line: str, *keys: str) -> str:
    body = "\n".join("    " + k for k in (server_line,) + keys)
    return "%%import zeotwist\n<zodb>\n  <zeotwistclient>\n%s\n  </zeotwistclient>\n</zodb>\n" % body


def commit_and_read_back(db, key="k", value="v"):
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    try:
        conn.root()[key] = value
        tm.commit()
        return conn.root()[key]
    finally:
        tm.abort()
        conn.close()


def read_fresh(db, key):
    """``key`` as a new connection of ``db`` sees it."""
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    try:
        return conn.root().get(key)
    finally:
        tm.abort()
        conn.close()


# -- configuration: a working database ------------------------------------------

def test_database_from_url(server, bg_config, closing, tmp_path):
    path = tmp_path / "client.conf"
    path.write_text(database_conf("server " + hostport(server), "wait-timeout 10"))
    db = closing(ZODB.config.databaseFromURL(str(path)))
    assert isinstance(db.storage, ClientStorage)
    assert db.storage.client.reactor is background_reactor()
    assert commit_and_read_back(db, "answer", 42) == 42
    other = closing(zeotwist.DB(server.address, reactor=background_reactor(), wait_timeout=10))
    assert read_fresh(other, "answer") == 42


def test_server_address_becomes_a_tuple():
    config, _ = ZConfig.loadConfigFile(
        ZODB.config.getStorageSchema(), io.StringIO(section("server localhost:8100")))
    assert config.storage.config.server == [("localhost", 8100)]


@pytest.mark.parametrize("form", ["path", "endpoint"])
def test_unix_socket_server(tmp_path, bg_config, form):
    sock = tmp_path / "z.sock"
    srv = start_server(str(tmp_path / "u.fs"), listen="unix:" + str(sock))
    try:
        line = "server " + (str(sock) if form == "path" else "unix:path=" + str(sock))
        db = ZODB.DB(ZODB.config.storageFromString(section(line, "wait-timeout 10")))
        try:
            assert commit_and_read_back(db, "via", form) == form
        finally:
            db.close()
    finally:
        srv.stop()


# -- each key is honoured ---------------------------------------------------------

def test_every_key_reaches_client_storage(monkeypatch):
    """The datatype passes each key to ClientStorage under its own name."""
    seen = {}

    class Recorder:
        def __init__(self, addr, **kw):
            seen.update(kw, addr=addr)

    sentinel = object()
    monkeypatch.setattr(storage_module, "ClientStorage", Recorder)
    monkeypatch.setattr(zeotwist.config, "reactor", sentinel)
    ZODB.config.storageFromString(section(
        "server 127.0.0.1:9", "storage other", "cache-size 3MB", "name fred",
        "read-only on", "wait off", "wait-timeout 1.5", "timeout 7",
        "server-sync on", "client fred", "var /tmp/x", "read-only-fallback on",
        "allow-older-server on", "server 127.0.0.1:10", "reference-prefetch off"))
    assert seen == dict(addr=[("127.0.0.1", 9), ("127.0.0.1", 10)], storage="other",
                        cache_size=3 * 2**20, name="fred", read_only=True, wait=False,
                        wait_timeout=1.5, timeout=7.0, server_sync=True, reactor=sentinel,
                        client="fred", var="/tmp/x", read_only_fallback=True,
                        allow_older_server=True, reference_prefetch=False)


def test_defaults_match_client_storage(monkeypatch):
    seen = {}
    monkeypatch.setattr(storage_module, "ClientStorage", lambda addr, **kw: seen.update(kw))
    ZODB.config.storageFromString(section("server 127.0.0.1:9"))
    assert seen == dict(storage="1", cache_size=20 * 2**20, name="", read_only=False,
                        wait=True, wait_timeout=30.0, timeout=300.0, server_sync=False,
                        reference_prefetch=True, reactor=None)


def test_read_only(server, bg_config, closing):
    writer = closing(zeotwist.DB(server.address, reactor=background_reactor(), wait_timeout=10))
    commit_and_read_back(writer, "before", 1)
    storage = ZODB.config.storageFromString(
        section("server " + hostport(server), "read-only on", "wait-timeout 10"))
    db = closing(ZODB.DB(storage))
    assert storage.isReadOnly()
    assert read_fresh(db, "before") == 1          # reads work
    with pytest.raises(ReadOnlyError):
        commit_and_read_back(db, "after", 2)


def test_name_cache_size_and_server_sync(server, bg_config, closing):
    storage = closing(ZODB.config.storageFromString(section(
        "server " + hostport(server), "name shop", "cache-size 1234KB",
        "server-sync on", "wait-timeout 10")))
    assert storage.getName() == "shop"
    assert storage.client.cache.size_limit == 1234 * 1024
    assert storage.client.cache.stats()["limit"] == 1234 * 1024
    # server-sync: after another client commits, sync() has the new tid.
    writer = closing(zeotwist.DB(server.address, reactor=background_reactor(), wait_timeout=10))
    commit_and_read_back(writer, "x", 1)
    storage.sync()
    assert storage.lastTransaction() == writer.storage.lastTransaction()


def test_storage_name_mismatch_is_a_clear_error(server, bg_config):
    with pytest.raises(UnknownStorage, match="no storage named 'nosuch'"):
        ZODB.config.storageFromString(section(
            "server " + hostport(server), "storage nosuch", "wait-timeout 0.5"))


def test_wait_off_returns_at_once(tmp_path, bg_config, closing):
    missing = tmp_path / "nobody.sock"       # nothing listens: ENOENT, no traffic
    storage = closing(ZODB.config.storageFromString(
        section("server " + str(missing), "wait off", "wait-timeout 0.2")))
    assert not storage.is_connected()
    with pytest.raises(ClientDisconnected):
        storage.getSize()                     # a call waits wait-timeout, then fails


def test_wait_timeout_bounds_opening(tmp_path, bg_config):
    missing = tmp_path / "nobody.sock"
    with pytest.raises(ClientDisconnected, match="within 0.2 s"):
        ZODB.config.storageFromString(section("server " + str(missing), "wait-timeout 0.2"))


# -- bad configuration is a ZConfig error ----------------------------------------------

@pytest.mark.parametrize("keys, message", [
    (("server 127.0.0.1:9", "bogus 1"), "not a known key"),
    (("server 127.0.0.1:9", "client-label x"), "not a known key"),    # ZEO key, unsupported
    (("storage 1",), "server"),                                       # required
    (("server localhost",), "has no port"),
    (("server tcp:host=localhost:port=abc",), "cannot use endpoint string"),
    (("server 127.0.0.1:9", "cache-size lots"), "lots"),
    (("server 127.0.0.1:9", "read-only perhaps"), "perhaps"),
])
def test_bad_configuration(keys, message):
    text = "%%import zeotwist\n<zeotwistclient>\n%s\n</zeotwistclient>\n" % "\n".join(keys)
    with pytest.raises(ZConfig.ConfigurationError, match=message):
        ZODB.config.storageFromString(text)


@pytest.mark.parametrize("value, expected", [
    ("localhost:8100", ("localhost", 8100)),
    ("8100", ("127.0.0.1", 8100)),
    ("[::1]:8100", ("::1", 8100)),
    ("/run/zeo/zeo.sock", "/run/zeo/zeo.sock"),
    ("zeo.sock", "zeo.sock"),
    ("tcp:host=127.0.0.1:port=8100", "tcp:host=127.0.0.1:port=8100"),
    ("unix:path=/tmp/zeo.sock", "unix:path=/tmp/zeo.sock"),
])
def test_server_address_forms(value, expected):
    assert zeotwist.config.server_address(value) == expected


# -- zeotwist.client / DB / connection ----------------------------------------------

def test_client_is_a_client_storage(server, closing):
    storage = closing(zeotwist.client(server.address, reactor=background_reactor(),
                                      wait_timeout=10))
    assert isinstance(storage, ClientStorage)
    assert storage.is_connected()


def test_db_passes_every_keyword_to_client_storage(server, closing):
    db = closing(zeotwist.DB(server.address, reactor=background_reactor(), wait_timeout=10,
                             cache_size=54321, name="kw"))
    assert db.storage.getName() == "kw"
    assert db.storage.client.cache.size_limit == 54321    # the client cache, as in ZEO
    assert commit_and_read_back(db, "db", "ok") == "ok"


def test_db_keywords_are_not_db_options(server):
    # As ZEO.DB: DB options are not accepted; ClientStorage refuses them.
    with pytest.raises(TypeError, match="pool_size"):
        zeotwist.DB(server.address, reactor=background_reactor(), pool_size=3)


def test_connection_close_closes_the_db(server):
    conn = zeotwist.connection(server.address, reactor=background_reactor(), wait_timeout=10)
    db = conn.db()
    storage = db.storage
    try:
        conn.root()["c"] = 1
        conn.transaction_manager.commit()
        assert storage.is_connected()
    finally:
        conn.close()
    assert "storage" not in vars(db)            # DB.close() ran (it drops its storage)
    assert not storage.is_connected()           # and closed the ClientStorage
