"""Authentication and rights (issue 6, item 7): --auth-file, Login before
Register, per-user read-only / read-write rights per storage enforced by the
server, typed refusals, the password file and ``python -m zeotwist adduser``.

Live servers on 127.0.0.1 on the background reactor; password entries use
1000 PBKDF2 rounds so that logins are fast.
"""
import io
import os
import stat
import time

import pytest
import ZODB
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.logger import globalLogPublisher
from ZODB.Connection import TransactionMetaData
from ZODB.POSException import ReadOnlyError
from ZODB.utils import z64

import zeotwist
from zeotwist import ClientStorage
from zeotwist.client.protocol import ClientProtocol
from zeotwist.client.reactorthread import background_reactor, blocking_call
from zeotwist.errors import NotLoggedIn, UnknownStorage, Unauthorized
from zeotwist.server.portal import StorageUser
from zeotwist.server.userfile import (
    NO_PASSWORD, hash_password, parse_rights, read_entries, set_user, verify_password)
from zeotwist.testing import Recorder, start_server
from zeotwist.wire import commands as C

from procutil import refused_at_once, wait_for

ROUNDS = 1000


@pytest.fixture
def users(tmp_path):
    path = str(tmp_path / "users")
    set_user(path, "alice", "alice-secret", "rw=*", ROUNDS)
    set_user(path, "bob", "bob-secret", "ro=1", ROUNDS)
    set_user(path, "carol", "carol-secret", "rw=other", ROUNDS)
    return path


@pytest.fixture
def auth_server(tmp_path, users):
    server = start_server(str(tmp_path / "data.fs"), auth_file=users,
                          allow_read_only_pack=True)
    yield server
    server.stop()


def reactor():
    return background_reactor()


def run(f, *args, **kw):
    return blocking_call(reactor(), f, *args, timeout=10, **kw)


def open_storage(server, **kw):
    kw.setdefault("reactor", reactor())
    kw.setdefault("wait_timeout", 10)
    return ClientStorage(server.address, **kw)


def refused(server, **kw) -> Exception:
    """Opening fails at once (not after wait_timeout) with the typed refusal."""
    return refused_at_once((Unauthorized, ReadOnlyError, UnknownStorage),
                           lambda wait: open_storage(server, wait_timeout=wait, **kw))


def raw_connection(server):
    """A bare ClientProtocol on a new connection: nothing sent yet."""
    recorder = Recorder()
    proto = ClientProtocol(recorder)
    host, port = server.address
    run(connectProtocol, TCP4ClientEndpoint(reactor(), host, port), proto)
    return proto, recorder


def wait_lost(recorder) -> None:
    """Until the server closes the connection (30 s: a hang guard)."""
    wait_for(lambda: recorder.lost, 30, "the server to close the connection")


def commit_root(storage, key, value):
    db = ZODB.DB(storage)
    try:
        with db.transaction() as conn:
            conn.root()[key] = value
    finally:
        db.close()


# -- logging in ---------------------------------------------------------------------------

def test_wrong_password_is_a_typed_error(auth_server):
    err = refused(auth_server, username="alice", password="wrong")
    assert isinstance(err, Unauthorized)
    assert "login failed: unknown user 'alice' or wrong password" in str(err)
    err = refused(auth_server, username="nobody", password="alice-secret")
    assert isinstance(err, Unauthorized)     # same answer for a wrong name


def test_no_credentials_is_not_logged_in(auth_server):
    err = refused(auth_server)
    assert isinstance(err, NotLoggedIn)
    assert "requires a login" in str(err)


def test_right_password_commits_and_loads(auth_server):
    cs = open_storage(auth_server, username="alice", password="alice-secret")
    commit_root(cs, "x", 42)          # closes cs; its session may linger a moment
    db = ZODB.DB(open_storage(auth_server, username="alice", password="alice-secret"))
    try:
        sessions = list(auth_server.server.sessions)
        assert sessions and all(
            (s.user.name, s.user.how, s.access) == ("alice", "password", "rw")
            for s in sessions)
        with db.transaction() as conn:
            assert conn.root()["x"] == 42
    finally:
        db.close()


def test_login_happens_again_on_reconnection(auth_server):
    cs = open_storage(auth_server, username="alice", password="alice-secret")
    try:
        (session,) = auth_server.server.sessions
        run(lambda: session.transport.abortConnection())
        wait_for(lambda: cs.is_connected() and any(
            s is not session for s in auth_server.server.sessions), 10, "the login again")
        (again,) = auth_server.server.sessions
        assert again.user.name == "alice"
        assert cs.lastTransaction() is not None
    finally:
        cs.close()


# -- rights -------------------------------------------------------------------------------

def test_read_only_user_cannot_register_read_write(auth_server):
    err = refused(auth_server, username="bob", password="bob-secret")
    assert isinstance(err, ReadOnlyError)
    assert "may only read storage '1'" in str(err)


def test_read_only_user_reads_but_writes_are_refused_by_the_server(auth_server):
    commit_root(open_storage(auth_server, username="alice", password="alice-secret"),
                "x", "from alice")
    db = ZODB.DB(open_storage(auth_server, username="bob", password="bob-secret",
                              read_only=True))
    try:
        with db.transaction() as conn:
            assert conn.root()["x"] == "from alice"
    finally:
        db.close()
    # The Deferred API, bypassing every client-side read-only check: the
    # server refuses each write itself, with ZODB's ReadOnlyError.
    client = run(zeotwist.connect, reactor(), auth_server.address, read_only=True,
                 username="bob", password="bob-secret", wait_timeout=10)
    try:
        assert client.server_read_only
        with pytest.raises(ReadOnlyError):
            run(client.new_oid)
        txn = client.transaction(TransactionMetaData("bob", "store", {}))
        txn.store(z64, client.last_transaction(), b"not a pickle")
        with pytest.raises(ReadOnlyError):
            run(txn.vote)
        entries, _complete = run(client.undo_log, 0, 10)
        txn = client.transaction(TransactionMetaData("bob", "undo", {}))
        txn.undo(entries[0]["id"])
        with pytest.raises(ReadOnlyError):
            run(txn.vote)
        with pytest.raises(ReadOnlyError):      # although the server allows read-only packs
            run(client.pack, time.time())
    finally:
        run(client.stop)
    # alice, connected read-only, may pack on this server: the refusal was bob's rights
    client = run(zeotwist.connect, reactor(), auth_server.address, read_only=True,
                 username="alice", password="alice-secret", wait_timeout=10)
    try:
        run(client.pack, time.time())
    finally:
        run(client.stop)


def test_user_without_rights_cannot_register(auth_server):
    err = refused(auth_server, username="carol", password="carol-secret")
    assert isinstance(err, Unauthorized)
    assert "no rights on storage '1'" in str(err)
    err = refused(auth_server, username="carol", password="carol-secret", storage="secret")
    assert isinstance(err, Unauthorized)      # existence is not revealed
    err = refused(auth_server, username="carol", password="carol-secret", storage="other")
    assert isinstance(err, UnknownStorage)    # hers, but not served here


def test_rights_changes_apply_at_the_next_login(auth_server, users):
    set_user(users, "bob", "bob-secret", "rw=1", ROUNDS)
    cs = open_storage(auth_server, username="bob", password="bob-secret")
    try:
        assert not cs.isReadOnly()
    finally:
        cs.close()


# -- the protocol -------------------------------------------------------------------------

def test_commands_before_login_are_refused_not_dropped(auth_server):
    proto, recorder = raw_connection(auth_server)
    try:
        with pytest.raises(NotLoggedIn):
            run(proto.call, C.LastTransaction)
        with pytest.raises(NotLoggedIn):
            run(proto.call, C.Register, protocol=C.PROTOCOL_VERSION, storage="1",
                read_only=True)
        assert not recorder.lost
        with pytest.raises(Unauthorized):
            run(proto.call, C.Login, username="alice", password="nope")
        assert run(proto.call, C.Login, username="alice", password="alice-secret") == \
            {"user": "alice"}
        answer = run(proto.call, C.Register, protocol=C.PROTOCOL_VERSION, storage="1",
                     read_only=False)
        assert answer["read_only"] is False
        with pytest.raises(Unauthorized, match="before Register"):
            run(proto.call, C.Login, username="bob", password="bob-secret")
    finally:
        proto.transport.loseConnection()


def test_certificate_login_without_tls_is_refused(auth_server):
    proto, recorder = raw_connection(auth_server)
    try:
        with pytest.raises(Unauthorized, match="no verified client certificate"):
            run(proto.call, C.Login, username="alice")
    finally:
        proto.transport.loseConnection()


def test_one_way_command_before_login_drops_the_connection(auth_server):
    proto, recorder = raw_connection(auth_server)
    run(proto.send, C.StoreData, data=b"x")
    wait_lost(recorder)


def test_handshake_timeout_still_applies(tmp_path, users):
    """Answering NOT_LOGGED_IN does not stop the handshake timeout (when it
    fires is pinned on a Clock: test_protocol.test_handshake_timeout_closes)."""
    server = start_server(str(tmp_path / "data.fs"), auth_file=users, handshake_timeout=0.5)
    whys = []
    observer = lambda event: whys.append(event.get("why", ""))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        proto, recorder = raw_connection(server)
        with pytest.raises(NotLoggedIn):
            run(proto.call, C.LastTransaction)
        wait_lost(recorder)
    finally:
        globalLogPublisher.removeObserver(observer)
        server.stop()
    assert "no handshake within 0.5 s" in whys, whys


