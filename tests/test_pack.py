"""Pack through a live zeotwist server: ``python -m zeotwist pack`` against
a running server (and its errors), ``ClientStorage.pack`` with and without
waiting, commits going on while a pack runs, and read-only clients, which
may pack only where the server allows it (``--allow-read-only-pack``, on
the command line and in a configuration file).  Stopping a pack is
tests/test_pack_stop.py.
"""
import subprocess
import sys
import time

import pytest
from ZODB.Connection import TransactionMetaData
from ZODB.POSException import POSKeyError, ReadOnlyError
from ZODB.tests.MinPO import MinPO
from ZODB.tests.StorageTestBase import zodb_pickle
from ZODB.utils import z64

from procutil import wait_for
from zeotwist import ClientStorage
from zeotwist.client.reactorthread import background_reactor
from zeotwist.testing import start_server
from zeotwist.tools import tid_time


def _three_revisions(cs):
    """Three new revisions of the root object (so a GC pack keeps it)."""
    oid = z64
    try:
        serial = cs.load(oid)[1]
    except POSKeyError:
        serial = z64
    revs = []
    for i in range(3):
        t = TransactionMetaData()
        cs.tpc_begin(t)
        cs.store(oid, serial, zodb_pickle(MinPO(i)), "", t)
        cs.tpc_vote(t)
        serial = cs.tpc_finish(t)
        revs.append(serial)
    return oid, revs


def _zeotwist_cli(*args):
    return subprocess.run([sys.executable, "-m", "zeotwist", *args],
                          capture_output=True, text=True, timeout=60)


def test_pack_command_packs_a_running_server(server, make_client):
    cs = make_client()
    oid, revs = _three_revisions(cs)
    address = "%s:%d" % server.address
    kept = _zeotwist_cli("pack", address, "--days", "1")
    assert kept.returncode == 0, kept.stderr
    assert len(cs.history(oid, 10)) == 3       # nothing older than a day
    while time.time() <= tid_time(revs[-1]):
        time.sleep(0.01)                       # the pack time must follow the last commit
    packed = _zeotwist_cli("pack", address)
    assert packed.returncode == 0, packed.stderr
    assert "packed storage '1'" in packed.stdout
    assert [h["tid"] for h in cs.history(oid, 10)] == [revs[-1]]
    with pytest.raises(POSKeyError):
        cs.loadSerial(oid, revs[0])
    assert cs.loadSerial(oid, revs[-1]) == zodb_pickle(MinPO(2))


def test_pack_command_reports_errors(server):
    bad = _zeotwist_cli("pack", "%s:%d" % server.address, "--storage", "nope",
                        "--wait-timeout", "1")
    assert bad.returncode == 1
    assert "cannot connect" in bad.stderr and "nope" in bad.stderr


def test_pack_does_not_hold_up_commits(server, make_client, monkeypatch):
    """A pack runs beside the storage's commit thread: commits go on meanwhile."""
    import threading
    cs, other = make_client(), make_client()
    _three_revisions(cs)
    fs = server.server.storage
    entered, release = threading.Event(), threading.Event()
    real_packer = fs.packer

    def slow_packer(storage, referencesf, stop, gc):
        entered.set()
        release.wait(10)
        return real_packer(storage, referencesf, stop, gc)

    monkeypatch.setattr(fs, "packer", slow_packer)
    done = []
    packer = threading.Thread(target=lambda: done.append(cs.pack()))
    packer.start()
    try:
        assert entered.wait(10)
        _three_revisions(other)                # commits while the pack runs
    finally:
        release.set()
        packer.join(10)
    assert done == [None]


def test_read_only_clients_cannot_pack_or_undo(server, make_client):
    writer = make_client()
    oid, revs = _three_revisions(writer)
    reader = make_client(read_only=True)
    with pytest.raises(ReadOnlyError):
        reader.pack()
    undo_id = reader.undoLog(0, 1)[0]["id"]
    t = TransactionMetaData()
    with pytest.raises(ReadOnlyError):
        reader.undo(undo_id, t)
    with pytest.raises(ReadOnlyError):
        reader.tpc_begin(t)
    assert len(writer.history(oid, 10)) == 3   # nothing was packed or undone


def test_server_may_allow_read_only_clients_to_pack(tmp_path):
    running = start_server(str(tmp_path / "data.fs"), allow_read_only_pack=True)
    try:
        writer = ClientStorage(running.address, reactor=background_reactor(), wait_timeout=10)
        reader = ClientStorage(running.address, reactor=background_reactor(), wait_timeout=10,
                               read_only=True)
        try:
            oid, revs = _three_revisions(writer)
            while time.time() <= tid_time(revs[-1]):
                time.sleep(0.01)
            reader.pack()
            assert len(writer.history(oid, 10)) == 1
        finally:
            writer.close()
            reader.close()
    finally:
        running.stop()


def test_allow_read_only_pack_command_line(tmp_path):
    from zeotwist.server.tap import Options, makeService
    flag = Options()
    flag.parseOptions(["-f", str(tmp_path / "a.fs"), "--allow-read-only-pack"])
    assert makeService(flag).allow_read_only_pack is True
    default = Options()
    default.parseOptions(["-f", str(tmp_path / "a.fs")])
    assert makeService(default).allow_read_only_pack is False


def test_allow_read_only_pack_config_key(tmp_path):
    from zeotwist.server.tap import Options, makeService
    conf = tmp_path / "server.conf"
    conf.write_text("<zeotwist>\n  allow-read-only-pack on\n</zeotwist>\n"
                    "<filestorage main>\n  path %s\n</filestorage>\n" % (tmp_path / "a.fs"))
    options = Options()
    options.parseOptions(["-C", str(conf)])
    assert makeService(options).allow_read_only_pack is True


def test_pack_without_waiting(server, make_client):
    cs = make_client()
    oid, revs = _three_revisions(cs)
    while time.time() <= tid_time(revs[-1]):
        time.sleep(0.01)
    cs.pack(wait=False)                        # ZEO's spelling: returns at once
    wait_for(lambda: len(cs.history(oid, 10)) == 1, 10, "the pack to finish")
