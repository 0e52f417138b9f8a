"""Run several client processes of one case side by side (the runner's side
of :mod:`zeotwist.bench.parallel`), and combine their results.

Every process is started, then each must report ready; then all get ``go``
at once, and when all report done, ``check``.  The combined result:
``count`` summed, ``seconds`` the longest process's (so ``rate`` is the
aggregate rate), p50/p99 and the longest (``max``) over every process's
latencies, the p99 over time (``p99_time``: each latency weighted by its
length, ``procstat.time_weighted``), conflicts summed,
the largest client peak RSS, and for the counter cases ``lost``: committed
increments that the counters do not show (must be 0).
"""
import json
import selectors
import subprocess
import tempfile

from zeotwist.bench.procstat import latencies, time_weighted

#: Seconds a process may take to report ready, done, and to exit after check.
STEP_TIMEOUT = 600.0


class GroupError(RuntimeError):
    """A client process of a group failed."""


def _line(proc, errors, what: str) -> dict:
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(STEP_TIMEOUT):
            raise GroupError("no %r line after %g s" % (what, STEP_TIMEOUT))
    line = proc.stdout.readline()
    try:
        message = json.loads(line)
    except ValueError:
        message = {}
    if not message.get(what):
        proc.wait(STEP_TIMEOUT)
        errors.seek(0)
        raise GroupError("process failed before %r (status %s):\n%s" % (
            what, proc.returncode, errors.read()[-3000:]))
    return message


def _tell(procs, word: str) -> None:
    for proc in procs:
        proc.stdin.write(word + "\n")
        proc.stdin.flush()


def run_group(argvs: list) -> dict:
    """Run one process per argv through ready/go/done/check; the combined result."""
    procs, errors = [], []
    try:
        for argv in argvs:
            errors.append(tempfile.TemporaryFile(mode="w+"))
            procs.append(subprocess.Popen(argv, text=True, stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=errors[-1]))
        for step in ("ready", "done"):
            for proc, err in zip(procs, errors):
                _line(proc, err, step)
            if step == "ready":
                _tell(procs, "go")
        _tell(procs, "check")
        results = []
        for proc, err in zip(procs, errors):
            out, _ = proc.communicate(timeout=STEP_TIMEOUT)
            if proc.returncode != 0:
                err.seek(0)
                raise GroupError("process failed (status %d):\n%s" % (
                    proc.returncode, err.read()[-3000:]))
            results.append(json.loads(out.strip().splitlines()[-1]))
        return combine(results)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for err in errors:
            err.close()


def combine(results: list) -> dict:
    """One result from the processes' results (see the module docstring)."""
    extras = [r["extra"] for r in results]
    samples = [s for e in extras for s in e.get("samples", ())]
    extra = dict(latencies(samples), processes=len(results),
                 max=max(samples) * 1e3 if samples else None,
                 p99_time=time_weighted(samples, 0.99) * 1e3 if samples else None,
                 conflicts=sum(e.get("conflicts", 0) for e in extras),
                 errors=sum(e.get("errors", 0) for e in extras),
                 rss_mb=max((e.get("rss_mb") or 0.0) for e in extras))
    resolutions = [e["resolutions"] for e in extras if e.get("resolutions") is not None]
    if resolutions:           # the server's count, read by each process at the end
        extra["resolutions"] = max(resolutions)
    if extras and "final" in extras[0]:
        extra["lost"] = lost_updates(results)
    return {"count": sum(r["count"] for r in results),
            "seconds": max(r["seconds"] for r in results), "extra": extra}


def lost_updates(results: list) -> int:
    """How far the counters are from the committed increments (0 unless
    updates were lost or invented): per process for distinct counters; for
    the shared one, the worst of what each process read after ``check``."""
    extras = [r["extra"] for r in results]
    if extras[0]["shared"]:
        expected = extras[0]["initial"] + sum(r["count"] for r in results)
        return max(abs(expected - e["final"]) for e in extras)
    return sum(abs(e["initial"] + r["count"] - e["final"]) for r, e in zip(results, extras))
