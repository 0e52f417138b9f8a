"""The server configuration file (``twistd zeotwist -C server.conf``) and
several named storages served by one process.

In-process tests build the ServerService from a configuration file (the
same Options/settings path twistd takes) and run it on the background
reactor, with blocking ClientStorages on that reactor; subprocess tests run
the real ``twistd -n zeotwist --config`` for the things only a process can
show: %import on its PYTHONPATH, and exiting when a storage cannot be opened.
"""
import os
import subprocess
import textwrap
import threading

import pytest
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.python import usage
from ZODB.Connection import TransactionMetaData
from ZODB.FileStorage import FileStorage
from ZODB.POSException import ReadOnlyError
from ZODB.tests.MinPO import MinPO
from ZODB.tests.StorageTestBase import zodb_pickle, zodb_unpickle
from ZODB.utils import z64

from zeotwist import ClientStorage
from zeotwist.client.protocol import ClientProtocol
from zeotwist.client.reactorthread import background_reactor, blocking_call
from zeotwist.errors import UnknownStorage
from zeotwist.server import config as server_config
from zeotwist.server.tap import (
    DEFAULT_LISTEN, FileStorageFile, Options, ServerService, StorageOpenError)
from zeotwist.testing import Recorder, RunningServer, start_twistd, twistd_command
from zeotwist.wire import commands as C

from procutil import REPO, child_env, raw_connect, wait_closed, wait_for

LOOPBACK = "tcp:0:interface=127.0.0.1"


def write_conf(path, text: str) -> str:
    path.write_text(textwrap.dedent(text))
    return str(path)


def two_storages_conf(tmp_path, extra_server="", extra_storages="") -> str:
    return write_conf(tmp_path / "server.conf", """\
        <zeotwist>
          listen %s
          %s
        </zeotwist>
        <filestorage a>
          path %s
        </filestorage>
        <filestorage b>
          path %s
        </filestorage>
        %s
        """ % (LOOPBACK, extra_server, tmp_path / "a.fs", tmp_path / "b.fs", extra_storages))


def parse(*argv) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def serve(service: ServerService) -> RunningServer:
    """Start ``service`` (built for the background reactor); wait until listening."""
    def start():
        service.startService()
        return service.listening
    addresses = blocking_call(service.reactor, start, timeout=30)
    return RunningServer(service, service.reactor, addresses)


@pytest.fixture
def running():
    """``running(service)`` serves it; every server is stopped at the end."""
    started = []

    def start(service):
        srv = serve(service)
        started.append(srv)
        return srv
    yield start
    for srv in started:
        srv.stop()


@pytest.fixture
def clients():
    """``clients(server, storage, **kw)``: blocking ClientStorages, closed at the end."""
    made = []

    def make(server, storage, **kw):
        kw.setdefault("wait_timeout", 10)
        kw.setdefault("timeout", 10)
        cs = ClientStorage(server.address, storage=storage, reactor=background_reactor(), **kw)
        made.append(cs)
        return cs
    yield make
    for cs in made:
        cs.close()


def from_config(path, *argv, **kw) -> ServerService:
    """What ``twistd zeotwist -C path *argv`` builds, on the background reactor."""
    options = parse("-C", path, *argv)
    return ServerService.from_storages(options.storages, reactor=background_reactor(),
                                       **options.settings, **kw)


def commit(cs, value, oid=None) -> tuple:
    """One transaction storing MinPO(value); returns (oid, tid)."""
    t = TransactionMetaData()
    oid = oid or cs.new_oid()
    cs.tpc_begin(t)
    cs.store(oid, z64, zodb_pickle(MinPO(value)), "", t)
    cs.tpc_vote(t)
    return oid, cs.tpc_finish(t)


def ping(cs) -> None:
    """A round trip: every invalidation pushed before it has arrived after it."""
    blocking_call(cs.client.reactor, cs.client.ping, timeout=10)


def record_events(cs) -> list:
    """The Invalidation events ``cs`` receives from now on."""
    seen = []
    blocking_call(cs.client.reactor, lambda: cs.client.events.subscribe(seen.append), timeout=10)
    return seen


def register(address, storage, read_only=False) -> dict:
    """Register on a fresh raw connection; the answer (or the error raised)."""
    reactor = background_reactor()
    host, port = address

    def go():
        d = connectProtocol(TCP4ClientEndpoint(reactor, host, port), ClientProtocol(Recorder()))

        def call(proto):
            d2 = proto.call(C.Register, protocol=C.PROTOCOL_VERSION, storage=storage,
                            read_only=read_only)
            return d2.addBoth(lambda r: (proto.transport.loseConnection(), r)[1])
        return d.addCallback(call)
    return blocking_call(reactor, go, timeout=10)


# -- two storages, one server ---------------------------------------------------------

def test_two_storages_are_isolated(tmp_path, running, clients):
    srv = running(from_config(two_storages_conf(tmp_path)))
    assert sorted(srv.service.servers) == ["a", "b"]
    a1, a2, b1 = clients(srv, "a"), clients(srv, "a"), clients(srv, "b")
    seen_a2, seen_b1 = record_events(a2), record_events(b1)
    b_before = b1.lastTransaction()

    oid_a, tid_a = commit(a1, "in a")
    ping(a2)
    ping(b1)
    assert [e.tid for e in seen_a2] == [tid_a]          # a's other client hears of it
    assert seen_b1 == []                                # b's client does not
    assert b1.lastTransaction() == b_before

    oid_b, tid_b = commit(b1, "in b")
    ping(a2)
    assert [e.tid for e in seen_a2] == [tid_a]          # nothing from b reaches a
    assert a2.lastTransaction() == tid_a
    # Each storage allocates oids and keeps records of its own.
    assert oid_a == oid_b
    assert zodb_unpickle(a2.load(oid_a)[0]).value == "in a"
    assert zodb_unpickle(b1.load(oid_b)[0]).value == "in b"
    servers = srv.service.servers
    assert servers["a"].stats["commits"] == 1 and servers["b"].stats["commits"] == 1
    assert servers["a"].last_tid == tid_a and servers["b"].last_tid == tid_b
    threads = {t.name for t in threading.enumerate()}
    assert {"zeotwist-storage-a", "zeotwist-storage-b"} <= threads


def test_each_storage_has_its_own_commit_lock(tmp_path, running, clients):
    srv = running(from_config(two_storages_conf(tmp_path)))
    servers = srv.service.servers
    reactor = srv.reactor
    a1, a2, b1 = clients(srv, "a"), clients(srv, "a"), clients(srv, "b")

    t = TransactionMetaData()
    oid = a1.new_oid()
    a1.tpc_begin(t)
    a1.store(oid, z64, zodb_pickle(MinPO(1)), "", t)
    a1.tpc_vote(t)                                      # a1 now holds a's commit lock
    assert blocking_call(reactor, lambda: servers["a"].lock.holder is not None)

    result = {}
    other = threading.Thread(target=lambda: result.update(tid=commit(a2, 2)[1]), daemon=True)
    other.start()
    # a2's vote queues behind a1 on a's lock ...
    wait_for(lambda: blocking_call(reactor, servers["a"].lock.waiting) == 1, 10,
             "a2 to queue for storage a's commit lock")
    # ... while a commit to b goes straight through.
    _, tid_b = commit(b1, 3)
    assert blocking_call(reactor, servers["b"].lock.waiting) == 0
    assert "tid" not in result
    tid_a1 = a1.tpc_finish(t)
    other.join(10)
    assert not other.is_alive()
    assert result["tid"] > tid_a1
    assert servers["b"].last_tid == tid_b


def test_unknown_storage_name_is_refused(tmp_path, running):
    srv = running(from_config(two_storages_conf(tmp_path)))
    assert register(srv.address, "a")["read_only"] is False
    with pytest.raises(UnknownStorage, match="'c'"):
        register(srv.address, "c")
    # Section names are lowercased by ZConfig, as in ZEO.
    with pytest.raises(UnknownStorage):
        register(srv.address, "A")


def test_storage_sections_keep_their_own_options(tmp_path, running):
    """A section's own keys (blob-dir, read-only) reach its storage only."""
    FileStorage(str(tmp_path / "old.fs")).close()
    conf = two_storages_conf(tmp_path, extra_storages="""
        <filestorage blobs>
          path %s
          blob-dir %s
        </filestorage>
        <filestorage old>
          path %s
          read-only on
        </filestorage>
        """ % (tmp_path / "blobs.fs", tmp_path / "blobs", tmp_path / "old.fs"))
    srv = running(from_config(conf))
    assert "IBlobStorage" in register(srv.address, "blobs")["interfaces"]
    assert "IBlobStorage" not in register(srv.address, "a")["interfaces"]
    with pytest.raises(ReadOnlyError):
        register(srv.address, "old")
    assert register(srv.address, "old", read_only=True)["read_only"] is True
    assert register(srv.address, "b")["read_only"] is False


