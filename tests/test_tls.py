"""TLS (issue 6, item 6): --listen-tls with an optional client-certificate CA,
ClientStorage(tls=...), tls:/ssl: endpoint strings on zeotwist's private
reactor, and handshake failures that name their cause instead of timing out.

Certificates are made per module in tmp_path (tests/certs.py); the servers
and blocking clients run on the background reactor, on 127.0.0.1.
"""
import time

import pytest
import ZODB
from twisted.internet.interfaces import ISSLTransport

from zeotwist import ClientStorage
from zeotwist.client.reactorthread import background_reactor
from zeotwist.errors import ClientDisconnected, NotLoggedIn, Unauthorized
from zeotwist.server.auth import peer_common_name
from zeotwist.server.userfile import set_user
from zeotwist.testing import start_server
from zeotwist.tls import TLSConfigError, load_identity, server_options

from certs import make_pki
from procutil import refused_at_once

LOOPBACK = "tcp:0:interface=127.0.0.1"
WAIT = 2.0          # wait_timeout of the clients that must fail
HANG = 30.0         # what would be a hang past WAIT, even on a loaded machine


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_server(tmp_path, pki, ca=False, **kw):
    return start_server(str(tmp_path / "data.fs"), listen=LOOPBACK, listen_tls=[LOOPBACK],
                        tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
                        tls_ca=str(pki.ca) if ca else None, **kw)


def tls_address(server):
    host, port = server.addresses[-1].rsplit(":", 1)     # plain first, then TLS
    return host, int(port)


def alice(pki, **extra):
    return dict(ca=str(pki.ca), cert=str(pki.client_cert), key=str(pki.client_key), **extra)


def open_storage(address, **kw):
    kw.setdefault("reactor", background_reactor())
    kw.setdefault("wait_timeout", 10)
    return ClientStorage(address, **kw)


def refused(address, **kw) -> str:
    """Connect, expecting ClientDisconnected once WAIT is over (not a hang); its text."""
    start = time.monotonic()
    with pytest.raises(ClientDisconnected) as info:
        open_storage(address, wait_timeout=WAIT, **kw)
    assert time.monotonic() - start < WAIT + HANG
    return str(info.value)


def login_refused(address, **kw) -> str:
    """Connect, expecting a login refusal at once (not after wait_timeout): "Type: text"."""
    err = refused_at_once(Unauthorized, lambda wait: open_storage(address, wait_timeout=wait, **kw))
    return "%s: %s" % (type(err).__name__, err)


def commit_and_load(address, **kw):
    db = ZODB.DB(open_storage(address, **kw))
    try:
        with db.transaction() as conn:
            conn.root()["greeting"] = "hello over TLS"
    finally:
        db.close()
    db = ZODB.DB(open_storage(address, **kw))
    try:
        with db.transaction() as conn:
            return conn.root()["greeting"]
    finally:
        db.close()


def sessions(server):
    return list(server.server.sessions)


# -- round trip ---------------------------------------------------------------------

def test_round_trip_verifies_the_server_certificate(tmp_path, pki):
    server = tls_server(tmp_path, pki)
    try:
        assert commit_and_load(tls_address(server), tls=dict(ca=str(pki.ca))) == "hello over TLS"
        cs = open_storage(tls_address(server), tls=dict(ca=str(pki.ca)))
        try:
            (session,) = sessions(server)
            assert ISSLTransport.providedBy(session.transport)     # encrypted, not plain
            assert peer_common_name(session.transport) is None     # no client cert asked for
        finally:
            cs.close()
    finally:
        server.stop()


def test_hostname_from_a_host_port_string_and_a_ca_directory(tmp_path, pki):
    server = tls_server(tmp_path, pki)
    try:
        host, port = tls_address(server)
        cs = open_storage("localhost:%d" % port, tls=dict(ca=str(pki.ca_dir)))
        try:
            assert cs.lastTransaction() is not None
            assert cs.is_connected()
        finally:
            cs.close()
    finally:
        server.stop()


def test_untrusted_server_certificate_is_named(tmp_path, pki):
    server = tls_server(tmp_path, pki)
    try:
        text = refused(tls_address(server), tls=True)          # the system's CAs only
        assert "certificate verify failed" in text
    finally:
        server.stop()


def test_wrong_hostname_is_named(tmp_path, pki):
    server = tls_server(tmp_path, pki)
    try:
        text = refused(tls_address(server), tls=dict(ca=str(pki.ca), hostname="wrong.example"))
        assert "not valid for wrong.example" in text
    finally:
        server.stop()


def test_plain_client_on_a_tls_port_fails_within_wait_timeout(tmp_path, pki):
    server = tls_server(tmp_path, pki)
    try:
        refused(tls_address(server))
    finally:
        server.stop()


# -- client certificates ------------------------------------------------------------

def test_missing_client_certificate_is_named(tmp_path, pki):
    server = tls_server(tmp_path, pki, ca=True)
    try:
        text = refused(tls_address(server), tls=dict(ca=str(pki.ca)))
        assert "certificate required" in text
    finally:
        server.stop()


