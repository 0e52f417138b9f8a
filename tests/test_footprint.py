"""What a ``twistd zeotwist`` server loads: not pyOpenSSL without TLS
(zeotwist.server.footprint), not RelStorage without a RelStorage, not the
client package (docs/performance.md, "Memory"); and what a client leaves
out.  The TLS servers of tests/test_tls.py (``--listen-tls``, an ``ssl:``
string) are the other side; a client's TLS is in tests/test_lazytls.py."""
import ast
import subprocess
import sys
import sysconfig

import pytest
import transaction
from ZODB import DB

from zeotwist import ClientStorage
from zeotwist.client.reactorthread import background_reactor
from zeotwist.server.footprint import needs_tls, openssl_hidden
from zeotwist.server.settings import ServerSettings
from zeotwist.server.startup import plain_tcp
from zeotwist.testing import start_twistd

#: site-packages directories a server of a FileStorage without TLS does not map
NOT_LOADED = ("cryptography", "OpenSSL", "relstorage", "psycopg2")


def mapped_packages(pid: int) -> set:
    """The site-packages entries (packages, extension modules) ``pid`` maps."""
    with open("/proc/%d/maps" % pid) as f:
        return {line.split("site-packages/", 1)[1].split("/")[0]
                for line in f if "site-packages/" in line}


def imported_by(modules: str, prefixes: tuple) -> list:
    """The modules starting with ``prefixes`` that a fresh interpreter has
    once it imported ``modules`` (comma-separated)."""
    code = ("import sys, %s; print(sorted(m for m in sys.modules if m.startswith(%r)))"
            % (modules, prefixes))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=sysconfig.get_paths()["purelib"])
    assert done.returncode == 0, done.stderr
    return ast.literal_eval(done.stdout)


def commit_one(server) -> None:
    """A ZODB commit through ``server`` (a started server process)."""
    db = DB(ClientStorage(server.address, reactor=background_reactor(), wait_timeout=10))
    try:
        conn = db.open()
        conn.root()["x"] = 1
        transaction.commit()
        conn.close()
    finally:
        db.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/maps")
def test_a_plain_server_loads_neither_openssl_nor_relstorage(tmp_path):
    server = start_twistd(str(tmp_path / "data.fs"))
    try:
        commit_one(server)
        mapped = mapped_packages(server.process.pid)
        assert "BTrees" in mapped, mapped             # the check sees what is mapped
        assert not [m for m in mapped if m.startswith(NOT_LOADED)], mapped
    finally:
        server.stop()


def test_the_server_modules_do_not_import_the_client():
    assert imported_by("zeotwist.server.tap", ("zeotwist.client.",)) == []
    import zeotwist
    assert zeotwist.ClientStorage is ClientStorage       # imported when asked for
    assert callable(zeotwist.client)                      # the function, not the package


def test_the_server_modules_leave_out_what_a_plain_server_does_not_use():
    """pickletools (0.5 MB of opcode tables) comes with the first client
    pickle the server reads (a conflict to resolve), twisted.web with
    --metrics, Twisted's endpoints module with a listen string that is not
    plain tcp:, twisted.cred with --auth-file, ZODB's DemoStorage with one;
    a server that has none of them does not carry them."""
    assert imported_by("zeotwist.server.tap, zeotwist.server.service",
                       ("pickletools", "twisted.web", "twisted.internet.endpoints",
                        "twisted.cred", "zeotwist.server.portal", "ZODB.DemoStorage")) == []
    from zeotwist.server.unpickling import PickleRefused, check_opcodes, pickle_class_name
    check_opcodes(b"\x80\x03K\x01.")                   # still read when needed
    assert pickle_class_name(b"\x80\x03cfoo\nBar\nq\x00.") == ("foo", "Bar")
    with pytest.raises(PickleRefused):
        check_opcodes(b"\x80\x03\xff")


def test_the_bench_puts_nothing_of_zeotwists_client_into_a_zeo_client_process():
    """The bench's client processes import zeotwist.bench's modules, and ZEO's
    server imports zeotwist.bench.parallel when it resolves a conflict on its
    Counter: neither may pull in zeotwist's client, Twisted or pyOpenSSL (they
    did: ZEO's client read 59 MB instead of 31, its server 56 instead of 36)."""
    assert imported_by(
        "zeotwist.bench.workload, zeotwist.bench.parallel, zeotwist.bench.reads, "
        "zeotwist.bench.graph, zeotwist.bench.records, zeotwist.bench.writes, "
        "zeotwist.bench.pipelined, zeotwist.bench.packing",
        ("twisted", "OpenSSL", "cryptography", "zeotwist.client.")) == []