def test_config_keys_reach_the_server(tmp_path, running):
    address_file = tmp_path / "addresses"
    conf = two_storages_conf(tmp_path, extra_server="""
          read-only on
          transaction-timeout 7.5
          handshake-timeout 0.3
          invalidation-queue-size 17
          max-transaction-size 3MB
          address-file %s
        """ % address_file)
    srv = running(from_config(conf))
    for name in ("a", "b"):
        server = srv.service.servers[name]
        assert server.read_only is True
        assert server.invalidations.size == 17
        assert server.max_transaction_bytes == 3 * 2**20
        assert server.lock._timeout == 7.5
    assert address_file.read_text().split() == srv.addresses
    with pytest.raises(ReadOnlyError):
        register(srv.address, "b")
    assert register(srv.address, "b", read_only=True)["read_only"] is True
    assert srv.service.factory.handshake_timeout == 0.3     # not the default 5 s
    sock = raw_connect(srv.address)                   # never registers
    try:
        wait_closed(sock, 30)                         # a hang guard
    finally:
        sock.close()


# -- command line and file together ---------------------------------------------------

def test_command_line_overrides_the_file(tmp_path):
    conf = two_storages_conf(tmp_path, extra_server="""
          transaction-timeout 7
          invalidation-queue-size 17
          address 127.0.0.1:8200
          address-file %s
        """ % (tmp_path / "from-file"))
    options = parse("-C", conf)
    s = options.settings
    assert s["listen"] == [LOOPBACK, "tcp:8200:interface=127.0.0.1"]
    assert (s["transaction_timeout"], s["invalidation_queue_size"]) == (7, 17)
    assert s["handshake_timeout"] == 5 and s["read_only"] is False   # built-in defaults
    assert s["address_file"] == str(tmp_path / "from-file")
    assert list(options.storages) == ["a", "b"]

    options = parse("--config", conf, "--transaction-timeout", "3", "-r",
                    "--listen", "unix:%s" % (tmp_path / "s.sock"),
                    "--max-transaction-size", "1MB", "--address-file", "cli")
    s = options.settings
    assert s["listen"] == ["unix:%s" % (tmp_path / "s.sock")]   # replaces the file's
    assert s["transaction_timeout"] == 3 and s["read_only"] is True
    assert s["max_transaction_bytes"] == 2**20 and s["address_file"] == "cli"
    assert s["invalidation_queue_size"] == 17                   # still the file's

    # -f adds a FileStorage, named by -s, to the file's storages.
    options = parse("-C", conf, "-f", str(tmp_path / "c.fs"), "-s", "c")
    assert list(options.storages) == ["a", "b", "c"]
    assert options.storages["c"].path == str(tmp_path / "c.fs")
    with pytest.raises(usage.UsageError, match="already has a storage named 'a'"):
        parse("-C", conf, "-f", str(tmp_path / "c.fs"), "-s", "a")
    with pytest.raises(usage.UsageError, match="-s/--storage names the -f storage"):
        parse("-C", conf, "-s", "x")
    options = parse("-C", conf, "-f", "c.fs", "-s", "c", "--blob-dir", "c.blobs")
    assert options.storages["c"].options["blob_dir"] == "c.blobs"
    with pytest.raises(usage.UsageError, match="--blob-dir is the -f storage's"):
        parse("-C", conf, "--blob-dir", "c.blobs")

    # Without -C: one FileStorage, data.fs unless -f, named "1" unless -s.
    options = parse()
    assert list(options.storages) == ["1"] and options.storages["1"].path == "data.fs"
    assert options["listen"] == [DEFAULT_LISTEN] == options.settings["listen"]
    options = parse("-f", "x.fs", "-s", "main", "-r")
    assert isinstance(options.storages["main"], FileStorageFile)
    assert options.storages["main"].read_only is True


