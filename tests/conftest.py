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


# -- PostgreSQL (scale-out tests: docs/scale-out.md) ------------------------------

@pytest.fixture(scope="session")
def pg_cluster():
    """One throw-away PostgreSQL cluster for the whole session (initdb on a
    free loopback port, as the postgres user when we are root).  Skipped
    where PostgreSQL or RelStorage is missing, except under CI, where that
    is a failure: CI must run these tests."""
    import os
    from zeotwist.pgtesting import PostgresCluster, PostgresUnavailable
    try:
        import psycopg2  # noqa: F401
        import relstorage  # noqa: F401
        cluster = PostgresCluster().start()
    except (ImportError, PostgresUnavailable) as e:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI must run the PostgreSQL tests: %s" % e)
        pytest.skip("no PostgreSQL here: %s" % e)
    yield cluster
    cluster.stop()


@pytest.fixture
def pg_dsn(pg_cluster):
    """A DSN of a new, empty database in the session's cluster."""
    return pg_cluster.dsn(pg_cluster.create_database())


# -- slow tests: skipped unless asked for ----------------------------------------

def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true",
                     help="also run the tests marked slow (minutes each, e.g. the "
                          "50-kill crash test); ZEOTWIST_SLOW=1 does the same")


def pytest_collection_modifyitems(config, items):
    import os
    if config.getoption("--run-slow") or os.environ.get("ZEOTWIST_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow (or ZEOTWIST_SLOW=1)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
