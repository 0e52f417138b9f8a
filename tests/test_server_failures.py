"""No wedged storage, no silent failure (issue 12, items 2 and 10):

* a tpc_finish that raises leaves the storage usable and tells the client
  the truth: committed (the tid, other clients invalidated) or not;
* a record header claiming 4 GiB in a disk-spooled transaction is refused
  before anything is allocated for it (real twistd, raw boxes);
* a failed Pack answers why and logs it once; a record garbage collection
  cannot read is named, and packing without GC still works.
"""
import pickle
import struct
import time

import pytest
from twisted.internet.task import Clock
from twisted.protocols import amp
from ZODB.MappingStorage import MappingStorage
from ZODB.POSException import StorageError
from ZODB.utils import p64, z64

from zeotwist.testing import connect_in_memory, memory_server, start_twistd
from zeotwist.tools import tid_time
from zeotwist.wire import commands as C
from zeotwist.wire.records import encode_store

from rawamp import RawClient

RECORD = pickle.dumps((dict, None), 3) + pickle.dumps({"v": 1}, 3)


class FailingFinish(MappingStorage):
    """tpc_finish raises once: ``before`` the commit, or ``after`` it."""
    fail = None

    def tpc_finish(self, transaction, func=lambda tid: None):
        fail, self.fail = self.fail, None
        if fail == "before":
            raise OSError("disk on fire")
        tid = super().tpc_finish(transaction, func)
        if fail == "after":
            raise OSError("fsync of the index failed")
        return tid


@pytest.fixture
def pair():
    clock = Clock()
    storage = FailingFinish()
    server = memory_server(storage, clock)
    a, _, pump_a, _ = connect_in_memory({"1": server}, clock)
    b, _, pump_b, seen_b = connect_in_memory({"1": server}, clock)

    def call(client, pump, command, **kw):
        out = []
        client.call(command, **kw).addBoth(out.append)
        pump.flush()
        return out[0]

    for client, pump in ((a, pump_a), (b, pump_b)):
        call(client, pump, C.Register, protocol=C.PROTOCOL_VERSION, storage="1",
             read_only=False)

    def commit(oid):
        a.send(C.TpcBegin, user=b"", description=b"", extension=b"")
        a.send(C.StoreData, data=encode_store(oid, z64, RECORD))
        assert call(a, pump_a, C.Vote)["conflicts"] == b""
        result = call(a, pump_a, C.Finish)
        pump_b.flush()
        return result

    yield storage, server, commit, seen_b
    server.close()


def test_a_finish_that_fails_before_committing_says_so_and_the_storage_goes_on(pair):
    storage, server, commit, seen_b = pair
    storage.fail = "before"
    failure = commit(p64(1))
    assert failure.check(StorageError) and "not committed" in str(failure.value)
    assert storage.lastTransaction() == z64 and seen_b.invalidations == []
    assert server.lock.holder is None
    tid = commit(p64(2))["tid"]                    # later commits proceed
    assert storage.lastTransaction() == tid


def test_a_finish_that_fails_after_committing_answers_the_tid(pair):
    storage, server, commit, seen_b = pair
    storage.fail = "after"
    tid = commit(p64(1))["tid"]                    # committed: the client is told so
    assert storage.lastTransaction() == tid
    assert seen_b.invalidations == [(tid, [p64(1)])]
    assert server.lock.holder is None
    assert commit(p64(2))["tid"] > tid             # the storage's own lock was released


def test_a_4_gib_record_header_in_a_spooled_transaction_allocates_nothing(tmp_path):
    server = start_twistd(str(tmp_path / "data.fs"))
    try:
        c = RawClient(server.address)
        c.register("1")
        oid = C.NewOids.parseResponse(c.ask(C.NewOids, count=1), None)["oids"][0]
        c.send(C.TpcBegin, user=b"", description=b"", extension=b"")
        big = encode_store(oid, z64, b"x" * (9 * 2**20))     # past the 8 MiB spool: on disk
        for off in range(0, len(big), 2**20):
            c.send(C.StoreData, data=big[off:off + 2**20])
        c.send(C.StoreData, data=struct.pack(">c8s8sI", b"s", oid, z64, 2**32 - 1))
        before = server.rss("VmPeak")
        try:
            answer = c.ask(C.Vote)
        except ConnectionError:          # dropped as a protocol violation
            answer = {}
        growth = server.rss("VmPeak") - before
        print("4 GiB header: VmPeak +%.1f MiB, answer %r" % (growth / 2**20, answer))
        assert growth < 256 * 2**20
        assert amp.ANSWER not in answer
        c.close()
        c = RawClient(server.address)                          # the server goes on
        c.register("1")
        c.send(C.TpcBegin, user=b"", description=b"", extension=b"")
        c.send(C.StoreData, data=encode_store(oid, z64, RECORD))
        assert c.ask(C.Vote)[b"conflicts"] == b""
        assert b"tid" in c.ask(C.Finish)
        assert "claims 4294967295 bytes" in server.log()
        c.close()
    finally:
        server.stop()


def test_a_failed_pack_says_why_once_and_gc_free_packs_still_work(tmp_path):
    server = start_twistd(str(tmp_path / "data.fs"))
    try:
        c = RawClient(server.address)
        c.register("1")
        c.send(C.TpcBegin, user=b"", description=b"", extension=b"")
        c.send(C.StoreData, data=encode_store(z64, z64, b"\x80\x03garbage"))   # the root
        c.ask(C.Vote)
        tid = c.ask(C.Finish)[b"tid"]
        while time.time() <= tid_time(tid):     # the pack time must follow the commit's tid
            time.sleep(0.001)                   # polling the clock, bounded by the tid's time
        failed = c.ask(C.Pack, time=time.time(), gc=True)
        text = failed.get(amp.ERROR_DESCRIPTION, b"").decode()
        assert failed.get(amp.ERROR_CODE) == b"STORAGE", failed
        assert "garbage collection cannot read the references of the record of oid 0x0" \
            in text and "gc=False" in text
        assert server.log().count("pack of '1' failed") == 1
        assert "Traceback" not in server.log()
        assert amp.ANSWER in c.ask(C.Pack, time=time.time(), gc=False)
        c.close()
    finally:
        server.stop()