@pytest.mark.parametrize("text, message", [
    ("<foostorage x>\n</foostorage>\n", "unknown type name: 'foostorage'"),
    ("<mappingstorage x>\n</mappingstorage>\n<mappingstorage x>\n</mappingstorage>\n",
     "section names must not be re-used"),
    ("<mappingstorage>\n</mappingstorage>\n<mappingstorage 1>\n</mappingstorage>\n",
     "two storages named '1'"),
    ("<zeotwist>\n  listen nosuchkind:1\n</zeotwist>\n<mappingstorage>\n</mappingstorage>\n",
     "cannot listen on 'nosuchkind:1'"),
    ("<zeotwist>\n  shoe-size 9\n</zeotwist>\n", "not a known key name"),
    ("%import no_such_package_here\n", "no_such_package_here"),
    ("<zeotwist>\n</zeotwist>\n", "no storages to serve"),
    ("<filestorage data>\n  path /nonexistent/dir/x.fs\n</filestorage>\n",
     "in <filestorage data>: The directory named as part of the path"),
])
def test_bad_configuration_files_are_usage_errors(tmp_path, text, message):
    conf = write_conf(tmp_path / "bad.conf", text)
    with pytest.raises(usage.UsageError, match="bad.conf") as info:
        parse("-C", conf)
    assert message in str(info.value)


def test_unnamed_storage_is_storage_1(tmp_path):
    conf = write_conf(tmp_path / "one.conf", "<mappingstorage>\n</mappingstorage>\n")
    assert list(server_config.read_config(conf).storages) == ["1"]
    with pytest.raises(server_config.ConfigError, match="at most one storage section"):
        server_config.read_config(write_conf(
            tmp_path / "two.conf", "<mappingstorage>\n</mappingstorage>\n" * 2))


def test_zeo_style_addresses():
    assert server_config.zeo_address("8100") == "tcp:8100"
    assert server_config.zeo_address("localhost:8100") == "tcp:8100:interface=localhost"
    assert server_config.zeo_address("[::1]:8100") == "tcp6:8100:interface=\\:\\:1"
    assert server_config.zeo_address("/var/run/zeo.sock") == "unix:/var/run/zeo.sock"


# -- storages that cannot be opened ---------------------------------------------------

def test_locked_storage_stops_the_server_and_closes_the_others(tmp_path):
    held = FileStorage(str(tmp_path / "b.fs"))          # holds b.fs's lock
    try:
        service = from_config(two_storages_conf(tmp_path))
        with pytest.raises(StorageOpenError) as info:
            blocking_call(service.reactor, service.startService, timeout=30)
    finally:
        held.close()
    err = str(info.value)
    assert "cannot open storage 'b'" in err and "LockError" in err, err
    assert info.value.storage_name == "b"
    assert service.servers == {} and not service.running
    # storage a was opened first and closed again: its lock is free
    FileStorage(str(tmp_path / "a.fs")).close()


def test_from_storages_serves_open_storages_and_factories(tmp_path, running, clients):
    from ZODB.MappingStorage import MappingStorage
    service = ServerService.from_storages(
        {"open": MappingStorage("already open"),
         "made": lambda: MappingStorage("from a factory"),
         "file": FileStorageFile(str(tmp_path / "f.fs"))},
        [LOOPBACK], reactor=background_reactor())
    srv = running(service)
    names = {n: clients(srv, n).client.server_name for n in ("open", "made", "file")}
    assert names == {"open": "already open", "made": "from a factory",
                     "file": str(tmp_path / "f.fs")}


# -- the real twistd ----------------------------------------------------------------

COMPONENT = """\
<component>
  <import package="ZODB"/>
  <sectiontype name="teststorage" datatype="zeotwist_teststorage.TestStorage"
               implements="ZODB.storage">
    <key name="label" required="yes"/>
  </sectiontype>
</component>
"""

TEST_STORAGE = """\
from ZODB.config import BaseConfig
from ZODB.MappingStorage import MappingStorage


class TestStorage(BaseConfig):
    def open(self):
        return MappingStorage("teststorage " + self.config.label)
"""