def test_server_without_auth_ignores_credentials(server):
    cs = open_storage(server, username="alice", password="anything")
    try:
        assert cs.is_connected() and not cs.isReadOnly()
    finally:
        cs.close()
    proto, _ = raw_connection(server)
    try:
        assert run(proto.call, C.Login, username="x", password="y") == {"user": ""}
    finally:
        proto.transport.loseConnection()


def test_client_config_keys(auth_server):
    import ZODB.config
    import zeotwist.config
    old, zeotwist.config.reactor = zeotwist.config.reactor, reactor()
    try:
        host, port = auth_server.address
        storage = ZODB.config.storageFromString(
            "%%import zeotwist\n<zeotwistclient>\n  server %s:%d\n  username bob\n"
            "  password bob-secret\n  read-only on\n  wait-timeout 10\n</zeotwistclient>\n"
            % (host, port))
        try:
            assert storage.isReadOnly()
            (session,) = auth_server.server.sessions
            assert session.user.name == "bob"
        finally:
            storage.close()
    finally:
        zeotwist.config.reactor = old


# -- the password file --------------------------------------------------------------------

def test_password_hashes():
    stored = hash_password("s3cret", ROUNDS)
    assert stored.startswith("pbkdf2-sha256$1000$") and ":" not in stored
    assert verify_password("s3cret", stored)
    assert not verify_password("s3cret ", stored)
    assert hash_password("s3cret", ROUNDS) != stored               # salted
    for bad in (NO_PASSWORD, "", "plain", "md5$1$YQ==$YQ==", "pbkdf2-sha256$x$YQ==$YQ==",
                "pbkdf2-sha256$0$YQ==$YQ==", "pbkdf2-sha256$1000$!!$YQ=="):
        assert not verify_password("s3cret", bad), bad


def test_rights():
    rights = parse_rights("rw=main, catalog ; ro=*")
    assert rights == {"main": "rw", "catalog": "rw", "*": "ro"}
    user = StorageUser("u", rights)
    assert [user.access(s) for s in ("main", "catalog", "archive")] == ["rw", "rw", "ro"]
    assert parse_rights("ro=a;rw=a") == {"a": "rw"}                # read-write wins
    assert StorageUser("u", parse_rights("ro=a")).access("b") is None
    assert parse_rights("") == {}
    with pytest.raises(ValueError):
        parse_rights("admin=*")
    with pytest.raises(ValueError):
        parse_rights("rw")


def test_set_user_keeps_the_rest_of_the_file(tmp_path):
    path = str(tmp_path / "users")
    set_user(path, "alice", "a", "rw=*", ROUNDS)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with open(path, "a") as f:
        f.write("# a note\n\nbob:!:ro=main\n")
    set_user(path, "alice", "b", "ro=x", ROUNDS)
    text = open(path).read()
    assert "# a note" in text and text.count("alice:") == 1
    entries = read_entries(path)
    assert sorted(entries) == ["alice", "bob"]
    assert verify_password("b", entries["alice"].password)
    assert entries["alice"].rights == {"x": "ro"}
    assert entries["bob"].password == NO_PASSWORD
    for bad in ("a:b", "", " x", "#x"):
        with pytest.raises(ValueError):
            set_user(path, bad, "p", "rw=*", ROUNDS)
    with pytest.raises(ValueError):
        set_user(path, "dave", "p", "everything", ROUNDS)


def test_adduser_command(tmp_path, monkeypatch, capsys):
    from zeotwist.__main__ import main
    path = str(tmp_path / "users")
    monkeypatch.setattr("sys.stdin", io.StringIO("pa55word\n"))
    assert main(["adduser", path, "dave", "--rights", "ro=*;rw=scratch",
                 "--password-stdin", "--iterations", str(ROUNDS)]) == 0
    assert main(["adduser", path, "erin", "--no-password"]) == 0
    entries = read_entries(path)
    assert verify_password("pa55word", entries["dave"].password)
    assert entries["dave"].rights == {"*": "ro", "scratch": "rw"}
    assert entries["erin"].password == NO_PASSWORD and entries["erin"].rights == {"*": "rw"}
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert main(["adduser", path, "fred", "--password-stdin"]) == 1
    assert main(["adduser", path, "fred", "--no-password", "--rights", "bad"]) == 1
    assert "fred" not in read_entries(path)
    assert "empty password" in capsys.readouterr().err


def test_twistd_refuses_a_missing_password_file(tmp_path):
    from twisted.python import usage
    from zeotwist.server.tap import Options
    with pytest.raises(usage.UsageError, match="no password file"):
        Options().parseOptions(["-f", str(tmp_path / "d.fs"), "--auth-file",
                                str(tmp_path / "missing")])


def test_read_only_fallback_registers_a_read_only_user_read_only(auth_server):
    cs = open_storage(auth_server, username="bob", password="bob-secret",
                      read_only_fallback=True)
    try:
        assert cs.isReadOnly()
        (session,) = auth_server.server.sessions
        assert (session.user.name, session.access, session.read_only) == ("bob", "ro", True)
    finally:
        cs.close()
