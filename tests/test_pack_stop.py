"""SIGTERM while a long pack runs: the server stops promptly and cleanly.

A real ``twistd -n zeotwist`` process serving a real FileStorage.  A pack's
garbage collection (FileStorage's first and longest phase, which only reads)
is made as long as the test needs by a hook loaded into that process
(``sitecustomize`` on its PYTHONPATH): ZODB's ``referencesf`` there waits,
record by record, until the server's log says it is stopping the pack (a
bound of PATIENCE seconds: without that line the pack goes on); the root
references two more records, so garbage collection reads on after that.  The server
then gives the pack up at its next record, before the pack changed anything,
closes the storage and exits with status 0; every revision is still there.
"""
import signal
import subprocess
import threading
import time

from persistent.mapping import PersistentMapping
from ZODB.FileStorage import FileStorage

from zeotwist import ClientStorage
from zeotwist.client.reactorthread import background_reactor
from zeotwist.errors import ClientDisconnected

from procutil import child_env, start_twistd, wait_for
from test_startup import file_root, set_root

PATIENCE = 60

HOOK = '''
import sys, time
import ZODB.serialize
_references = ZODB.serialize.referencesf

def referencesf(data, oids=None):
    """The pack's garbage collection, one record at a time, while the
    server has not said it stops the pack (at most %(patience)d s)."""
    if sys._getframe(1).f_globals.get("__name__") != "zeotwist.server.pack":
        return _references(data, oids)          # not the pack's (prefetch)
    open(%(started)r, "a").close()
    deadline = time.monotonic() + %(patience)d
    while time.monotonic() < deadline:
        with open(%(log)r) as f:
            if "stopping the pack" in f.read():
                break
        time.sleep(0.01)        # polling the server's log, bounded
    return _references(data, oids)

ZODB.serialize.referencesf = referencesf
'''


def test_sigterm_during_a_pack_stops_it_and_the_server(tmp_path):
    data = tmp_path / "data.fs"
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    started = tmp_path / "gc-started"
    (hook_dir / "sitecustomize.py").write_text(HOOK % dict(
        started=str(started), log=str(tmp_path / "twistd.log"), patience=PATIENCE))
    env = child_env()
    env["PYTHONPATH"] = "%s:%s" % (hook_dir, env["PYTHONPATH"])
    server = start_twistd(str(data), env=env)
    packed = []
    try:
        # three revisions of the root; garbage collection reads it, then a and b
        set_root(server.address, "1", value=0, a=PersistentMapping(), b=PersistentMapping())
        for value in (1, 2):
            set_root(server.address, "1", value=value)
        cs = ClientStorage(server.address, reactor=background_reactor(), wait_timeout=10)

        def pack():
            try:
                cs.pack(time.time(), None)
                packed.append("packed")
            except ClientDisconnected as e:     # the server went away meanwhile
                packed.append(e)
        packer = threading.Thread(target=pack, daemon=True)
        packer.start()
        wait_for(started.exists, PATIENCE, "the pack's garbage collection to start")
        server.process.send_signal(signal.SIGTERM)
        try:
            status = server.process.wait(PATIENCE)
        except subprocess.TimeoutExpired:
            status = "still running"
        packer.join(PATIENCE)
        cs.close()
    finally:
        server.stop()
    log = server.log()
    assert status == 0, log
    assert log.count("stopping the pack of storage '1' before closing it") == 1, log
    assert "zeotwist: pack of '1' stopped: the server is stopping" in log, log
    assert "ended at" not in log and "[stderr#error]" not in log, log
    assert isinstance(packed[0], ClientDisconnected), packed
    # the storage as it was: not packed, every revision still there
    assert not (tmp_path / "data.fs.old").exists() and not (tmp_path / "data.fs.pack").exists()
    root = file_root(data)
    assert sorted(root) == ["a", "b", "value"] and root["value"] == 2
    fs = FileStorage(str(data), read_only=True)
    try:
        assert len(list(fs.iterator())) == 4    # the root's creation and three commits
    finally:
        fs.close()