def test_untrusted_client_certificate_is_named(tmp_path, pki):
    server = tls_server(tmp_path, pki, ca=True)
    try:
        text = refused(tls_address(server), tls=dict(ca=str(pki.ca), cert=str(pki.rogue_cert),
                                                     key=str(pki.rogue_key)))
        assert "unknown ca" in text
    finally:
        server.stop()


def test_good_client_certificate_works(tmp_path, pki):
    server = tls_server(tmp_path, pki, ca=True)
    try:
        assert commit_and_load(tls_address(server), tls=alice(pki)) == "hello over TLS"
        # the key inside the certificate file works too
        cs = open_storage(tls_address(server), tls=dict(ca=str(pki.ca), cert=str(pki.client_pem)))
        try:
            (session,) = sessions(server)
            assert peer_common_name(session.transport) == "alice"
            assert session.user is None          # no --auth-file: nobody logs in
        finally:
            cs.close()
    finally:
        server.stop()


def test_certificate_common_name_is_the_identity_with_auth(tmp_path, pki):
    users = str(tmp_path / "users")
    set_user(users, "alice", None, "rw=1")               # certificate only
    server = tls_server(tmp_path, pki, ca=True, auth_file=users)
    try:
        cs = open_storage(tls_address(server), tls=alice(pki))
        try:
            (session,) = sessions(server)
            assert (session.user.name, session.user.how, session.access) == \
                ("alice", "certificate", "rw")
            assert not cs.isReadOnly()
        finally:
            cs.close()
        # bob's certificate is valid, but bob is no user of the file
        text = login_refused(tls_address(server), tls=dict(
            ca=str(pki.ca), cert=str(pki.bob_cert), key=str(pki.bob_key)))
        assert "NotLoggedIn" in text and "'bob' is not a user" in text
        # naming the certificate's user explicitly (Login without a password)
        cs = open_storage(tls_address(server), tls=alice(pki), username="alice")
        cs.close()
        text = login_refused(tls_address(server), tls=alice(pki), username="mallory")
        assert "Unauthorized" in text and "'alice'" in text
    finally:
        server.stop()


def test_certificate_user_cannot_log_in_with_a_password(tmp_path, pki):
    users = str(tmp_path / "users")
    set_user(users, "alice", None, "rw=1")
    server = tls_server(tmp_path, pki, ca=True, auth_file=users)
    try:
        text = login_refused(tls_address(server), tls=alice(pki), username="alice",
                               password="!")
        assert "wrong password" in text
    finally:
        server.stop()


def test_plain_listener_without_certificate_must_log_in(tmp_path, pki):
    users = str(tmp_path / "users")
    set_user(users, "alice", None, "rw=1")
    server = tls_server(tmp_path, pki, ca=True, auth_file=users)
    try:
        with pytest.raises(NotLoggedIn):
            open_storage(server.address, wait_timeout=WAIT)
    finally:
        server.stop()


# -- endpoint strings on the private reactor -------------------------------------------

def test_tls_endpoint_string_on_the_private_reactor(tmp_path, pki):
    """Twisted's tls: client string flushes TLS writes on the *global*
    reactor; zeotwist moves them to the connection's own (zeotwist.tls.use_clock)."""
    server = tls_server(tmp_path, pki, ca=True)
    try:
        host, port = tls_address(server)
        address = "tls:localhost:%d:trustRoots=%s:certificate=%s" % (
            port, pki.ca_dir, pki.client_pem)
        assert commit_and_load(address) == "hello over TLS"
    finally:
        server.stop()


def test_ssl_listen_string_on_the_private_reactor(tmp_path, pki):
    listen = "ssl:0:interface=127.0.0.1:privateKey=%s:certKey=%s" % (
        pki.server_key, pki.server_cert)
    server = start_server(str(tmp_path / "data.fs"), listen=listen)
    try:
        assert commit_and_load(server.address, tls=dict(ca=str(pki.ca))) == "hello over TLS"
    finally:
        server.stop()


def test_tls_twice_is_refused(pki):
    with pytest.raises(ValueError, match="TLS endpoint already"):
        open_storage("tls:localhost:1:trustRoots=%s" % pki.ca_dir, tls=True, wait=False)


def test_several_servers_each_get_tls(tmp_path, pki):
    server = tls_server(tmp_path, pki)
    try:
        host, port = tls_address(server)
        cs = open_storage([("127.0.0.1", 1), (host, port)], tls=dict(ca=str(pki.ca)))
        try:
            assert cs.is_connected()
            assert ISSLTransport.providedBy(sessions(server)[0].transport)
        finally:
            cs.close()
    finally:
        server.stop()


# -- files and settings ----------------------------------------------------------------

def test_unusable_files_are_named(tmp_path, pki):
    with pytest.raises(TLSConfigError, match="missing.pem"):
        server_options(str(tmp_path / "missing.pem"))
    with pytest.raises(TLSConfigError, match="does not belong"):
        load_identity(str(pki.server_cert), str(pki.client_key))
    with pytest.raises(TLSConfigError, match="no usable PEM private key"):
        load_identity(str(pki.server_cert))                  # no key in that file
    with pytest.raises(TLSConfigError, match="no PEM certificate"):
        server_options(str(pki.server_cert), str(pki.server_key), ca=str(pki.server_key))
    with pytest.raises(TLSConfigError, match="cannot read"):
        start_server(str(tmp_path / "data.fs"), listen_tls=[LOOPBACK],
                     tls_cert=str(tmp_path / "nope.pem"))


def test_unknown_tls_setting_is_refused(pki):
    with pytest.raises(TypeError, match="unknown tls settings: cafile"):
        open_storage(("127.0.0.1", 1), tls=dict(cafile=str(pki.ca)), wait=False)


def test_twistd_options(tmp_path, pki):
    from twisted.python import usage
    from zeotwist.server.tap import DEFAULT_LISTEN, Options
    opts = Options()
    opts.parseOptions(["-f", str(tmp_path / "d.fs"), "--listen-tls", "tcp:8443",
                       "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                       "--tls-ca", str(pki.ca)])
    s = opts.settings
    assert (s["listen_tls"], s["listen"]) == (["tcp:8443"], [])   # no plain default then
    assert (s["tls_cert"], s["tls_key"], s["tls_ca"]) == (
        str(pki.server_cert), str(pki.server_key), str(pki.ca))
    opts = Options()
    opts.parseOptions(["-f", str(tmp_path / "d.fs")])
    assert opts.settings["listen"] == [DEFAULT_LISTEN] and opts.settings["listen_tls"] == []
    with pytest.raises(usage.UsageError, match="needs --tls-cert"):
        Options().parseOptions(["--listen-tls", "tcp:8443"])
    with pytest.raises(usage.UsageError, match="--tls-ca applies to --listen-tls"):
        Options().parseOptions(["--tls-ca", str(pki.ca)])


def test_server_config_file_keys(tmp_path, pki):
    from zeotwist.server.tap import Options, ServerService
    users = tmp_path / "users"
    set_user(str(users), "alice", None, "rw=*")
    conf = tmp_path / "server.conf"
    conf.write_text(
        "<zeotwist>\n  listen-tls tcp:0:interface=127.0.0.1\n  tls-cert %s\n  tls-key %s\n"
        "  tls-ca %s\n  auth-file %s\n</zeotwist>\n<filestorage>\n  path %s\n</filestorage>\n"
        % (pki.server_cert, pki.server_key, pki.ca, users, tmp_path / "d.fs"))
    opts = Options()
    opts.parseOptions(["-C", str(conf)])
    s = opts.settings
    assert s["listen"] == [] and s["listen_tls"] == ["tcp:0:interface=127.0.0.1"]
    assert (s["tls_ca"], s["auth_file"]) == (str(pki.ca), str(users))
    service = ServerService.from_config(str(conf), reactor=background_reactor())
    assert service.listen == [] and service.tls_ca == str(pki.ca)


def test_client_config_keys(tmp_path, pki):
    import ZODB.config
    import zeotwist.config
    server = tls_server(tmp_path, pki, ca=True)
    old, zeotwist.config.reactor = zeotwist.config.reactor, background_reactor()
    try:
        host, port = tls_address(server)
        storage = ZODB.config.storageFromString(
            "%%import zeotwist\n<zeotwistclient>\n  server localhost:%d\n  tls-ca %s\n"
            "  tls-cert %s\n  tls-key %s\n  wait-timeout 10\n</zeotwistclient>\n"
            % (port, pki.ca, pki.client_cert, pki.client_key))
        try:
            assert storage.is_connected()
            assert peer_common_name(sessions(server)[0].transport) == "alice"
        finally:
            storage.close()
    finally:
        zeotwist.config.reactor = old
        server.stop()


def test_twistd_serves_an_ssl_listen_string(tmp_path, pki):
    """The real twistd with Twisted's own ssl: string as --listen: the
    server is seen to need TLS, so its transports import pyOpenSSL
    (zeotwist.server.footprint hides it only from servers without TLS)."""
    from zeotwist.testing import start_twistd
    listen = "ssl:0:interface=127.0.0.1:privateKey=%s:certKey=%s" % (
        pki.server_key, pki.server_cert)
    server = start_twistd(str(tmp_path / "data.fs"), listen=listen)
    try:
        host, port = server.addresses[0].rsplit(":", 1)
        assert commit_and_load((host, int(port)), tls=dict(ca=str(pki.ca))) == "hello over TLS"
    finally:
        server.stop()


def test_twistd_serves_tls_with_client_certificates(tmp_path, pki):
    """The real twistd: --listen-tls, --tls-ca and --auth-file from the command line."""
    from zeotwist.testing import start_twistd
    users = str(tmp_path / "users")
    set_user(users, "alice", None, "rw=1")
    server = start_twistd(str(tmp_path / "data.fs"), "--listen-tls", LOOPBACK,
                          "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                          "--tls-ca", str(pki.ca), "--auth-file", users)
    try:
        assert len(server.addresses) == 2
        host, port = server.addresses[1].rsplit(":", 1)
        assert commit_and_load((host, int(port)), tls=alice(pki)) == "hello over TLS"
        assert "logged in as 'alice' (certificate)" in server.log()
    finally:
        server.stop()
