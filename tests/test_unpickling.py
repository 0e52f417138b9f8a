"""The server's bounded, restricted unpickling (zeotwist.server.unpickling):
limits checked before anything is built (issue 12, item 3), as pure logic
and against a real twistd (the 32-byte record that made it allocate 1 GiB).
"""
import datetime
import os
import pickle

import pytest
from BTrees.OOBTree import OOBucket
from ZODB.POSException import ConflictError
from ZODB.utils import z64

from zeotwist.errors import PickleRefused
from zeotwist.server.conflicts import RestrictedResolver
from zeotwist.server.unpickling import (
    Limits, check_depth, check_opcodes, decode_extension, pickle_class_name)
from zeotwist.testing import start_twistd
from zeotwist.wire import commands as C

from rawamp import RawClient

#: bytearray(2**30): 28 bytes of pickle, 1 GiB once loaded
BOMB = b"\x80\x03cbuiltins\nbytearray\nJ\x00\x00\x00@\x85R."


def exec_pickle(path) -> bytes:
    code = "open(%r, 'w').write('pwned')" % str(path)
    return b"cbuiltins\nexec\n(" + pickle.dumps(code, 0)[:-1] + b"tR."


def test_the_bomb_is_small():
    assert len(BOMB) <= 32


def test_opcode_and_value_limits_are_checked_before_loading():
    limits = Limits(max_bytes=1000, max_ops=50, max_value_bytes=100)
    check_opcodes(pickle.dumps(list(range(10)), 3), limits)
    with pytest.raises(PickleRefused, match="opcodes"):
        check_opcodes(pickle.dumps(list(range(60)), 3), limits)
    with pytest.raises(PickleRefused, match="value of 200 bytes"):
        check_opcodes(pickle.dumps(b"x" * 200, 3), limits)
    with pytest.raises(PickleRefused, match="1001 bytes"):
        check_opcodes(b"N" * 1000 + b".", limits)
    with pytest.raises(PickleRefused, match="not a pickle"):
        check_opcodes(b"\xff\xfe", limits)
    with pytest.raises(PickleRefused, match="out-of-band"):
        check_opcodes(b"\x80\x05\x97.", limits)


def test_nesting_depth_is_bounded_and_cycles_end():
    deep = []
    for _ in range(300):
        deep = [deep]
    with pytest.raises(PickleRefused, match="nested"):
        check_depth(deep, 200)
    loop = []
    loop.append(loop)
    check_depth(loop, 200)
    check_depth({"a": (1, [2, {3}])}, 200)


def test_extensions_decode_plain_data_only():
    ext = {"user": "me", "when": datetime.datetime(2026, 1, 1), "tags": {"a", "b"}}
    assert decode_extension(pickle.dumps(ext, 3)) == ext
    assert decode_extension(b"") == {}
    with pytest.raises(PickleRefused, match="builtins.exec"):
        decode_extension(exec_pickle("/nonexistent/x"))
    with pytest.raises(PickleRefused, match="not a dict"):
        decode_extension(pickle.dumps([1, 2], 3))
    with pytest.raises(PickleRefused, match="bytearray"):
        decode_extension(BOMB)
    with pytest.raises(PickleRefused, match="persistent"):
        decode_extension(b"\x80\x03X\x01\x00\x00\x00aQ.")


def test_class_names_are_read_without_unpickling(tmp_path):
    for protocol in (1, 2, 3, 4):
        data = pickle.dumps(OOBucket, protocol) + pickle.dumps({}, protocol)
        assert pickle_class_name(data) == ("BTrees.OOBTree", "OOBucket"), protocol
    as_names = pickle.dumps((("myapp.models", "Thing"), None), 3) + pickle.dumps({}, 3)
    assert pickle_class_name(as_names) == ("myapp.models", "Thing")
    marker = tmp_path / "ran"
    assert pickle_class_name(exec_pickle(marker)) == ("builtins", "exec")
    assert not marker.exists()
    assert pickle_class_name(b"garbage") == ("", "")


def test_zodb_conflict_error_names_the_class_without_running_it(tmp_path):
    from zeotwist.server.unpickling import guard_zodb
    guard_zodb()
    marker = tmp_path / "ran"
    e = ConflictError(oid=z64, serials=(z64, z64), data=exec_pickle(marker))
    assert e.class_name == "builtins.exec" and not marker.exists()


def test_relstorage_history_decodes_extensions_restricted_once_it_is_imported():
    """guard_zodb patches RelStorage's history module when RelStorage is
    imported (a served RelStorage is open, so imported, before its
    StorageServer calls guard_zodb); it never imports RelStorage itself."""
    pytest.importorskip("relstorage")
    import relstorage.storage.history
    from zeotwist.server.unpickling import decode_extension, guard_zodb
    guard_zodb()
    assert relstorage.storage.history.loads is decode_extension


def test_the_resolver_refuses_the_bomb_without_building_it():
    resolver = RestrictedResolver(storage=None)
    with pytest.raises(ConflictError):
        resolver.resolve(z64, z64, z64, BOMB + pickle.dumps({}, 3))


def test_a_32_byte_record_no_longer_costs_the_server_a_gigabyte(tmp_path):
    server = start_twistd(str(tmp_path / "data.fs"))
    try:
        c = RawClient(server.address)
        c.register("1")
        from zeotwist.wire.records import encode_store
        oid = C.NewOids.parseResponse(c.ask(C.NewOids, count=1), None)["oids"][0]

        def commit(serial, data):
            c.send(C.TpcBegin, user=b"", description=b"", extension=b"")
            c.send(C.StoreData, data=encode_store(oid, serial, data))
            voted = c.ask(C.Vote)
            if voted.get(b"conflicts"):
                return voted, None
            return voted, c.ask(C.Finish)[b"tid"]

        record = pickle.dumps(OOBucket, 3) + pickle.dumps(OOBucket({"a": 1}).__getstate__(), 3)
        _, tid1 = commit(z64, record)
        commit(tid1, record)
        before = server.peak_rss()
        voted, tid = commit(tid1, BOMB + pickle.dumps({}, 3))   # stale: resolution
        growth = server.peak_rss() - before
        print("bomb: peak RSS %d -> %d MiB (+%.1f MiB)"
              % (before >> 20, server.peak_rss() >> 20, growth / 2**20))
        # refused as a conflict, by name (before anything is built), not built
        assert tid is None and voted[b"conflicts"][:8] == oid
        assert "not resolving conflict" in server.log() and "bytearray" in server.log()
        assert growth < 64 * 2**20
        c.close()
    finally:
        server.stop()
    assert os.path.exists(str(tmp_path / "data.fs"))
