"""The autouse fixture in tests/conftest.py fails a test that logs an error
(twisted.logger failure, log.err, an unhandled error in a Deferred), as
trial does, unless the test is marked ``logs_errors``."""
import pathlib

pytest_plugins = ["pytester"]

CONFTEST = (pathlib.Path(__file__).parent / "conftest.py").read_text()

INNER = '''
import pytest
from twisted.internet.defer import fail
from twisted.logger import Logger
from twisted.python import log

def test_clean():
    Logger().info("nothing wrong")

def test_logger_failure():
    try:
        1 / 0
    except ZeroDivisionError:
        Logger().failure("oops")

def test_legacy_log_err():
    log.err(ValueError("legacy"), "legacy error")

def test_unhandled_error_in_deferred():
    fail(KeyError("never handled"))

@pytest.mark.logs_errors("this test logs on purpose")
def test_marked():
    log.err(ValueError("expected"), "logged on purpose")
'''


def test_logged_errors_fail_the_test(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    # the three offending tests pass their body and error in teardown
    result.assert_outcomes(passed=5, errors=3)
    out = result.stdout.str()
    for name in ("test_logger_failure", "test_legacy_log_err",
                 "test_unhandled_error_in_deferred"):
        assert "ERROR test_inner.py::%s" % name in out
    assert "error(s) logged during the test" in out
    assert "ZeroDivisionError" in out and "never handled" in out
