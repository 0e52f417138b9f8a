"""A client without TLS does not load pyOpenSSL even where it is installed,
and Twisted's TLS works in its process all the same once something uses it
(zeotwist.lazytls; docs/performance.md "Memory").  Each case runs in a fresh
interpreter, against servers of this process on 127.0.0.1 (plain and TLS)."""
import subprocess
import sys
import textwrap

import pytest

from zeotwist.testing import start_server

from certs import make_pki
from procutil import wait_for

LOOPBACK = "tcp:0:interface=127.0.0.1"
#: run first in each child: what the server address arguments are
PRELUDE = """
import sys
import zeotwist
plain_host, plain_port, tls_port, ca, ca_dir = sys.argv[1:6]
TLS_MODULES = ("OpenSSL", "cryptography", "service_identity", "twisted.internet.ssl",
               "twisted.protocols.tls", "twisted.web")
def loaded():
    return sorted(m for m, module in sys.modules.items()
                  if module is not None and m.startswith(TLS_MODULES))
def plain_client():
    storage = zeotwist.ClientStorage((plain_host, int(plain_port)), wait_timeout=10)
    storage.new_oid()                   # a round trip
    return storage
"""
#: after a plain client: Twisted's TLS support is whole again
WHOLE = """
from twisted.internet import endpoints, posixbase, tcp
from twisted.internet.interfaces import IReactorSSL, ITLSTransport
from twisted.protocols import amp
from zeotwist.lazytls import lacking
assert not lacking(), lacking()
assert hasattr(tcp.Client, "startTLS") and hasattr(tcp.Server, "startTLS")
assert ITLSTransport.implementedBy(tcp.Client) and ITLSTransport.implementedBy(tcp.Server)
assert IReactorSSL.implementedBy(posixbase.PosixReactorBase)
assert posixbase.tls is not None and amp.ssl is not None
assert endpoints.TLSMemoryBIOFactory is not None
print("whole")
"""


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lazytls")
    pki = make_pki(tmp)
    server = start_server(str(tmp / "data.fs"), listen=LOOPBACK, listen_tls=[LOOPBACK],
                          tls_cert=str(pki.server_cert), tls_key=str(pki.server_key))
    try:
        host, plain_port = server.addresses[0].rsplit(":", 1)
        tls_port = server.addresses[1].rsplit(":", 1)[1]
        yield [host, plain_port, tls_port, str(pki.ca), str(pki.ca_dir)]
    finally:
        server.stop()


