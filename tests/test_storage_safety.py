"""No client bytes reach an unpickler the server does not control, whatever
the storage (issue 12, item 1), attacked from outside: raw AMP boxes against
a real ``twistd zeotwist -C server.conf`` serving every storage type ZODB
ships that a configuration file can name.

The payloads are pickles calling ``builtins.exec`` with code that would
create a marker file: as a transaction's extension (unpickled by
MappingStorage in tpc_finish, by FileStorage's history and undoLog), as a
record sent with a stale serial (conflict resolution; MappingStorage's
ConflictError names the record's class), and already stored in a
FileStorage under a DemoStorage.  No marker may appear, and every storage
still commits ordinary transactions afterwards.
"""
import os
import pickle
import textwrap

import pytest
from twisted.protocols import amp
from ZODB.Connection import TransactionMetaData
from ZODB.FileStorage import FileStorage
from ZODB.utils import p64, z64

from zeotwist.errors import UnauditedStorage
from zeotwist.server.storagesafety import check_audited, reads_extension, unaudited
from zeotwist.testing import start_twistd
from zeotwist.wire import commands as C
from zeotwist.wire.records import encode_store

from procutil import child_env
from rawamp import RawClient

LOOPBACK = "tcp:0:interface=127.0.0.1"


def exec_pickle(code: str) -> bytes:
    """A pickle whose loading calls builtins.exec(code)."""
    return b"cbuiltins\nexec\n(" + pickle.dumps(code, 0)[:-1] + b"tR."


def marker_code(path) -> str:
    return "open(%r, 'w').write('pwned')" % str(path)


def record(value) -> bytes:
    """An ordinary ZODB record (class pickle + state pickle)."""
    return pickle.dumps((dict, None), 3) + pickle.dumps(value, 3)


#: storage name -> (configuration section, may the storage unpickle extensions)
STORAGES = {
    "fs": ("<filestorage fs>\n  path {tmp}/fs.fs\n</filestorage>", False),
    "mapping": ("<mappingstorage mapping>\n</mappingstorage>", True),
    "demo": ("<demostorage demo>\n</demostorage>", True),
    "demofs": ("<demostorage demofs>\n  <filestorage base>\n    path {tmp}/base.fs\n"
               "  </filestorage>\n  <filestorage changes>\n    path {tmp}/changes.fs\n"
               "  </filestorage>\n</demostorage>", False),
    "blobfs": ("<blobstorage blobfs>\n  blob-dir {tmp}/blobs-fs\n  <filestorage>\n"
               "    path {tmp}/blob.fs\n  </filestorage>\n</blobstorage>", False),
    "blobmap": ("<blobstorage blobmap>\n  blob-dir {tmp}/blobs-map\n  <mappingstorage>\n"
                "  </mappingstorage>\n</blobstorage>", True),
}
BASE_OID = p64(7)       # written into base.fs before the server starts


def write_conf(tmp_path, extra: str = "") -> str:
    sections = "\n".join(s.format(tmp=tmp_path) for s, _ in STORAGES.values())
    conf = tmp_path / "server.conf"
    conf.write_text("<zeotwist>\n  listen %s\n  address-file %s\n%s</zeotwist>\n%s\n"
                    % (LOOPBACK, tmp_path / "zeotwist.address", extra, sections))
    return str(conf)


def plant_base(tmp_path, marker) -> None:
    """A FileStorage transaction whose extension calls exec, as some earlier
    writer of the base file could have left it."""
    fs = FileStorage(str(tmp_path / "base.fs"))
    meta = TransactionMetaData(b"", b"planted", exec_pickle(marker_code(marker)))
    fs.tpc_begin(meta)
    fs.store(BASE_OID, z64, record({"base": 1}), "", meta)
    fs.tpc_vote(meta)
    fs.tpc_finish(meta)
    fs.close()


def commit(c: RawClient, oid, serial, data, extension=b"") -> dict:
    """TpcBegin, one StoreData, Vote, and Finish if the vote went through."""
    c.send(C.TpcBegin, user=b"u", description=b"d", extension=extension)
    c.send(C.StoreData, data=encode_store(oid, serial, data))
    voted = c.ask(C.Vote)
    if amp.ERROR in voted or voted.get(b"conflicts"):
        c.ask(C.Abort)
        return voted
    return c.ask(C.Finish)


def new_oid(c: RawClient) -> bytes:
    return C.NewOids.parseResponse(c.ask(C.NewOids, count=1), None)["oids"][0]