def test_the_client_keeps_its_connection_without_twisted_application():
    """zeotwist.client.reconnect, not Twisted's ClientService: no
    twisted.application, twisted.plugin (twisted.python.modules, zipfile)
    nor automat in a client (1.1 MB); the blob cache, blob transfers and the
    persistent cache file come with a blob_dir, a blob or a cache file."""
    assert imported_by("zeotwist.client.storage, zeotwist.client.interaction",
                       ("twisted.application", "twisted.plugin", "twisted.python.modules",
                        "zipfile", "automat", "zeotwist.client.blobcache",
                        "zeotwist.client.blobtransfer", "zeotwist.client.cachefile")) == []


def test_which_settings_need_tls():
    assert not needs_tls(ServerSettings(listen=["tcp:8100", "unix:/tmp/s"],
                                        metrics="tcp6:9102"))
    assert needs_tls(ServerSettings(listen=["tcp:0"], listen_tls=["tcp:8443"], tls_cert="c"))
    assert needs_tls(ServerSettings(listen=["ssl:8443:privateKey=k"]))
    assert needs_tls(ServerSettings(listen=["tcp:0"], metrics="ssl:9102:privateKey=k"))
    assert needs_tls(ServerSettings(listen=["systemd:domain=INET:index=0"]))


def test_openssl_is_hidden_only_within(monkeypatch):
    monkeypatch.delitem(sys.modules, "OpenSSL", raising=False)
    with openssl_hidden() as hidden:
        assert hidden
        with pytest.raises(ImportError):
            import OpenSSL  # noqa: F401
    assert "OpenSSL" not in sys.modules
    import OpenSSL  # noqa: F401,F811
    with openssl_hidden() as hidden:         # imported already: left as it is
        assert not hidden
        import OpenSSL  # noqa: F401,F811


def test_a_plain_server_process_gets_twisteds_tls_back_at_its_first_use():
    """The server's start imports Twisted's modules without pyOpenSSL
    (import_tap, settle); a storage or service of the same process that
    makes TLS connections of its own still can: Twisted's TLS comes back
    when it is first used (zeotwist.lazytls), as in a client's process."""
    program = """if True:
        import sys
        from zeotwist.server import footprint
        footprint.import_tap()                  # as the twistd plugin
        from zeotwist.server.settings import ServerSettings
        footprint.settle(ServerSettings(listen=["tcp:0"]))
        from twisted.internet import posixbase, tcp
        from twisted.protocols import amp
        assert "OpenSSL" not in sys.modules and posixbase.tls is None and amp.ssl is None
        from twisted.internet import ssl         # a TLS use of the process's own
        assert posixbase.tls is not None and amp.ssl is ssl
        assert tcp._TLSConnectionMixin.__module__ != "twisted.internet.tcp"
        print("ok")
        """
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr


@pytest.mark.parametrize("description", [
    "tcp:8100", "tcp:0:interface=127.0.0.1", "tcp:8100:backlog=7:interface=::1",
    "tcp:8100:backlog=7:interface=10.0.0.1",
    "tcp:port=8100", "tcp:8100:127.0.0.1", "tcp:x", "tcp:8100:interface=a\\:b", "tcp:8100:",
    "tcp:8100:interface=a:interface=b", "tcp: 8100", "tcp:8100:backlog=-1", "tcp:８１",
    "TCP:8100", "tcp6:8100", "unix:/tmp/s", "tcp:8100:other=1", "tcp:8100:interface=a=b"])
def test_a_plain_tcp_listen_string_is_read_as_twisted_reads_it(description):
    """listen_on reads plain tcp: strings itself (sparing twisted.internet.endpoints):
    what it reads is what Twisted's parser makes of the string; the rest it leaves to it."""
    from twisted.internet.endpoints import _parseServer
    got = plain_tcp(description)
    if got is not None:
        port, options = got
        assert _parseServer(description, None) == ("TCP", (port, None), options)


def test_a_plain_server_imports_twisteds_endpoints_only_for_other_strings():
    """A plain tcp: server does without twisted.internet.endpoints; a unix: one
    imports it as the plugin did, pyOpenSSL hidden, and Twisted's TLS still comes
    back at its first use (zeotwist.lazytls), for the endpoints module too."""
    program = """if True:
        import sys
        from zeotwist.server import footprint
        footprint.import_tap()                  # as the twistd plugin
        from zeotwist.server.settings import ServerSettings
        settings = ServerSettings(listen=["tcp:0", "unix:/tmp/s"])
        footprint.settle(settings)
        assert "twisted.internet.endpoints" not in sys.modules
        endpoints = footprint.endpoints()       # listen_on's, for the unix: string
        assert "OpenSSL" not in sys.modules and endpoints.TLSMemoryBIOFactory is None
        assert endpoints.wrapClientTLS.__wrapped__ is not None     # restores first
        from twisted.internet import ssl         # a TLS use of the process's own
        assert endpoints.TLSMemoryBIOFactory is not None and endpoints.SSLError is not None
        assert not hasattr(endpoints.wrapClientTLS, "__wrapped__")
        print("ok")
        """
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr
