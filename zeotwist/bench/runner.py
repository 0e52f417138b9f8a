"""Run the benchmark: populate once, then interleaved rounds per system.

One FileStorage is populated here, then copied for every server run, so both
systems serve byte-identical data.  A round, for each system in turn (the
order alternates between rounds), starts that system's server on a fresh
copy, runs one fresh client process per selected case against it (the
hotset case with a writer process beside it), and stops it, in a
``finally``.  Rates are ``count / seconds`` as timed inside the client
process; :mod:`zeotwist.bench.report` prints per-system medians over the
rounds and ratios of those medians, with the spread of the per-round ratios.
"""
import datetime
import json
import os
import platform
import selectors
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

from zeotwist.bench.report import label, summary
from zeotwist.bench.servers import Server, ServerError
from zeotwist.bench.workload import populate

SYSTEMS = ("zeotwist", "zeo")
#: (case, label, unit), in the order a round runs them; the case name is the
#: workload's.  Read cases come first, so they read the populated data.
CASES = (
    ("cold", "cold reads", "loads/s"),
    ("pipelined", "pipelined cold", "loads/s"),
    ("warm", "warm reads", "loads/s"),
    ("hotset", "hot-set mix", "ops/s"),
    ("commits", "small commits", "commits/s"),
)
CASE_NAMES = tuple(c for c, _, _ in CASES)
#: Seconds one client process may run.
CLIENT_TIMEOUT = 900.0
#: Seconds the writer may take to connect and report ready, and to exit.
WRITER_TIMEOUT = 120.0
#: Client cache bytes per populated object in the hotset case: with Items of
#: ~57 bytes, zeotwist's cache (120 bytes accounted per entry) holds about
#: 23 % of them and ZEO's (43) about 40 %: the 10 % hot set fits, the rest not.
HOTSET_CACHE_PER_OBJECT = 40


class BenchError(RuntimeError):
    """A client process failed."""


@dataclass
class Settings:
    objects: int = 10_000
    commits: int = 1000
    rounds: int = 3
    window: int = 64            # pipelined: loads outstanding (zeotwist)
    passes: int = 3             # warm: timed passes over all objects
    hot_reads: int = 50_000     # hotset: timed reads
    writer_rate: float = 50.0   # hotset: the writer's commits per second
    cases: tuple = field(default=CASE_NAMES)

    @property
    def hot_cache_size(self) -> int:
        return self.objects * HOTSET_CACHE_PER_OBJECT


def run(settings: Settings, systems=SYSTEMS, out=None) -> dict:
    """Run every round; print progress and the summary to ``out``; return
    ``{(system, case): [result per round]}``, a result being the client's
    ``{"count", "seconds", "extra"}`` plus ``"rate"``."""
    out = out or sys.stdout
    say = lambda *a: print(*a, file=out, flush=True)  # noqa: E731
    cases = [c for c in CASES if c[0] in settings.cases]
    say(header(settings))
    tmp = tempfile.mkdtemp(prefix="zeotwist-bench-")
    try:
        base = os.path.join(tmp, "base.fs")
        oidfile = os.path.join(tmp, "oids")
        with open(oidfile, "wb") as f:
            f.write(b"".join(populate(base, settings.objects)))
        results = {(s, c): [] for s in systems for c, _, _ in cases}
        for r in range(settings.rounds):
            order = systems if r % 2 == 0 else tuple(reversed(systems))
            for system in order:
                got = one_round(system, base, oidfile, settings,
                                os.path.join(tmp, "r%d" % r))
                for case, result in got.items():
                    results[system, case].append(result)
                say("round %d  %-10s %s" % (r + 1, label(system), "   ".join(
                    "%s %.0f" % (c, got[c]["rate"]) for c, _, _ in cases)))
        say()
        say(summary(results, systems, cases, settings))
        return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def header(settings: Settings) -> str:
    return ("zeotwist bench %s: %d objects, %d commits, %d round(s), cases %s; "
            "Python %s on %s, %d CPU(s)" % (
                datetime.date.today().isoformat(), settings.objects, settings.commits,
                settings.rounds, ",".join(settings.cases), platform.python_version(),
                platform.machine(), os.cpu_count() or 0))


