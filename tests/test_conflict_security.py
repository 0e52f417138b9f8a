"""Server-side conflict resolution unpickles client records with an
allow-list: a record that would run code on the server runs nothing.

Over a FileStorage and over RelStorage on PostgreSQL (whose vote resolves
conflicts with its own resolver, routed through zeotwist's)."""
import os
import pickle

import pytest
from BTrees.OOBTree import OOBucket
from persistent.mapping import PersistentMapping
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from ZODB.FileStorage import FileStorage
from ZODB.POSException import ConflictError
from ZODB.utils import z64

from zeotwist.server.conflicts import REFUSAL_DEBUG_INTERVAL, RestrictedResolver
from zeotwist.testing import connect_in_memory, memory_server
from zeotwist.wire import commands as C
from zeotwist.wire.records import encode_store


def exec_pickle(marker):
    """A ZODB-shaped record whose *class* part calls builtins.exec."""
    code = "open(%r, 'w').write('pwned')" % marker
    evil = b"c" + b"builtins\nexec\n" + b"(" + pickle.dumps(code, 0)[:-1] + b"tR."
    return evil + pickle.dumps({}, 3)


def record(obj):
    """A ZODB record (class pickle + state pickle) for ``obj``."""
    return pickle.dumps(type(obj), 3) + pickle.dumps(obj.__getstate__(), 3)


def open_storage(kind, tmp_path, request):
    if kind == "filestorage":
        return FileStorage(str(tmp_path / "data.fs"))
    from zeotwist.pgtesting import relstorage_opener
    return relstorage_opener(request.getfixturevalue("pg_dsn"))()


@pytest.fixture(params=["filestorage", "relstorage"])
def world(tmp_path, request):
    clock = Clock()
    server = memory_server(open_storage(request.param, tmp_path, request), clock)
    a, _, pump, _ = connect_in_memory({"1": server}, clock)
    out = []
    a.call(C.Register, protocol=C.PROTOCOL_VERSION, storage="1", read_only=False).addBoth(out.append)
    pump.flush()
    yield server, a, pump
    server.close()


def commit(a, pump, oid, serial, data):
    a.send(C.TpcBegin, user=b"", description=b"", extension=b"")
    a.send(C.StoreData, data=encode_store(oid, serial, data))
    out = []
    a.call(C.Vote).addBoth(out.append)
    pump.flush()
    voted = out[0]
    if isinstance(voted, Failure):     # RelStorage raises conflicts from its vote
        voted.trap(ConflictError)
        return dict(resolved=[], conflicts=voted.value.oid), None
    if voted["conflicts"]:
        return voted, None
    a.call(C.Finish).addBoth(out.append)
    pump.flush()
    return voted, out[1]["tid"]


def new_oid(a, pump):
    out = []
    a.call(C.NewOids, count=1).addBoth(out.append)
    pump.flush()
    return out[0]["oids"][0]


def test_exec_in_a_conflicting_record_runs_nothing(world, tmp_path):
    server, a, pump = world
    marker = str(tmp_path / "pwned")
    oid = new_oid(a, pump)
    _, tid1 = commit(a, pump, oid, z64, record(OOBucket({"a": 1})))
    commit(a, pump, oid, tid1, record(OOBucket({"a": 1, "b": 2})))
    voted, tid = commit(a, pump, oid, tid1, exec_pickle(marker))    # stale: resolution
    assert tid is None and voted["conflicts"][:8] == oid
    assert not os.path.exists(marker)
    assert server.lock.holder is None


def test_btrees_still_resolve(world):
    server, a, pump = world
    oid = new_oid(a, pump)
    _, tid1 = commit(a, pump, oid, z64, record(OOBucket({"a": 1})))
    commit(a, pump, oid, tid1, record(OOBucket({"a": 1, "b": 2})))
    voted, tid = commit(a, pump, oid, tid1, record(OOBucket({"a": 1, "c": 3})))
    assert tid is not None and voted["resolved"] == [oid]
    data, _ = server.storage.load(oid)
    state = pickle.loads(data[len(pickle.dumps(OOBucket, 3)):])
    bucket = OOBucket()
    bucket.__setstate__(state)
    assert dict(bucket.items()) == {"a": 1, "b": 2, "c": 3}


def test_allow_list_refuses_other_classes(tmp_path):
    resolver = RestrictedResolver(storage=None)
    assert resolver.find_class("BTrees.OOBTree", "OOBucket") is OOBucket
    assert resolver.find_class("builtins", "set") is set
    for module, name in [("builtins", "exec"), ("os", "system"), ("builtins", "eval"),
                         ("persistent.mapping", "PersistentMapping"),
                         ("BTrees.OOBTree", "nonexistent")]:
        with pytest.raises(ConflictError):
            resolver.find_class(module, name)


def test_a_refused_class_is_refused_by_name_and_logged_sparingly(monkeypatch):
    """A hot object of an application class is refused hundreds of times a
    second: from its class name, nothing scanned or unpickled; logged at
    info once, then at debug once per REFUSAL_DEBUG_INTERVAL."""
    clock, events = Clock(), []
    resolver = RestrictedResolver(storage=None, clock=clock)
    monkeypatch.setattr(resolver, "_unpickler", lambda *a: pytest.fail("unpickled"))
    observe = lambda event: events.append(event["log_level"]) if "not resolving" in \
        event.get("log_format", "") else None                  # noqa: E731
    globalLogPublisher.addObserver(observe)
    try:
        for step in (0, 1, 1, REFUSAL_DEBUG_INTERVAL, 1):
            clock.advance(step)
            with pytest.raises(ConflictError) as refused:
                resolver.resolve(b"\0" * 8, b"\1" * 8, z64, record(PersistentMapping()))
            assert refused.value.serials == (b"\1" * 8, z64)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert events == [LogLevel.info, LogLevel.debug, LogLevel.debug]


