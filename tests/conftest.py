"""Shared fixtures.

How reactor tests and threaded-client tests share one pytest run
(docs/testing.md): pytest-twisted runs the *global* reactor in a greenlet on
the main thread, so test bodies run "inside" it and must never block.  Every
test that uses the blocking ClientStorage therefore runs the server and its
clients on zeotwist's private background reactor (its own daemon thread),
passing ``reactor=background_reactor()`` explicitly; reactor-style tests use
pytest-twisted's global reactor and Deferreds.  Multi-process tests run the
real ``twistd zeotwist`` in subprocesses.

Every test fails when an error is logged while it runs (a Failure logged
through ``twisted.logger`` or ``twisted.python.log.err``, an unhandled
error in a Deferred), as Twisted's trial does: see
:func:`fail_on_logged_errors`.  A test that provokes such a log line on
purpose says so with ``@pytest.mark.logs_errors("why")``.
"""
import gc
import os

import pytest
from twisted.logger import globalLogPublisher

from zeotwist import ClientStorage
from zeotwist.client.reactorthread import background_reactor
from zeotwist.testing import start_server


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "logs_errors(reason): the test logs an error on purpose; "
                   "fail_on_logged_errors lets it pass")


_FORCE_GC = os.environ.get("ZEOTWIST_TEST_FORCE_GC") == "1"


def _logged_error(event: dict) -> bool:
    return event.get("log_failure") is not None or bool(event.get("isError"))


@pytest.fixture(autouse=True)
def fail_on_logged_errors(request):
    """Fail the test if an error was logged while it ran (trial's rule).

    A Deferred reports an unhandled failure when it is freed: at once when
    nothing refers to it, or at the next garbage collection when it sits in
    a reference cycle.  Like trial, the collector is forced only on request
    (``ZEOTWIST_TEST_FORCE_GC=1``, trial's ``--force-gc``; ~0.1 s a test).
    Errors logged from any thread (the private reactor's too) count.
    """
    errors = []

    def observe(event):
        if _logged_error(event):
            errors.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield errors
        if _FORCE_GC:
            gc.collect()
    finally:
        globalLogPublisher.removeObserver(observe)
    if errors and request.node.get_closest_marker("logs_errors") is None:
        from twisted.logger import formatEvent
        lines = []
        for event in errors[:5]:
            failure = event.get("log_failure") or event.get("failure")
            lines.append("%s\n%s" % (formatEvent(event),
                                     failure.getTraceback() if failure is not None else ""))
        pytest.fail("%d error(s) logged during the test (mark it "
                    "@pytest.mark.logs_errors(reason) if that is intended):\n%s"
                    % (len(errors), "\n".join(lines)), pytrace=False)


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
