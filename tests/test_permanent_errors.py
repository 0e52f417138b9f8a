"""Permanent errors fail at once; "nothing listening" is a retry (issue 13, item 4).

A wrong storage name, a writable client at a read-only server without
fallback, a refused login and a ZEO server raise their typed error as soon
as the server answers, naming the storage or user and the server, instead
of ``ClientDisconnected`` after ``wait_timeout``; calls waiting for a
reconnection that is refused fail at once too.  An address where nothing
listens stays a retry, logged once as a warning however many attempts it
takes, and the client connects when a server appears.  Live servers on
127.0.0.1 with FileStorages in tmp_path.
"""
import socket
import time

import pytest
import pytest_twisted
from twisted.logger import globalLogPublisher
from ZODB.POSException import ReadOnlyError

from zeotwist import ClientStorage
from zeotwist.client.reactorthread import background_reactor
from zeotwist.errors import ClientDisconnected, Unauthorized, UnknownStorage
from zeotwist.server.userfile import set_user
from zeotwist.testing import start_server

from procutil import REFUSAL_WAIT, refused_at_once

WAIT = REFUSAL_WAIT          # wait_timeout: far longer than "at once"
AT_ONCE = REFUSAL_WAIT / 2


def open_storage(address, **kw):
    return ClientStorage(address, reactor=background_reactor(), wait_timeout=WAIT, **kw)


def fails_at_once(cls, address, **kw) -> str:
    return str(refused_at_once(cls, lambda wait: ClientStorage(
        address, reactor=background_reactor(), wait_timeout=wait, **kw)))


def test_unknown_storage(server):
    text = fails_at_once(UnknownStorage, server.address, storage="nope")
    assert text == "no storage named 'nope' (server %s:%d)" % server.address


def test_writable_client_at_a_read_only_server(tmp_path):
    start_server(str(tmp_path / "data.fs")).stop()       # a read-only server needs the file
    server = start_server(str(tmp_path / "data.fs"), read_only=True)
    try:
        text = fails_at_once(ReadOnlyError, server.address)
        assert text.startswith("storage '1' is read-only on %s:%d" % server.address)
        assert "read_only=True" in text
        cs = open_storage(server.address, read_only_fallback=True)     # falls back instead
        assert cs.isReadOnly()
        cs.close()
    finally:
        server.stop()


def test_refused_login_names_the_user(tmp_path):
    users = str(tmp_path / "users")
    set_user(users, "alice", "secret", "rw=*", 1000)
    server = start_server(str(tmp_path / "data.fs"), auth_file=users)
    try:
        text = fails_at_once(Unauthorized, server.address, username="alice", password="guess")
        assert "unknown user 'alice' or wrong password" in text
    finally:
        server.stop()


def test_calls_waiting_for_a_refused_reconnection_fail_at_once(tmp_path):
    server = start_server(str(tmp_path / "data.fs"))
    host, port = server.address
    cs = open_storage(server.address)
    try:
        server.stop()
        # the same address now serves the file under another storage name
        server = start_server(str(tmp_path / "data.fs"), listen="tcp:%d:interface=%s"
                              % (port, host), name="other")
        start = time.monotonic()
        with pytest.raises(UnknownStorage, match="no storage named '1'"):
            cs.getSize()
        assert time.monotonic() - start < AT_ONCE        # (with the reconnection's backoff)
    finally:
        cs.close()
        server.stop()


def test_nothing_listening_is_a_retry_logged_once(tmp_path):
    lines = []

    def observe(event):
        if "cannot connect" in (event.get("log_format") or ""):
            lines.append(event)

    globalLogPublisher.addObserver(observe)
    cs = server = None
    try:
        with socket.socket() as bound:                   # bound, not listening: refused
            bound.bind(("127.0.0.1", 0))
            port = bound.getsockname()[1]
            # retried until wait_timeout: the timeout's message, naming the refusal
            with pytest.raises(ClientDisconnected,
                               match="^no connection .* within 1.5 s .*Connection refused"):
                ClientStorage(("127.0.0.1", port), reactor=background_reactor(),
                              wait_timeout=1.5)
            assert len(lines) == 1 and lines[0]["log_level"].name == "warn"
            cs = ClientStorage(("127.0.0.1", port), reactor=background_reactor(),
                               wait=False, wait_timeout=10)
            deadline = time.monotonic() + 10
            while len(lines) < 2:                        # its first attempt failed
                assert time.monotonic() < deadline
                time.sleep(0.01)                         # polling a real condition
        server = start_server(str(tmp_path / "data.fs"),
                              listen="tcp:%d:interface=127.0.0.1" % port)
        assert cs.getSize() >= 0            # it waits for, and gets, the connection
        assert cs.is_connected()
        assert len(lines) == 2, lines       # one per client, not one per attempt
    finally:
        globalLogPublisher.removeObserver(observe)
        if cs is not None:
            cs.close()
        if server is not None:
            server.stop()


# -- the Deferred API ---------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_connect_to_an_unknown_storage_fails_at_once(tmp_path):
    from twisted.internet import reactor

    import zeotwist
    from zeotwist.server.tap import ServerService
    service = ServerService(str(tmp_path / "data.fs"), ["tcp:0:interface=127.0.0.1"],
                            reactor=reactor)
    service.startService()
    try:
        host, port = (await service.listening)[0].rsplit(":", 1)
        start = reactor.seconds()
        with pytest.raises(UnknownStorage, match="no storage named 'nope'"):
            await zeotwist.connect(reactor, "%s:%s" % (host, port), "nope", wait_timeout=WAIT)
        assert reactor.seconds() - start < AT_ONCE
    finally:
        await service.stopService()
