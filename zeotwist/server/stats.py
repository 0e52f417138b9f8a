"""Counters the server keeps for operators (``zeotwist status``, ``--metrics``).

:class:`Timings` is a fixed-bucket histogram of durations (commit-lock
waits and holds), cheap enough to update on every commit; the Prometheus
exporter (:mod:`zeotwist.server.metrics`) reads it at scrape time.  Pure
data, updated and read on the reactor thread.
"""
import bisect

#: upper bounds in seconds: 1 ms .. 60 s (+Inf is implied)
DEFAULT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0, 60.0)


class Timings:
    """How many durations fell at or below each bucket bound, and their sum."""

    def __init__(self, buckets=DEFAULT_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)     # the last: above every bound
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list:
        """``[(bound, count at or below it)]``, ending with ``("+Inf", count)``."""
        out, total = [], 0
        for bound, n in zip(self.buckets + (float("inf"),), self.counts):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return out


def traffic_counters() -> dict:
    """The per-storage event counters that ``Info`` does not carry."""
    return dict(invalidations=0, bytes_in=0, bytes_out=0, transaction_timeouts=0,
                protocol_violations=0, prefetched=0)