def test_refusals_of_more_classes_than_remembered_log_at_debug(monkeypatch):
    """Info once per refused class for the first 1000 classes; a client that
    makes conflicts of ever new class names gets debug lines after that,
    not an info line each."""
    resolver = RestrictedResolver(storage=None, clock=Clock())
    monkeypatch.setattr(resolver, "_unpickler", lambda *a: pytest.fail("unpickled"))
    events = []
    observe = lambda event: events.append(event["log_level"]) if "not resolving" in \
        event.get("log_format", "") else None                  # noqa: E731
    globalLogPublisher.addObserver(observe)
    try:
        for n in range(1003):
            with pytest.raises(ConflictError):
                resolver.resolve(b"\0" * 8, b"\1" * 8, z64,
                                 b"\x80\x03capp%d\nThing\nq\x00.N." % n)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert events == [LogLevel.info] * 1000 + [LogLevel.debug] * 3


def test_no_resolution_at_all_over_relstorage(tmp_path, request):
    """--client-conflict-resolution: RelStorage's vote resolves nothing either."""
    clock = Clock()
    server = memory_server(open_storage("relstorage", tmp_path, request), clock,
                           client_conflict_resolution=True)
    try:
        a, _, pump, _ = connect_in_memory({"1": server}, clock)
        a.call(C.Register, protocol=C.PROTOCOL_VERSION, storage="1", read_only=False)
        pump.flush()
        oid = new_oid(a, pump)
        _, tid1 = commit(a, pump, oid, z64, record(OOBucket({"a": 1})))
        commit(a, pump, oid, tid1, record(OOBucket({"a": 1, "b": 2})))
        voted, tid = commit(a, pump, oid, tid1, record(OOBucket({"a": 1, "c": 3})))
        assert tid is None and voted["conflicts"][:8] == oid
        assert server.stats["conflicts"] == 1
    finally:
        server.close()


def call(a, pump, command, **kw):
    out = []
    a.call(command, **kw).addBoth(out.append)
    pump.flush()
    return out[0]


def test_client_resolution_mode_unpickles_no_record(tmp_path, request):
    """--client-conflict-resolution with a client that resolves: the exec
    record goes back to the client as bytes, and an exec record sent as the
    "resolved" one is stored as bytes; nothing runs on the server."""
    clock = Clock()
    server = memory_server(open_storage("filestorage", tmp_path, request), clock,
                           client_conflict_resolution=True)
    a, session, pump, _ = connect_in_memory({"1": server}, clock)
    try:
        call(a, pump, C.Register, protocol=C.PROTOCOL_VERSION, storage="1", read_only=False)
        marker = str(tmp_path / "pwned")
        oid = new_oid(a, pump)
        _, tid1 = commit(a, pump, oid, z64, record(OOBucket({"a": 1})))
        _, tid2 = commit(a, pump, oid, tid1, record(OOBucket({"a": 1, "b": 2})))
        a.send(C.TpcBegin, user=b"", description=b"", extension=b"")
        a.send(C.StoreData, data=encode_store(oid, tid1, exec_pickle(marker)))
        voted = call(a, pump, C.Vote, can_resolve=True)
        (item,) = voted["to_resolve"]
        assert item["data"] == exec_pickle(marker) and item["committed"] == tid2
        assert server.lock.holder is session and not os.path.exists(marker)
        a.send(C.StoreData, data=encode_store(oid, tid2, exec_pickle(marker)))
        voted = call(a, pump, C.Vote, can_resolve=True)
        assert voted["conflicts"] == b"" and not voted["to_resolve"]
        tid3 = call(a, pump, C.Finish)["tid"]
        assert server.storage.load(oid) == (exec_pickle(marker), tid3)
        assert not os.path.exists(marker) and server.lock.holder is None
    finally:
        server.close()


def test_relstorage_leaves_nothing_to_the_client_either(tmp_path, request):
    """RelStorage finds conflicts in its tpc_vote, not in store: with
    --client-conflict-resolution a resolving client still gets a plain
    conflict (docs/security.md), and the lock is free."""
    clock = Clock()
    server = memory_server(open_storage("relstorage", tmp_path, request), clock,
                           client_conflict_resolution=True)
    a, _, pump, _ = connect_in_memory({"1": server}, clock)
    try:
        call(a, pump, C.Register, protocol=C.PROTOCOL_VERSION, storage="1", read_only=False)
        oid = new_oid(a, pump)
        _, tid1 = commit(a, pump, oid, z64, record(OOBucket({"a": 1})))
        commit(a, pump, oid, tid1, record(OOBucket({"a": 1, "b": 2})))
        a.send(C.TpcBegin, user=b"", description=b"", extension=b"")
        a.send(C.StoreData, data=encode_store(oid, tid1, record(OOBucket({"a": 1, "c": 3}))))
        voted = call(a, pump, C.Vote, can_resolve=True)    # raised by RelStorage's vote
        assert voted.check(ConflictError) and voted.value.oid == oid
        assert server.lock.holder is None and server.stats["client_resolutions"] == 0
    finally:
        server.close()
