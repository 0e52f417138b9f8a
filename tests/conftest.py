"""Shared fixtures.

How reactor tests and threaded-client tests share one pytest run
(docs/testing.md): pytest-twisted runs the *global* reactor in a greenlet on
the main thread, so test bodies run "inside" it and must never block.  Every
test that uses the blocking ClientStorage therefore runs the server and its
clients on zeotwist's private background reactor (its own daemon thread),
passing ``reactor=background_reactor()`` explicitly; reactor-style tests use
pytest-twisted's global reactor and Deferreds.  Multi-process tests run the
real ``twistd zeotwist`` in subprocesses.
"""
import pytest

from zeotwist import ClientStorage
from zeotwist.client.reactorthread import background_reactor
from zeotwist.testing import start_server


@pytest.fixture
def server(tmp_path):
    """A live zeotwist server on 127.0.0.1 serving a FileStorage in tmp_path."""
    srv = start_server(str(tmp_path / "data.fs"))
    yield srv
    srv.stop()


@pytest.fixture
def make_client(server):
    """Factory for blocking ClientStorages connected to ``server``."""
    made = []

    def make(**kw):
        kw.setdefault("reactor", background_reactor())
        kw.setdefault("wait_timeout", 10)
        cs = ClientStorage(server.address, **kw)
        made.append(cs)
        return cs

    yield make
    for cs in made:
        cs.close()
