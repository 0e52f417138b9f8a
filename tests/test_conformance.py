"""ZODB's storage conformance mixins, run against a live zeotwist server.

Each class combines ``StorageTestBase`` with one of ZODB's test mixins, the
way ZEO's own suite checks its ClientStorage: a real zeotwist server on
127.0.0.1 serving a FileStorage in a temp dir, and a blocking
:class:`~zeotwist.ClientStorage` connected to it.  Server and clients run on
the private background reactor (see ``tests/conftest.py`` for why: under
pytest-twisted the test body must not block the global reactor).

ZODB 6 names its mixin tests ``test*``, but a few are still ``check*`` (ZEO
loads both prefixes); :func:`_collect_check_methods` gives those a ``test_``
alias so pytest runs them too.

Tests of features zeotwist does not have yet would be skipped explicitly
with ``_missing``, naming the feature; none is skipped now (history, undo,
pack, iteration and restore: tests/test_storage_api.py).  ZODB's
racetest checks (from BasicStorage) all run, including the one ZODB marks as
a long test; the whole file takes about 10 s.
"""
import os
import shutil
import tempfile
import unittest

from ZODB.tests import (
    BasicStorage, ConflictResolution, MTStorage, PersistentStorage, ReadOnlyStorage,
    RevisionStorage, StorageTestBase, Synchronization)

from zeotwist import ClientStorage
from zeotwist.client.reactorthread import background_reactor
from zeotwist.testing import start_server


def _collect_check_methods(cls):
    """Alias every ``check*`` test method of ``cls`` as ``test_check*``."""
    for name in dir(cls):
        if name.startswith("check") and callable(getattr(cls, name)):
            alias = "test_" + name
            if not hasattr(cls, alias):
                setattr(cls, alias, getattr(cls, name))
    return cls


def _missing(feature):
    """A test override that skips: zeotwist does not have ``feature`` yet."""
    def skipped(self):
        self.skipTest("zeotwist ClientStorage does not support %s yet" % feature)
    skipped.__doc__ = "Skipped: needs %s." % feature
    return skipped


class ZeotwistStorageTestBase(StorageTestBase.StorageTestBase):
    """A live zeotwist server per test and ``self._storage``, a client of it."""

    wait_timeout = 10
    #: extra options of the server (start_server's keywords)
    server_options: dict = {}

    def setUp(self):
        super().setUp()
        # Cleanups run after tearDown (which closes self._storage), last
        # registered first, and also when setUp fails half way.
        tmp = tempfile.mkdtemp(prefix="zeotwist-conformance-")
        self.addCleanup(shutil.rmtree, tmp, True)
        self._server = start_server(os.path.join(tmp, "data.fs"), reactor=background_reactor(),
                                    conflict_classes=["ZODB.tests.ConflictResolution.*"],
                                    **self.server_options)
        self.addCleanup(self._server.stop)
        self._clients = []
        self.addCleanup(self._close_clients)
        self._storage = self._client()

    def _close_clients(self):
        for client in self._clients:
            client.close()       # closing twice is harmless

    def _client(self, **kw) -> ClientStorage:
        kw.setdefault("reactor", background_reactor())
        kw.setdefault("wait_timeout", self.wait_timeout)
        client = ClientStorage(self._server.address, **kw)
        self._clients.append(client)
        return client

    # -- what the mixins ask of a client-server storage -------------------------
    def _new_storage_client(self):
        """A second client of the same server (ZODB's racetest)."""
        return self._client()

    def open(self, read_only=False):
        """Reopen ``self._storage`` (PersistentStorage, ReadOnlyStorage)."""
        if self._storage is not None:
            self._storage.close()
        self._storage = self._client(read_only=read_only)


@_collect_check_methods
class BasicStorageTests(ZeotwistStorageTestBase, BasicStorage.BasicStorage):
    pass


@_collect_check_methods
class SynchronizationTests(ZeotwistStorageTestBase, Synchronization.SynchronizedStorage):
    pass


@_collect_check_methods
class MTStorageTests(ZeotwistStorageTestBase, MTStorage.MTStorage):
    pass


@_collect_check_methods
class RevisionStorageTests(ZeotwistStorageTestBase, RevisionStorage.RevisionStorage):
    pass


@_collect_check_methods
class ConflictResolutionTests(ZeotwistStorageTestBase,
                              ConflictResolution.ConflictResolvingStorage):
    pass


@_collect_check_methods
class ClientSideConflictResolutionTests(ZeotwistStorageTestBase,
                                        ConflictResolution.ConflictResolvingStorage):
    """The same tests against a server that leaves every conflict to its clients."""

    server_options = dict(client_conflict_resolution=True)

    def test_resolution_happened_on_the_client(self):
        self.checkResolve()
        stats = self._server.server.stats
        assert stats["client_resolutions"] == 1 and stats["conflicts"] == 0


@_collect_check_methods
class PersistentStorageTests(ZeotwistStorageTestBase, PersistentStorage.PersistentStorage):
    pass


@_collect_check_methods
class ReadOnlyStorageTests(ZeotwistStorageTestBase, ReadOnlyStorage.ReadOnlyStorage):
    pass


CONFORMANCE_CLASSES = [
    BasicStorageTests, SynchronizationTests, MTStorageTests, RevisionStorageTests,
    ConflictResolutionTests, ClientSideConflictResolutionTests, PersistentStorageTests,
    ReadOnlyStorageTests]


def test_every_mixin_test_is_collected():
    """pytest loads ``test*`` names only; every ``check*`` test has a ``test_`` alias."""
    tests, checks = unittest.TestLoader(), unittest.TestLoader()
    checks.testMethodPrefix = "check"
    for cls in CONFORMANCE_CLASSES:
        collected = set(tests.getTestCaseNames(cls))
        assert collected, cls
        for name in checks.getTestCaseNames(cls):
            assert "test_" + name in collected, (cls, name)
    assert "test_checkResolve" in set(tests.getTestCaseNames(ConflictResolutionTests))
