"""zeotwist's exceptions live in zeotwist/errors.py (re-exported where they
were public before), and programming errors are typed."""
import importlib
import pkgutil

import pytest

import zeotwist
from zeotwist import errors

#: defined elsewhere, and why (a new exception goes in errors.py, or here with a reason)
NOT_YET_MOVED = {
    "zeotwist.pgtesting.PostgresUnavailable": "a test helper's skip reason",
    "zeotwist.server.loginguard.LoginThrottled":
        "a twisted.cred UnauthorizedLogin passed inside the server's login path; "
        "clients see Unauthorized",
}


def our_modules():
    for info in pkgutil.walk_packages(zeotwist.__path__, "zeotwist."):
        if not info.name.startswith("zeotwist.bench"):
            yield importlib.import_module(info.name)


def test_every_public_exception_is_defined_in_errors():
    strays = set()
    for module in our_modules():
        for name, value in vars(module).items():
            if (isinstance(value, type) and issubclass(value, BaseException)
                    and value.__module__ == module.__name__ and not name.startswith("_")
                    and module is not errors):
                strays.add("%s.%s" % (module.__name__, name))
    assert strays == set(NOT_YET_MOVED)


@pytest.mark.parametrize("old_home,name", [
    ("zeotwist.tls", "TLSConfigError"),
    ("zeotwist.client.blobcache", "BlobCacheLocked"),
    ("zeotwist.server.conflicts", "RefusedGlobal"),
    ("zeotwist.server.service", "StorageOpenError"),
    ("zeotwist.server.config", "ConfigError"),
])
def test_moved_exceptions_are_still_importable_from_their_old_home(old_home, name):
    assert getattr(importlib.import_module(old_home), name) is getattr(errors, name)
    assert name in errors.__all__


def test_every_name_in_all_exists():
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), BaseException), name


def test_programming_errors_are_typed_and_keep_their_old_base():
    from zeotwist.client.cachefile import CacheFile
    from zeotwist.server.commitlock import CommitLock
    from zeotwist.tls import client_creator
    from zeotwist.wire.records import encode_store
    with pytest.raises(errors.UsageError, match="oid must be 8 bytes"):
        encode_store("not bytes", b"\0" * 8, b"")
    with pytest.raises(TypeError, match="unknown tls settings"):
        client_creator({"bogus": 1}, "example.com")
    with pytest.raises(errors.WrongStateError, match="not open"):
        CacheFile("/nonexistent/x.ztc").load()
    from twisted.internet.task import Clock
    lock = CommitLock(Clock())
    lock.acquire("a")
    with pytest.raises(errors.WrongStateError, match="already holds"):
        lock.acquire("a")


def test_transaction_timeout_is_a_storage_transaction_error_and_still_a_disconnect():
    from ZODB.POSException import StorageTransactionError
    from transaction.interfaces import TransientError
    import pickle
    err = errors.TransactionTimeout(2.5, "127.0.0.1:8100")
    assert isinstance(err, StorageTransactionError)
    assert isinstance(err, errors.ClientDisconnected) and isinstance(err, TransientError)
    assert err.timeout == 2.5 and "transaction timeout" in str(err) and "2.5 s" in str(err)
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.timeout, copy.server, str(copy)) == (2.5, "127.0.0.1:8100", str(err))
    assert "TransactionTimeout" in errors.__all__


def test_server_service_argument_mistakes_are_usage_errors_and_still_type_errors(tmp_path):
    from zeotwist.server.openstorages import open_storage
    from zeotwist.server.service import ServerService
    path = str(tmp_path / "data.fs")
    cases = [
        (lambda: ServerService(), "needs a filename or storages"),
        (lambda: ServerService(path, storages={"1": path}), "a filename or storages, not both"),
        (lambda: ServerService(storages={"1": path}, blob_dir=str(tmp_path)),
         "blob_dir is the filename storage's"),
        (lambda: open_storage(42), "cannot make a storage of 42"),
    ]
    for make, message in cases:
        with pytest.raises(errors.UsageError, match=message) as info:
            make()
        assert isinstance(info.value, TypeError)


def test_server_configuration_mistakes_are_config_errors_and_still_value_errors(tmp_path):
    from ZODB.POSException import StorageError
    from zeotwist.server.config import read_config
    from zeotwist.server.service import ServerService
    with pytest.raises(errors.ConfigError, match="needs at least one storage") as info:
        ServerService.from_storages({})
    assert isinstance(info.value, ValueError) and isinstance(info.value, StorageError)
    with pytest.raises(errors.ConfigError, match="--listen-tls needs --tls-cert"):
        ServerService(str(tmp_path / "data.fs"), listen_tls=["ssl:0"])
    (tmp_path / "bad.conf").write_text("<zeo>\n  no-such-key 1\n</zeo>\n")
    with pytest.raises(errors.ConfigError, match="no-such-key"):
        read_config(str(tmp_path / "bad.conf"))


def test_an_unsupported_imvcc_storage_is_refused_with_a_typed_error():
    from ZODB.interfaces import IMVCCStorage
    from zope.interface import directlyProvides
    from zeotwist.server.external import served_storage

    class NotRelStorage:
        pass
    storage = NotRelStorage()
    directlyProvides(storage, IMVCCStorage)
    with pytest.raises(errors.UnsupportedStorage, match="serves RelStorage among the IMVCC") \
            as info:
        served_storage(storage)
    assert isinstance(info.value, TypeError)
