"""Server resource limits (pure logic)."""
import resource

from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from zeotwist.server.limits import (
    FD_RESERVE, ConnectionLimiter, RateLimitedLog, effective_connection_cap, pending_output)


def capture():
    events = []
    globalLogPublisher.addObserver(events.append)
    return events, lambda: globalLogPublisher.removeObserver(events.append)


def test_rate_limited_log_swallows_repeats_and_counts_them():
    clock = Clock()
    log = RateLimitedLog(clock, interval=10)
    events, stop = capture()
    try:
        assert log.warn("boom {n}", n=1)
        for i in range(500):
            assert not log.warn("boom {n}", n=i)
        clock.advance(10)
        assert log.warn("boom {n}", n=2)
    finally:
        stop()
    mine = [e for e in events if "boom" in e.get("log_format", "")]
    assert len(mine) == 2 and mine[1]["suppressed"] == 500


def test_connection_limiter_caps_and_releases():
    limiter = ConnectionLimiter(Clock(), max_connections=3)
    assert [limiter.admit(i) for i in range(5)] == [True, True, True, False, False]
    assert limiter.refused == 2
    limiter.release()
    assert limiter.admit("again")


def test_cap_stays_below_the_fd_limit():
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    cap = effective_connection_cap(10**9)
    assert cap <= max(1, soft - FD_RESERVE) or soft == resource.RLIM_INFINITY


def test_pending_output_reads_the_transport_buffers():
    class T:
        _tempDataLen = 100
        dataBuffer = b"x" * 50
        offset = 20
    assert pending_output(T()) == 130
    assert pending_output(object()) == 0