@pytest.mark.parametrize("options", ["", "  client-conflict-resolution true\n"])
def test_no_payload_runs_on_any_storage(tmp_path, options):
    base_marker = tmp_path / "marker-base"
    plant_base(tmp_path, base_marker)
    conf = write_conf(tmp_path, options)
    server = start_twistd(str(tmp_path / "fs.fs"), directory=str(tmp_path),
                          env=child_env(), server_command=["zeotwist", "--config", conf])
    markers = [base_marker]
    try:
        for name, (_, reads) in STORAGES.items():
            c = RawClient(server.address)
            c.register(name)
            ext_marker, stale_marker = tmp_path / ("ext-" + name), tmp_path / ("stale-" + name)
            markers += [ext_marker, stale_marker]
            evil_ext = exec_pickle(marker_code(ext_marker))

            # 1. the extension: refused at vote where the storage would unpickle
            # it, kept as opaque bytes where it would not
            oid = new_oid(c)
            answer = commit(c, oid, z64, record({"v": 1}), extension=evil_ext)
            if reads:
                assert answer.get(amp.ERROR_CODE) == b"STORAGE", (name, answer)
                assert b"builtins.exec" in answer[amp.ERROR_DESCRIPTION]
            else:
                assert amp.ANSWER in answer and b"tid" in answer, (name, answer)
            h = c.ask(C.History, oid=oid, size=5)          # FileStorage's history unpickles
            c.ask(C.UndoLog, first=0, last=20)              # ... and so does its undoLog

            # 2. a record with a stale serial, whose class pickle calls exec
            oid = new_oid(c)
            tid1 = commit(c, oid, z64, record({"v": 1}),
                          extension=pickle.dumps({"who": "me"}, 3))[b"tid"]
            commit(c, oid, tid1, record({"v": 2}))
            stale = commit(c, oid, tid1, exec_pickle(marker_code(stale_marker)) + b"N.")
            assert stale.get(b"conflicts", b"")[:8] == oid or amp.ERROR in stale, (name, stale)

            # 3. the storage is still usable, its history intact
            fresh = new_oid(c)
            assert b"tid" in commit(c, fresh, z64, record({"ok": 1}),
                                    extension=pickle.dumps({"note": "fine"}, 3)), name
            h = C.History.parseResponse(c.ask(C.History, oid=oid, size=5), None)["entries"]
            assert [pickle.loads(e["extension"]) for e in h if e["extension"]][-1:] \
                == [{"who": "me"}], (name, h)
            if name == "demofs":
                c.ask(C.History, oid=BASE_OID, size=5)      # the planted extension
            c.close()
        for marker in markers:
            assert not marker.exists(), "%s ran: %s" % (marker.name, server.log()[-3000:])
    finally:
        server.stop()


def test_an_unaudited_storage_is_refused_at_start_up(tmp_path):
    conf = tmp_path / "server.conf"
    conf.write_text(textwrap.dedent("""\
        <zeotwist>
          listen %s
          address-file %s
        </zeotwist>
        <zeoclient elsewhere>
          server 127.0.0.1:9
          wait false
        </zeoclient>
        """ % (LOOPBACK, tmp_path / "zeotwist.address")))
    with pytest.raises(RuntimeError) as e:
        start_twistd(str(tmp_path / "x.fs"), directory=str(tmp_path), env=child_env(),
                     server_command=["zeotwist", "--config", str(conf)], timeout=60)
    text = str(e.value)
    assert "exit status 1" in text
    assert "ZEO.ClientStorage.ClientStorage is not audited" in text
    assert "allow-unaudited-storage" in text


def test_audit_walks_the_wrappers_and_the_opt_in_is_explicit(tmp_path):
    from ZODB.DemoStorage import DemoStorage
    from ZODB.MappingStorage import MappingStorage
    from ZODB.blob import BlobStorage

    class Homemade(MappingStorage):
        pass

    fs = FileStorage(str(tmp_path / "a.fs"))
    wrapped = BlobStorage(str(tmp_path / "blobs"), fs)
    assert unaudited(wrapped) == [] and not reads_extension(wrapped)
    assert reads_extension(DemoStorage()) and unaudited(DemoStorage()) == []
    odd = DemoStorage(base=Homemade())
    assert unaudited(odd) == ["%s.%s" % (__name__, Homemade.__qualname__)]
    with pytest.raises(UnauditedStorage):
        check_audited("odd", odd, allowed=False)
    check_audited("odd", odd, allowed=True)            # the operator opted in
    wrapped.close()