def run(servers, *code: str) -> str:
    program = PRELUDE + "".join(textwrap.dedent(c) for c in code)
    done = subprocess.run([sys.executable, "-c", program, *servers],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_plain_client_loads_no_tls_where_pyopenssl_is_installed(servers):
    """Nor http.cookiejar (urllib.request, http.client, email), which
    Twisted imports and does not use: it loads when first used; nor hashlib
    (OpenSSL's digests), which only a persistent cache file needs."""
    out = run(servers, """
        storage = plain_client()
        print(loaded())
        print(sorted(m for m in ("urllib.request", "http.client", "email", "hashlib")
                     if m in sys.modules))
        storage.close()
        import http.cookiejar
        print(http.cookiejar.CookieJar().__class__.__name__)
        """)
    assert out.split("\n")[:3] == ["[]", "[]", "CookieJar"]


def test_a_plain_client_loads_twisteds_process_support_at_its_first_use(servers):
    """twisted.internet.process (pty, tty, termios) waits for its first use
    (lazymodules.LAZY_MODULES), which finds it whole."""
    out = run(servers, """
        storage = plain_client()
        print(sorted(m for m in ("pty", "tty", "termios", "twisted.internet._baseprocess")
                     if m in sys.modules))
        from twisted.internet import process
        print(type(process).__name__)
        from twisted.internet.process import Process        # its first use
        print(Process.__module__, "pty" in sys.modules)
        storage.close()
        """)
    assert out.split("\n")[:3] == ["[]", "_LazyModule", "twisted.internet.process True"]


def test_a_plain_client_leaves_twisteds_unused_modules_to_their_first_use(servers):
    """decimal (AMP's Decimal argument), html.entities (html, for Twisted's
    escape), the Unix and UDP transports, twisted.python.filepath, Twisted's
    JSON log files with uuid, urllib.parse and ipaddress
    (lazymodules.LAZY_MODULES) have not run in a connected client; used
    afterwards, they work."""
    out = run(servers, """
        from zeotwist.lazymodules import loaded
        storage = plain_client()
        print([m for m in ("decimal", "_decimal", "html.entities", "twisted.internet.unix",
                           "twisted.internet.udp", "twisted.python.filepath", "pathlib",
                           "twisted.logger._json", "uuid", "urllib.parse", "ipaddress")
               if loaded(m) is not None])
        import decimal, html, io, warnings
        from twisted.logger import eventsFromJSONLogFile, jsonFileLogObserver
        from twisted.protocols import amp
        print(amp.Decimal().fromString(b"1.25") + 1, html.unescape("&notin;") == "\\u2209")
        f = io.StringIO()
        jsonFileLogObserver(f)({"log_format": "x{n}", "n": 1, "log_time": 0.0})
        f.seek(0)
        print([e["n"] for e in eventsFromJSONLogFile(f)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from twisted.python.compat import urlquote, urlunquote
            print(urlquote("a b"), urlunquote("a%2Fb"))
        from urllib.parse import urlsplit
        print(urlsplit("zeo://[::1]:8100/x").hostname, type(sys.modules["ipaddress"]).__name__)
        storage.close()
        """)
    assert out.split("\n")[:5] == ["[]", "2.25 True", "[1]", "a%20b a/b", "::1 module"]


def test_a_plain_client_connects_to_a_unix_socket_with_the_transport_loaded_then(tmp_path):
    path = str(tmp_path / "zeo.sock")
    server = start_server(str(tmp_path / "data.fs"), listen="unix:" + path)
    try:
        done = subprocess.run([sys.executable, "-c", textwrap.dedent("""
            import sys
            import zeotwist
            from zeotwist.lazymodules import loaded
            assert loaded("twisted.internet.unix") is None
            storage = zeotwist.ClientStorage(sys.argv[1], wait_timeout=10)
            print(storage.new_oid() is not None, loaded("twisted.internet.unix") is not None)
            storage.close()
            """), path], capture_output=True, text=True, timeout=120)
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True"]


def test_a_plain_client_imports_no_endpoints_and_a_later_import_loads_no_tls(servers):
    """A plain address needs no twisted.internet.endpoints (nor its stdio
    and systemd modules); imported afterwards by the program, it comes
    without pyOpenSSL as the client's Twisted modules did, and gets its TLS
    names at the first TLS use."""
    out = run(servers, """
        storage = plain_client()
        print(sorted(m for m in ("twisted.internet.endpoints", "twisted.internet.stdio",
                                 "twisted.python.systemd") if m in sys.modules))
        from twisted.internet import endpoints
        print(loaded(), endpoints.TLSMemoryBIOFactory)
        storage.close()
        from twisted.internet import ssl
        """, WHOLE)
    assert out.split("\n")[:3] == ["[]", "[] None", "whole"]


def test_a_client_opened_from_configuration_loads_no_tls_nor_endpoints(servers):
    """``<zeotwistclient>`` with a plain address: zeotwist.config imports the
    endpoints (which, imported first, would load pyOpenSSL) only to check
    an endpoint string."""
    out = run(servers, """
        import ZODB.config
        storage = ZODB.config.storageFromString(
            "%%import zeotwist\\n<zeotwistclient>\\nserver %s:%s\\nwait-timeout 10\\n"
            "</zeotwistclient>\\n" % (plain_host, plain_port))
        storage.new_oid()
        print(loaded(), "twisted.internet.endpoints" in sys.modules)
        storage.close()
        """)
    assert out.split("\n")[:1] == ["[] False"]


def test_a_tls_client_after_a_plain_one_in_the_same_process(servers):
    out = run(servers, """
        import ZODB
        plain = plain_client()
        assert loaded() == [], loaded()
        db = ZODB.DB(zeotwist.ClientStorage(("127.0.0.1", int(tls_port)), wait_timeout=10,
                                            tls=dict(ca=ca)))
        with db.transaction() as conn:
            conn.root()["x"] = "over TLS"
        db.close()
        plain.close()
        """, WHOLE)
    assert out.split() == ["whole"]


def test_twisted_tls_of_the_program_s_own_after_a_plain_client(servers):
    """The program's own Twisted TLS: importing twisted.internet.ssl makes
    Twisted whole, and wrapClientTLS works."""
    out = run(servers, """
        from twisted.internet import ssl
        """, WHOLE)
    assert out.split() == ["whole"]
    out = run(servers, """
        storage = plain_client()
        from twisted.internet import ssl
        """, WHOLE)
    assert out.split() == ["whole"]


def test_tls_endpoint_strings_after_a_plain_client(servers):
    """A tls: string is parsed (its TLS names restored) without anything
    having imported twisted.internet.ssl first."""
    out = run(servers, """
        storage = plain_client()
        from twisted.internet import reactor
        from twisted.internet.endpoints import clientFromString
        endpoint = clientFromString(reactor, "tls:127.0.0.1:%s:trustRoots=%s"
                                    % (tls_port, ca_dir.replace(":", "\\\\:")))
        print(type(endpoint).__name__)
        """, WHOLE)
    assert out.split() == ["_WrapperEndpoint", "whole"]


#: a TLS handshake with the test's TLS server over Twisted, with a context of
#: pyOpenSSL's own (nothing imports twisted.internet.ssl): ``connect(factory)``
HANDSHAKE = """
from zope.interface import implementer
from twisted.internet import protocol, reactor
from twisted.internet.interfaces import IHandshakeListener
from OpenSSL import SSL

class Context:
    def getContext(self):
        return SSL.Context(SSL.TLS_METHOD)

@implementer(IHandshakeListener)
class Handshake(protocol.Protocol):
    def connectionMade(self):
        if STARTTLS:
            self.transport.startTLS(Context())
    def handshakeCompleted(self):
        print("handshake")
        self.transport.abortConnection()

class Factory(protocol.ClientFactory):
    protocol = Handshake
    def clientConnectionLost(self, connector, reason):
        reactor.stop()
    clientConnectionFailed = clientConnectionLost

def start():
    try:
        connect(Factory())
    except Exception as e:
        print(type(e).__name__, e)
        reactor.stop()

reactor.callWhenRunning(start)
reactor.run()
"""


@pytest.mark.parametrize("first", ["", "import service_identity"])
@pytest.mark.parametrize("how", ["connectSSL", "startTLS"])
def test_twisted_tls_with_a_pyopenssl_context_after_a_plain_client(servers, how, first):
    """A program that builds its context with pyOpenSSL alone (never
    importing twisted.internet.ssl) and connects with the reactor's
    connectSSL, or starts TLS on a TCP connection: importing OpenSSL gives
    Twisted its TLS back, or else (pyOpenSSL imported by service_identity,
    which Twisted's TLS modules import: they cannot be whole then) its
    first use does."""
    out = run(servers, """
        storage = plain_client()
        %s
        STARTTLS = %r
        def connect(factory):
            from twisted.internet import reactor
            if STARTTLS:
                reactor.connectTCP("127.0.0.1", int(tls_port), factory)
            else:
                reactor.connectSSL("127.0.0.1", int(tls_port), factory, Context())
        """ % (first, how == "startTLS"), HANDSHAKE, WHOLE)
    assert out.split() == ["handshake", "whole"]


def test_ssl_client_endpoint_strings_after_a_plain_client(servers):
    """An ssl: client string (endpoints' own parser table) after a plain
    client, nothing having imported twisted.internet.ssl or OpenSSL."""
    out = run(servers, """
        storage = plain_client()
        from twisted.internet import reactor
        from twisted.internet.endpoints import clientFromString
        endpoint = clientFromString(reactor, "ssl:127.0.0.1:%s" % tls_port)
        print(type(endpoint).__name__)
        """, WHOLE)
    assert out.split() == ["SSL4ClientEndpoint", "whole"]


def test_a_thread_importing_twisted_tls_while_another_restores_does_not_deadlock(servers):
    """Thread A restores (a first use: its wrapClientTLS, connectSSL...)
    while thread B imports twisted.internet.ssl, which runs the import
    hook while B holds that import's lock: B must not wait for A's
    restore, which waits for B's import.  (30 s: a hang guard.)"""
    out = run(servers, """
        import os, threading
        from zeotwist import lazytls
        storage = plain_client()
        a_restores, b_imports = threading.Event(), threading.Event()
        real = lazytls._restore

        def restore_once_b_imports(imported):
            a_restores.set()
            b_imports.wait(30)
            real(imported)

        class Watch:        # B holds twisted.internet.ssl's import lock when it looks for these
            def find_spec(self, name, path, target=None):
                if name in ("OpenSSL", "twisted.internet._sslverify") \\
                        and threading.current_thread().name == "B":
                    b_imports.set()
                return None

        def b():
            a_restores.wait(30)
            import twisted.internet.ssl

        lazytls._restore = restore_once_b_imports
        sys.meta_path.insert(0, Watch())
        threads = [threading.Thread(target=lazytls.restore, name="A"),
                   threading.Thread(target=b, name="B")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        if any(t.is_alive() for t in threads):
            print("deadlock", flush=True)
            os._exit(0)
        """, WHOLE)
    assert out.split() == ["whole"]


def test_a_lazy_module_loads_once_for_threads_that_meet_at_its_first_use(tmp_path, monkeypatch):
    """lazy_import's stand-in: the first thread imports the module while
    the others wait for it (Python 3.11's LazyLoader would give them a
    half-run module: AttributeError), then the real module takes its place
    in sys.modules and on the package."""
    import threading
    from zeotwist import lazymodules
    package = tmp_path / "zt_lazy_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "slow.py").write_text(
        "import builtins\nsync = builtins.zt_lazy_sync\nsync['started'].set()\n"
        "assert sync['go'].wait(60)\nsync['runs'].append(1)\nVALUE = 42\n")

    class CountingLock:
        def __init__(self):
            self.lock, self.asked = threading.RLock(), []

        def __enter__(self):
            self.asked.append(1)
            self.lock.acquire()

        def __exit__(self, *exc):
            self.lock.release()

    lock = CountingLock()
    sync = dict(started=threading.Event(), go=threading.Event(), runs=[])
    monkeypatch.setattr(lazymodules, "_lazy_lock", lock)
    monkeypatch.setattr("builtins.zt_lazy_sync", sync, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        import zt_lazy_pkg
        lazymodules.lazy_import("zt_lazy_pkg.slow")
        stand_in = sys.modules["zt_lazy_pkg.slow"]
        assert zt_lazy_pkg.slow is stand_in and sync["runs"] == []   # not run yet
        seen = []

        def use():
            try:
                seen.append(stand_in.VALUE)
            except Exception as e:          # noqa: BLE001 (what the test is about)
                seen.append(e)
        first = threading.Thread(target=use)
        first.start()
        assert sync["started"].wait(60)     # the first use runs the module's code
        others = [threading.Thread(target=use) for _ in range(4)]
        for t in others:
            t.start()
        wait_for(lambda: len(lock.asked) >= 5, 60, "the other threads' first use")
        sync["go"].set()
        for t in [first] + others:
            t.join(60)
        assert seen == [42] * 5 and sync["runs"] == [1]
        assert sys.modules["zt_lazy_pkg.slow"] is zt_lazy_pkg.slow is not stand_in
        assert stand_in.VALUE == 42         # the stand-in still answers for it
    finally:
        sync["go"].set()
        for name in ("zt_lazy_pkg.slow", "zt_lazy_pkg"):
            sys.modules.pop(name, None)


def test_another_thread_imports_openssl_while_endpoints_is_first_imported():
    """Twisted's endpoints, first imported after a plain client (by the
    client for an endpoint string, or by the program), runs with pyOpenSSL
    hidden; another thread that imports pyOpenSSL meanwhile (its first TLS
    use) must get it, not ModuleNotFoundError: the hiding is the importing
    thread's alone.  Thread A is held inside endpoints' import (at its
    import of twisted.internet.stdio) while thread B imports OpenSSL.SSL."""
    program = textwrap.dedent("""
        import sys, threading
        import zeotwist.client.storage      # a plain client's imports
        assert "OpenSSL" not in sys.modules and "twisted.internet.endpoints" not in sys.modules
        inside, imported = threading.Event(), threading.Event()

        class Hold:         # A, running stdio within endpoints' import: wait there for B
            def find_spec(self, name, path, target=None):
                if name != "twisted.internet.stdio" or threading.current_thread().name != "A":
                    return None
                for finder in sys.meta_path:
                    spec = finder is not self and finder.find_spec(name, path, target)
                    if spec:
                        break
                run = spec.loader.exec_module

                def exec_module(module):    # (not under the global import lock, as finders are)
                    inside.set()
                    imported.wait(30)
                    run(module)
                spec.loader.exec_module = exec_module
                return spec

        def a():
            import twisted.internet.endpoints

        def b():
            inside.wait(30)
            try:
                import OpenSSL.SSL
                print("imported")
            except ImportError as e:
                print("refused", e)
            imported.set()

        sys.meta_path.insert(0, Hold())
        threads = [threading.Thread(target=a, name="A"), threading.Thread(target=b, name="B")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        from twisted.internet import endpoints
        print("endpoints", endpoints.TLSMemoryBIOFactory is not None or "lacking")
        """)
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == "imported", done.stdout
