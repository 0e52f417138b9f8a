"""The server's resource and conflict-resolution options: --max-connections,
--max-pending-output, --client-conflict-resolution, --allow-conflict-class,
on the command line and in the configuration file, and what
--client-conflict-resolution does to a ZODB application."""
import os
import pickle
import textwrap

import pytest
import transaction
from BTrees.OOBTree import OOBucket
from twisted.internet.task import Clock
from twisted.python import usage
from ZODB import DB
from ZODB.FileStorage import FileStorage
from ZODB.POSException import ConflictError
from ZODB.utils import z64

from zeotwist import ClientStorage
from zeotwist.client.reactorthread import background_reactor, blocking_call
from zeotwist.server.limits import DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_PENDING_OUTPUT
from zeotwist.server.tap import Options, ServerService
from zeotwist.testing import RunningServer, connect_in_memory, memory_server, start_server
from zeotwist.wire import commands as C
from zeotwist.wire.records import encode_store

MiB = 2**20


def parse(*argv) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def write_conf(tmp_path, server_keys: str) -> str:
    path = tmp_path / "server.conf"
    path.write_text(textwrap.dedent("""\
        <zeotwist>
          listen tcp:0:interface=127.0.0.1
        %s
        </zeotwist>
        <filestorage 1>
          path %s
        </filestorage>
        """) % (textwrap.indent(textwrap.dedent(server_keys), "  "), tmp_path / "data.fs"))
    return str(path)


FILE_KEYS = """\
    max-connections 7
    max-pending-output 3MB
    client-conflict-resolution on
    allow-conflict-class myapp.counters.*
    allow-conflict-class myapp.Tally
    """


def test_options_on_the_command_line_and_in_the_file(tmp_path):
    s = parse().settings
    assert s["max_connections"] == DEFAULT_MAX_CONNECTIONS
    assert s["max_pending_output"] == DEFAULT_MAX_PENDING_OUTPUT
    assert s["client_conflict_resolution"] is False and s["conflict_classes"] == []

    s = parse("--max-connections", "50", "--max-pending-output", "2MB",
              "--client-conflict-resolution", "--allow-conflict-class", "a.B").settings
    assert (s["max_connections"], s["max_pending_output"]) == (50, 2 * MiB)
    assert s["client_conflict_resolution"] is True and s["conflict_classes"] == ["a.B"]

    conf = write_conf(tmp_path, FILE_KEYS)
    s = parse("-C", conf).settings
    assert (s["max_connections"], s["max_pending_output"]) == (7, 3 * MiB)
    assert s["client_conflict_resolution"] is True
    assert s["conflict_classes"] == ["myapp.counters.*", "myapp.Tally"]

    # The command line overrides the numbers; its classes add to the file's.
    s = parse("-C", conf, "--max-connections", "9", "--max-pending-output", "512KB",
              "--allow-conflict-class", "other.C").settings
    assert (s["max_connections"], s["max_pending_output"]) == (9, 512 * 1024)
    assert s["conflict_classes"] == ["myapp.counters.*", "myapp.Tally", "other.C"]

    for argv in (["--max-connections", "0"], ["--max-pending-output", "0"]):
        with pytest.raises(usage.UsageError, match="must be at least 1"):
            parse(*argv)
    with pytest.raises(usage.UsageError):
        parse("--max-connections", "many")


def test_file_options_reach_the_sessions_and_the_storage(tmp_path):
    conf = write_conf(tmp_path, FILE_KEYS)
    service = ServerService.from_config(conf, reactor=background_reactor())

    def start():
        service.startService()
        return service.listening
    running = RunningServer(service, service.reactor,
                            blocking_call(service.reactor, start, timeout=30))
    storage = ClientStorage(running.address, reactor=background_reactor(), wait_timeout=10)
    try:
        server = running.server
        (session,) = server.sessions
        assert session.factory.limiter.cap == 7
        assert session.max_pending_output == 3 * MiB
        assert service.conflict_classes == ("myapp.counters.*", "myapp.Tally")
        # No resolver that unpickles anything is installed.
        resolve = server.storage.tryToResolveConflict
        assert resolve.__name__ == "no_resolution"
        with pytest.raises(ConflictError):
            resolve(b"\0" * 8, b"\1" * 8, z64, b"not even a pickle")
    finally:
        storage.close()
        running.stop()


# -- --client-conflict-resolution at the protocol level ---------------------------------

def record(obj) -> bytes:
    return pickle.dumps(type(obj), 3) + pickle.dumps(obj.__getstate__(), 3)


def exec_record(marker) -> bytes:
    code = "open(%r, 'w').write('pwned')" % marker
    return (b"cbuiltins\nexec\n(" + pickle.dumps(code, 0)[:-1] + b"tR."
            + pickle.dumps({}, 3))


def test_client_conflict_resolution_leaves_every_conflict_to_the_client(tmp_path):
    clock = Clock()
    server = memory_server(FileStorage(str(tmp_path / "data.fs")), clock,
                           client_conflict_resolution=True)
    a, _, pump, _ = connect_in_memory({"1": server}, clock)
    out = []

    def call(command, **kw):
        a.call(command, **kw).addBoth(out.append)
        pump.flush()
        return out.pop()

    def commit(oid, serial, data):
        a.send(C.TpcBegin, user=b"", description=b"", extension=b"")
        a.send(C.StoreData, data=encode_store(oid, serial, data))
        voted = call(C.Vote)
        return voted, (None if voted["conflicts"] else call(C.Finish)["tid"])

    try:
        call(C.Register, protocol=C.PROTOCOL_VERSION, storage="1", read_only=False)
        oid = call(C.NewOids, count=1)["oids"][0]
        _, tid1 = commit(oid, z64, record(OOBucket({"a": 1})))
        _, tid2 = commit(oid, tid1, record(OOBucket({"a": 1, "b": 2})))
        # A BTrees bucket would be resolved by default; here it is a conflict.
        voted, tid = commit(oid, tid1, record(OOBucket({"a": 1, "c": 3})))
        assert tid is None and voted["conflicts"] == oid + tid2 + tid1
        marker = str(tmp_path / "pwned")
        voted, tid = commit(oid, tid1, exec_record(marker))
        assert tid is None and voted["conflicts"][:8] == oid
        assert not os.path.exists(marker)
        assert server.lock.holder is None and server.stats["conflicts"] == 2
    finally:
        server.close()


# -- what a ZODB application sees ---------------------------------------------------------

@pytest.mark.parametrize("client_resolution", [False, True])
def test_application_sees_no_resolvable_conflict_in_either_mode(tmp_path, client_resolution):
    """Resolved on the server (allow-list) or by the client, re-voting."""
    running = start_server(str(tmp_path / "data.fs"),
                           client_conflict_resolution=client_resolution)

    def open_db():
        return DB(ClientStorage(running.address, reactor=background_reactor(),
                                wait_timeout=10, server_sync=True))
    db_a, db_b = open_db(), open_db()
    try:
        tm_a, tm_b = transaction.TransactionManager(), transaction.TransactionManager()
        root_a = db_a.open(tm_a).root()
        root_a["bucket"] = OOBucket()
        tm_a.commit()

        tm_b.begin()
        root_b = db_b.open(tm_b).root()
        root_b["bucket"]._p_activate()          # B reads the bucket ...
        root_a["bucket"]["a"] = 1               # ... A changes it and commits first
        tm_a.commit()
        root_b["bucket"]["b"] = 2
        tm_b.commit()                           # resolved on the server or the client
        tm_a.begin()
        assert dict(root_a["bucket"].items()) == {"a": 1, "b": 2}
        assert dict(root_b["bucket"].items()) == {"a": 1, "b": 2}
        assert running.server.stats["conflicts"] == 0
        assert running.server.stats["client_resolutions"] == (1 if client_resolution else 0)
    finally:
        db_a.close()
        db_b.close()
        running.stop()