def one_round(system: str, base: str, oidfile: str, settings: Settings,
              directory: str) -> dict:
    """Serve a fresh copy of ``base`` with ``system``; run each selected case once."""
    os.makedirs(directory, exist_ok=True)
    filename = os.path.join(directory, "%s.fs" % system)
    shutil.copyfile(base, filename)
    if os.path.exists(base + ".index"):
        shutil.copyfile(base + ".index", filename + ".index")
    params = {
        "cold": {},
        "pipelined": {"window": settings.window},
        "warm": {"passes": settings.passes},
        "hotset": {"reads": settings.hot_reads, "cache_size": settings.hot_cache_size},
        "commits": {"count": settings.commits},
    }
    server = Server(system, filename)
    try:
        server.start()
        got = {}
        for case in CASE_NAMES:
            if case not in settings.cases:
                continue
            if case == "hotset":
                got[case] = with_writer(server, oidfile, params[case], settings.writer_rate)
            else:
                got[case] = client(server, case, oidfile, params[case])
        return got
    finally:
        server.stop()


def argv_for(server: Server, case: str, oidfile: str, params: dict) -> list:
    return [sys.executable, "-m", "zeotwist.bench.workload", case, server.system,
            server.address, oidfile] + ["%s=%s" % kv for kv in sorted(params.items())]


def client(server: Server, case: str, oidfile: str, params: dict) -> dict:
    """Run one workload in a fresh process; its result, with ``rate`` in operations/s."""
    try:
        done = subprocess.run(argv_for(server, case, oidfile, params), capture_output=True,
                              text=True, timeout=CLIENT_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise BenchError("%s %s client ran over %g s" % (server.system, case, CLIENT_TIMEOUT))
    if done.returncode != 0:
        server.check()
        raise BenchError("%s %s client failed (status %d):\n%s" % (
            server.system, case, done.returncode, done.stderr[-3000:]))
    return parse_result(done.stdout)


def parse_result(stdout: str) -> dict:
    result = json.loads(stdout.strip().splitlines()[-1])
    result.setdefault("extra", {})
    result["rate"] = result["count"] / result["seconds"]
    return result


def with_writer(server: Server, oidfile: str, params: dict, rate: float) -> dict:
    """The hotset client, with a writer process committing ``rate`` times a
    second from before it starts until it has finished."""
    errors = tempfile.TemporaryFile(mode="w+")
    writer = subprocess.Popen(
        argv_for(server, "writer", oidfile, {"rate": float(rate)}), text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors)
    try:
        wait_ready(writer, errors, server)
        result = client(server, "hotset", oidfile, params)
        writer.stdin.close()
        try:
            writer.wait(WRITER_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise BenchError("%s writer did not stop within %g s" % (
                server.system, WRITER_TIMEOUT))
        if writer.returncode != 0:
            raise BenchError("%s writer failed (status %d):\n%s" % (
                server.system, writer.returncode, tail(errors)))
        wrote = parse_result(writer.stdout.read())
        result["extra"].update(writer_rate=wrote["rate"],
                               writer_conflicts=wrote["extra"]["conflicts"])
        return result
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        errors.close()


def wait_ready(writer, errors, server: Server) -> None:
    with selectors.DefaultSelector() as sel:
        sel.register(writer.stdout, selectors.EVENT_READ)
        if not sel.select(WRITER_TIMEOUT):
            raise BenchError("%s writer not ready after %g s" % (server.system, WRITER_TIMEOUT))
    line = writer.stdout.readline()
    if not line or not json.loads(line).get("ready"):
        server.check()
        writer.wait(WRITER_TIMEOUT)
        raise BenchError("%s writer failed (status %s):\n%s" % (
            server.system, writer.returncode, tail(errors)))


def tail(f, size: int = 3000) -> str:
    f.seek(0)
    return f.read()[-size:]


__all__ = ["run", "Settings", "BenchError", "ServerError", "SYSTEMS", "CASES", "CASE_NAMES"]
