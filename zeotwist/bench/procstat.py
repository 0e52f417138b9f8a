"""Process figures the bench reports: peak resident memory, CPU time, latency percentiles.

Linux ``/proc`` only; elsewhere the functions return None and the report
shows "-".  A server's peak is reset before each case (``clear_refs``), so
``VmHWM`` afterwards is that case's peak, not the process's since start.
Runs in the bench's processes (runner and clients), on whichever thread calls.
"""
import os
import resource

MB = 1024 * 1024


def _status_kb(pid: int, field: str):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak(pid: int) -> bool:
    """Restart ``pid``'s peak RSS count (``VmHWM``) from its current RSS."""
    try:
        with open("/proc/%d/clear_refs" % pid, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb(pid: int):
    """``pid``'s peak resident memory in MB since start or the last reset_peak."""
    kb = _status_kb(pid, "VmHWM")
    return None if kb is None else kb / 1024


def own_peak_rss_mb() -> float:
    """This process's peak resident memory in MB (``ru_maxrss`` is KB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds(pid: int):
    """User + system CPU seconds ``pid`` has used (all its threads), or None."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(sorted_samples: list, share: float):
    """The ``share`` (0-1) percentile of already-sorted samples, nearest rank."""
    if not sorted_samples:
        return None
    rank = min(len(sorted_samples) - 1, max(0, int(round(share * len(sorted_samples))) - 1))
    return sorted_samples[rank]


def time_weighted(samples: list, share: float):
    """The latency L such that the samples of at most L fill ``share`` (0-1)
    of the time all samples take together: each sample weighted by its own
    length.  A closed loop (the next request waits for the answer) counts a
    long wait once, though its process spent all that time in it; weighted
    so, the figure is the latency of the request in flight at a moment
    taken at random: the wait of a writer starved for seconds is not
    hidden by the many quick requests others made meanwhile."""
    s = sorted(samples)
    total, acc = sum(s), 0.0
    for x in s:
        acc += x
        if acc >= share * total:
            return x
    return s[-1] if s else None


def latencies(samples: list) -> dict:
    """``{"p50": ms, "p99": ms}`` of samples in seconds."""
    s = sorted(samples)
    p50, p99 = percentile(s, 0.50), percentile(s, 0.99)
    return {"p50": None if p50 is None else p50 * 1e3,
            "p99": None if p99 is None else p99 * 1e3}
