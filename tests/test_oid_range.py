"""One writer cannot use up the oid space (issue 12, item 9): oids near the
top are refused at store unless the server handed them out, and NewOids
keeps working, also after a restart.  Pure logic, then raw AMP boxes against
a real twistd and its FileStorage."""
import pickle

import pytest
from twisted.protocols import amp
from ZODB.utils import p64, u64, z64

from zeotwist.errors import OidOutOfRange
from zeotwist.server.oids import OID_CEILING, OidRange, OidReservation
from zeotwist.testing import start_twistd
from zeotwist.wire import commands as C
from zeotwist.wire.records import encode_store

from rawamp import RawClient

TOP = p64(2**64 - 1)
RECORD = pickle.dumps((dict, None), 3) + pickle.dumps({}, 3)


def test_the_range_refuses_the_top_half_unless_handed_out():
    r = OidRange(highest_issued=5)
    r.check(p64(1))
    r.check(p64(OID_CEILING))
    for oid in (p64(OID_CEILING + 1), TOP):
        with pytest.raises(OidOutOfRange, match="never handed out"):
            r.check(oid)
    r.issued([p64(OID_CEILING + 10), p64(3)])
    r.check(p64(OID_CEILING + 10))
    with pytest.raises(OidOutOfRange):
        r.check(p64(OID_CEILING + 11))
    assert OidRange(highest_issued=2**64 - 1).highest == 2**64 - 1


def test_the_reservation_mark_never_overflows(tmp_path):
    class Counter:
        def __init__(self):
            self.next = 2**64 - 3

        def new_oid(self):
            self.next += 1
            return p64(self.next)

    res = OidReservation(Counter(), str(tmp_path / "oids"))
    assert u64(res.new_oids(2)[-1]) == 2**64 - 1
    assert res.mark == 2**64 - 1


def new_oids(c, n=1) -> list:
    return C.NewOids.parseResponse(c.ask(C.NewOids, count=n), None)["oids"]


def store(c, oid) -> dict:
    c.send(C.TpcBegin, user=b"", description=b"", extension=b"")
    c.send(C.StoreData, data=encode_store(oid, z64, RECORD))
    voted = c.ask(C.Vote)
    if amp.ERROR in voted:
        return voted
    return c.ask(C.Finish)


def test_a_writer_cannot_break_new_oids_for_everyone(tmp_path):
    data = str(tmp_path / "data.fs")
    server = start_twistd(data)
    try:
        c = RawClient(server.address)
        c.register("1")
        refused = store(c, TOP)
        assert refused[amp.ERROR_CODE] == b"STORAGE_TRANSACTION", refused
        assert b"never handed out" in refused[amp.ERROR_DESCRIPTION]
        assert b"tid" in store(c, p64(OID_CEILING))      # the highest a client may pick
        handed = new_oids(c, 3)                          # the counter goes on past it
        assert [u64(o) for o in handed] == [OID_CEILING + 1, OID_CEILING + 2, OID_CEILING + 3]
        assert b"tid" in store(c, handed[-1])            # handed out: may be stored
        c.close()
    finally:
        server.stop()
    server = start_twistd(data)                           # after a restart
    try:
        c = RawClient(server.address)
        c.register("1")
        again = new_oids(c, 2)
        assert u64(again[0]) > OID_CEILING + 3 and u64(again[1]) < 2**64 - 1
        assert b"tid" in store(c, again[0])
        assert store(c, TOP)[amp.ERROR_CODE] == b"STORAGE_TRANSACTION"
        assert "Traceback" not in server.log()
        c.close()
    finally:
        server.stop()
