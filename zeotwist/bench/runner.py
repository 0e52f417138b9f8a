"""Run the benchmark: populate once, then interleaved rounds per system.

One FileStorage is populated here, then copied for every server run, so both
systems serve byte-identical data.  A round, for each system in turn (the
order alternates between rounds), starts that system's server on a fresh
copy, runs one fresh client process per case against it, and stops it, in a
``finally``.  Rates are ``count / seconds`` as timed inside the client
process; the summary shows per-system medians over the rounds and the ratio
zeotwist/ZEO of those medians, with the spread of the per-round ratios.
"""
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from importlib import metadata

from zeotwist.bench.servers import Server, ServerError
from zeotwist.bench.workload import populate

SYSTEMS = ("zeotwist", "zeo")
#: (case, label, unit); the case name is the workload's.
CASES = (("cold", "cold reads", "loads/s"), ("commits", "small commits", "commits/s"))
#: Seconds one client process may run.
CLIENT_TIMEOUT = 900.0


class BenchError(RuntimeError):
    """A client process failed."""


def label(system: str) -> str:
    if system == "zeo":
        try:
            return "ZEO " + metadata.version("ZEO")
        except metadata.PackageNotFoundError:
            return "ZEO"
    return "zeotwist"


def run(objects: int, commits: int, rounds: int, systems=SYSTEMS, out=None) -> dict:
    """Run every round; print progress and the summary to ``out``; return
    ``{(system, case): [rate per round]}``."""
    out = out or sys.stdout
    say = lambda *a: print(*a, file=out, flush=True)  # noqa: E731
    say(header(objects, commits, rounds))
    tmp = tempfile.mkdtemp(prefix="zeotwist-bench-")
    try:
        base = os.path.join(tmp, "base.fs")
        oidfile = os.path.join(tmp, "oids")
        with open(oidfile, "wb") as f:
            f.write(b"".join(populate(base, objects)))
        rates = {(s, c): [] for s in systems for c, _, _ in CASES}
        for r in range(rounds):
            order = systems if r % 2 == 0 else tuple(reversed(systems))
            for system in order:
                got = one_round(system, base, oidfile, commits, os.path.join(tmp, "r%d" % r))
                for case, rate in got.items():
                    rates[system, case].append(rate)
                say("round %d  %-10s %s" % (r + 1, label(system), "   ".join(
                    "%s %.0f %s" % (lbl, got[c], unit) for c, lbl, unit in CASES)))
        say()
        say(summary(rates, systems))
        return rates
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def header(objects: int, commits: int, rounds: int) -> str:
    return ("zeotwist bench %s: %d objects, %d commits, %d round(s); Python %s on %s, "
            "%d CPU(s)" % (
                datetime.date.today().isoformat(), objects, commits, rounds,
                platform.python_version(), platform.machine(), os.cpu_count() or 0))


def one_round(system: str, base: str, oidfile: str, commits: int, directory: str) -> dict:
    """Serve a fresh copy of ``base`` with ``system``; run each case once."""
    os.makedirs(directory, exist_ok=True)
    filename = os.path.join(directory, "%s.fs" % system)
    shutil.copyfile(base, filename)
    if os.path.exists(base + ".index"):
        shutil.copyfile(base + ".index", filename + ".index")
    server = Server(system, filename)
    try:
        server.start()
        return {
            "cold": client(server, "cold", oidfile),
            "commits": client(server, "commits", oidfile, commits),
        }
    finally:
        server.stop()


def client(server: Server, case: str, oidfile: str, count: int = 0) -> float:
    """Run one workload in a fresh process; its rate in operations/s."""
    argv = [sys.executable, "-m", "zeotwist.bench.workload", case, server.system,
            server.address, oidfile, str(count)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=CLIENT_TIMEOUT,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise BenchError("%s %s client ran over %g s" % (server.system, case, CLIENT_TIMEOUT))
    if done.returncode != 0:
        server.check()
        raise BenchError("%s %s client failed (status %d):\n%s" % (
            server.system, case, done.returncode, done.stderr[-3000:]))
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["count"] / result["seconds"]


def summary(rates: dict, systems=SYSTEMS) -> str:
    """The medians table (ratio columns only when both systems ran)."""
    both = set(SYSTEMS) <= set(systems)
    cols = ["%-14s" % "case"] + ["%14s" % label(s) for s in SYSTEMS]
    cols += ["%14s" % "zeotwist/ZEO", "  per-round ratios"] if both else []
    lines = ["".join(cols) + "    (medians)"]
    for case, lbl, unit in CASES:
        row = ["%-14s" % lbl]
        for s in SYSTEMS:
            row.append("%14.0f" % statistics.median(rates[s, case]) if s in systems
                       else "%14s" % "-")
        if both:
            zt, zeo = rates["zeotwist", case], rates["zeo", case]
            row.append("%14.2f" % (statistics.median(zt) / statistics.median(zeo)))
            per = sorted(a / b for a, b in zip(zt, zeo))
            row.append("  %.2f-%.2f" % (per[0], per[-1]))
        lines.append("".join(row) + "    " + unit)
    return "\n".join(lines)


__all__ = ["run", "summary", "BenchError", "ServerError", "SYSTEMS", "CASES"]