def test_twistd_serves_the_storages_of_a_config_file(tmp_path, clients):
    package = tmp_path / "lib" / "zeotwist_teststorage"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(TEST_STORAGE)
    (package / "component.xml").write_text(COMPONENT)
    conf = two_storages_conf(
        tmp_path, extra_server="address-file %s" % (tmp_path / "zeotwist.address"),
        extra_storages="""
        %import zeotwist_teststorage
        <teststorage third>
          label imported
        </teststorage>
        <mappingstorage memory>
        </mappingstorage>
        """)
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "lib"), env["PYTHONPATH"]])
    server = start_twistd(str(tmp_path / "a.fs"), directory=str(tmp_path), env=env,
                          server_command=["zeotwist", "--config", conf])
    try:
        a, b = clients(server, "a"), clients(server, "b")
        third, memory = clients(server, "third"), clients(server, "memory")
        assert third.client.server_name == "teststorage imported"
        assert memory.client.server_name == "Mapping Storage"
        seen_b = record_events(b)
        b_before = b.lastTransaction()
        _, tid_a = commit(a, "a")
        commit(third, "t")
        ping(b)
        assert seen_b == [] and b.lastTransaction() == b_before
        assert a.lastTransaction() == tid_a
        _, tid_b = commit(b, "b")
        assert b.lastTransaction() == tid_b
        with pytest.raises(UnknownStorage):
            register(server.address, "nope")
    finally:
        for cs in (a, b, third, memory):
            cs.close()
        status = server.stop()
        log = server.log()
    print("--- twistd log (exit status %s) ---\n%s" % (status, log))
    assert status == 0                  # a clean stop on SIGTERM (twistd would re-raise it)
    for name, what in [("a", str(tmp_path / "a.fs")), ("b", str(tmp_path / "b.fs")),
                       ("third", "teststorage imported"), ("memory", "Mapping Storage")]:
        assert "zeotwist serving %s as storage '%s' on" % (what, name) in log
    for name, fs in [("a", "a.fs"), ("b", "b.fs")]:      # each commit in its own file
        storage = FileStorage(str(tmp_path / fs), read_only=True)
        try:
            assert len(list(storage.iterator())) == 1
        finally:
            storage.close()


def run_twistd(tmp_path, *args) -> tuple:
    """``twistd -n zeotwist *args`` expected to exit by itself: (status, log text)."""
    log_file = tmp_path / "twistd.log"
    out = subprocess.run([*twistd_command(), "-n", "--pidfile=", "-l", str(log_file),
                          "zeotwist", *args], cwd=str(tmp_path), env=child_env(),
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    log = log_file.read_text() if log_file.exists() else ""
    return out.returncode, log + out.stdout + out.stderr


def test_twistd_exits_when_a_storage_cannot_be_opened(tmp_path):
    (tmp_path / "adir").mkdir()
    conf = two_storages_conf(
        tmp_path, extra_server="address-file %s" % (tmp_path / "zeotwist.address"),
        extra_storages="<filestorage broken>\n  path %s\n</filestorage>\n" % (tmp_path / "adir"))
    status, log = run_twistd(tmp_path, "-C", conf)
    assert status != 0, log
    assert "cannot open storage 'broken'" in log and "IsADirectoryError" in log, log
    assert "not starting" in log
    assert not (tmp_path / "zeotwist.address").exists()
    # Opened before the failure and closed again: a.fs can be opened now.
    FileStorage(str(tmp_path / "a.fs")).close()

    # Caught while reading the file: twistd's usage error, naming the storage section.
    conf = write_conf(tmp_path / "bad.conf",
                      "<filestorage gone>\n  path /nonexistent/dir/x.fs\n</filestorage>\n")
    status, log = run_twistd(tmp_path, "--config", conf)
    assert status != 0, log
    assert "cannot use configuration file %s: in <filestorage gone>" % conf in log, log


# -- packaging ------------------------------------------------------------------------

def test_schema_ships_with_the_package(tmp_path):
    """A plain build lays schema.xml beside tap.py (package data)."""
    import shutil
    import sys
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "tests", "docs",
        "*.fs*", "twistd.*"))
    if subprocess.run([sys.executable, "-c", "import setuptools"]).returncode != 0:
        pytest.skip("no setuptools in this environment to build with offline")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-c", "import setuptools; setuptools.setup()", "-q",
         "build_py", "--build-lib", str(out)],
        cwd=str(src), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (out / "zeotwist" / "server" / "schema.xml").is_file()
    assert (out / "zeotwist" / "server" / "tap.py").is_file()
    assert os.path.samefile(server_config.SCHEMA,
                            REPO / "zeotwist" / "server" / "schema.xml")
