"""TLS is the ``[tls]`` extra: without pyOpenSSL a client and a server work
in plain text and load none of it, and whatever asks for TLS stops with a
TLSConfigError that says what to install (docs/tls-auth.md,
docs/performance.md "Memory").  "Without pyOpenSSL" is a fresh interpreter in
which ``import OpenSSL`` fails, as where it is not installed."""
import subprocess
import sys
import sysconfig
import textwrap
from importlib.metadata import requires

from zeotwist.testing import start_server

#: run first in each child: pyOpenSSL cannot be imported there
NO_OPENSSL = "import sys; sys.modules['OpenSSL'] = None\n"
HINT = "pip install 'zeotwist[tls]'"


def run_without_openssl(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_OPENSSL + textwrap.dedent(code), *args],
                          capture_output=True, text=True, timeout=120,
                          cwd=sysconfig.get_paths()["purelib"])


def test_the_tls_extra_carries_pyopenssl_and_the_plain_install_does_not():
    plain = [r for r in requires("zeotwist") if "extra ==" not in r]
    assert any(r.startswith("twisted") for r in plain), plain
    assert not [r for r in plain if "[tls]" in r or "pyopenssl" in r.lower()], plain
    assert [r for r in requires("zeotwist") if "[tls]" in r and 'extra == "tls"' in r]
    assert [r for r in requires("zeotwist") if r.startswith("zeotwist[tls]")
            and 'extra == "test"' in r]


def test_a_client_without_pyopenssl_works_in_plain_text(tmp_path):
    server = start_server(str(tmp_path / "data.fs"), listen="tcp:0:interface=127.0.0.1")
    try:
        done = run_without_openssl("""
            import transaction, ZODB
            import zeotwist
            host, port = sys.argv[1].rsplit(":", 1)
            db = ZODB.DB(zeotwist.ClientStorage((host, int(port)), wait_timeout=10))
            conn = db.open()
            conn.root()["x"] = 42
            transaction.commit()
            conn.close()
            db.close()
            print(sorted(m for m, module in sys.modules.items() if module is not None
                         and m.split(".")[0] in ("OpenSSL", "cryptography", "service_identity")))
            """, server.addresses[0])
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "[]"
        db = ZODB_DB(server)
        assert db.open().root()["x"] == 42
        db.close()
    finally:
        server.stop()


def ZODB_DB(server):
    import ZODB
    from zeotwist import ClientStorage
    from zeotwist.client.reactorthread import background_reactor
    host, port = server.addresses[0].rsplit(":", 1)
    return ZODB.DB(ClientStorage((host, int(port)), reactor=background_reactor(),
                                 wait_timeout=10))


def test_asking_for_tls_without_pyopenssl_says_what_to_install():
    done = run_without_openssl("""
        from zeotwist import ClientStorage
        from zeotwist.config import server_address
        from zeotwist.errors import TLSConfigError
        from zeotwist.server.settings import listen_endpoint
        from zeotwist.tls import describe_error
        for call in (lambda: ClientStorage(("127.0.0.1", 1), tls=True, wait=False),
                     lambda: ClientStorage("tls:host=127.0.0.1:port=1", wait=False),
                     lambda: server_address("ssl:host=127.0.0.1:port=1"),
                     lambda: listen_endpoint("ssl:8443:privateKey=key.pem")):
            try:
                call()
            except TLSConfigError as e:
                print("TLSConfigError:", e)
            else:
                print("no error")
        print(describe_error(ValueError("no TLS here")))
        """)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 5, done.stdout
    assert all(line.startswith("TLSConfigError:") and line.endswith(HINT)
               for line in lines[:4]), lines
    assert lines[4] == "ValueError: no TLS here"


def test_a_server_asked_for_tls_without_pyopenssl_does_not_start(tmp_path):
    done = run_without_openssl("""
        from twisted.scripts.twistd import run
        sys.argv = ["twistd", "-n", "--pidfile=", "zeotwist", "-f", sys.argv[1],
                    "--listen-tls", "tcp:0:interface=127.0.0.1", "--tls-cert", "cert.pem"]
        run()
        """, str(tmp_path / "data.fs"))
    assert done.returncode != 0
    assert "--listen-tls needs TLS support" in done.stdout + done.stderr, done
    assert HINT in done.stdout + done.stderr
