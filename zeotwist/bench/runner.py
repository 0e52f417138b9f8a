"""Run the benchmark: populate once, then interleaved rounds per system.

One FileStorage is populated here, then copied for every server run, so both
systems serve byte-identical data.  A round, for each system in turn (the
order alternates between rounds), starts that system's server on a fresh
copy, runs one fresh client process per selected case against it (the
hotset case with a writer process beside it), and stops it, in a
``finally``.  The ``pack`` case has a database of its own
(:func:`zeotwist.bench.packing.build`, also written once and copied): a
second server is started on a fresh copy of it after the first has stopped.
Rates are ``count / seconds`` as timed inside the client process (the pack
case reports its seconds); :mod:`zeotwist.bench.report` prints per-system
medians over the rounds and ratios of those medians, with the spread of the
per-round ratios.  The ``blobs`` case is not part of the rounds: it runs
``python -m zeotwist.bench.blobs`` once, after them, and prints its table.
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

from zeotwist.bench.packing import build
from zeotwist.bench.report import TIMED, label, summary
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
    ("pack", "pack", "s (lower is better)"),
)
#: The round cases, then ``blobs`` (run once, after the rounds).
CASE_NAMES = tuple(c for c, _, _ in CASES) + ("blobs",)
#: The cases that read or write the populated database (not ``pack``'s own).
POPULATED_CASES = ("cold", "pipelined", "warm", "hotset", "commits")
#: Seconds one client process may run.
CLIENT_TIMEOUT = 900.0
#: Seconds the blob bench may run.
BLOBS_TIMEOUT = 3600.0
#: ``python -m zeotwist.bench.blobs`` options of a ``--quick`` run.
QUICK_BLOBS = ("--large-mb", "2", "--large-count", "2", "--small-count", "100",
               "--repeat", "1")
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
    pack_objects: int = 100_000  # pack: Items in the pack case's database
    cases: tuple = field(default=CASE_NAMES)
    quick: bool = False         # blobs: a small run
    pack_built: dict = None     # set by run(): what packing.build() wrote

    @property
    def hot_cache_size(self) -> int:
        return self.objects * HOTSET_CACHE_PER_OBJECT


def run(settings: Settings, systems=SYSTEMS, out=None) -> dict:
    """Run every round; print progress and the summary to ``out``; return
    ``{(system, case): [result per round]}``, a result being the client's
    ``{"count", "seconds", "extra"}`` plus ``"rate"`` (for ``pack`` also
    ``"size_before"`` and ``"size_after"``, the file's bytes)."""
    out = out or sys.stdout
    say = lambda *a: print(*a, file=out, flush=True)  # noqa: E731
    cases = [c for c in CASES if c[0] in settings.cases]
    say(header(settings))
    tmp = tempfile.mkdtemp(prefix="zeotwist-bench-")
    try:
        base = os.path.join(tmp, "base.fs")
        oidfile = os.path.join(tmp, "oids")
        with open(oidfile, "wb") as f:
            if any(c in settings.cases for c in POPULATED_CASES):
                f.write(b"".join(populate(base, settings.objects)))
        if "pack" in settings.cases:
            settings.pack_built = build(os.path.join(tmp, "pack.fs"), settings.pack_objects)
        results = {(s, c): [] for s in systems for c, _, _ in cases}
        for r in range(settings.rounds if cases else 0):
            order = systems if r % 2 == 0 else tuple(reversed(systems))
            for system in order:
                got = one_round(system, tmp, oidfile, settings,
                                os.path.join(tmp, "r%d" % r))
                for case, result in got.items():
                    results[system, case].append(result)
                say("round %d  %-10s %s" % (r + 1, label(system), "   ".join(
                    ("%s %.2fs" if c in TIMED else "%s %.0f") % (
                        c, got[c]["seconds" if c in TIMED else "rate"])
                    for c, _, _ in cases)))
        if cases:
            say()
            say(summary(results, systems, cases, settings))
        if "blobs" in settings.cases:
            say()
            say(blobs(settings, systems, tmp))
        if hasattr(os, "getloadavg"):
            say()
            say("load average at the end: %.2f %.2f %.2f (1, 5, 15 min)" % os.getloadavg())
        return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def blobs(settings: Settings, systems, tmp: str) -> str:
    """Run ``python -m zeotwist.bench.blobs`` (small with ``quick``); its table."""
    work = os.path.join(tmp, "blobs")
    os.makedirs(work)
    argv = [sys.executable, "-m", "zeotwist.bench.blobs", "--workdir", work,
            "--systems", ",".join(systems)] + list(QUICK_BLOBS if settings.quick else ())
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=BLOBS_TIMEOUT,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise BenchError("the blob bench ran over %g s" % BLOBS_TIMEOUT)
    if done.returncode != 0:
        raise BenchError("the blob bench failed (status %d):\n%s" % (
            done.returncode, done.stderr[-3000:]))
    return done.stdout.rstrip("\n")


def header(settings: Settings) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return ("zeotwist bench %s: %d objects, %d commits, %d pack objects, %d round(s), "
            "cases %s; Python %s on %s, %d CPU(s), load average %.2f" % (
                datetime.date.today().isoformat(), settings.objects, settings.commits,
                settings.pack_objects, settings.rounds, ",".join(settings.cases),
                platform.python_version(), platform.machine(), os.cpu_count() or 0, load))


def one_round(system: str, tmp: str, oidfile: str, settings: Settings,
              directory: str) -> dict:
    """Serve a fresh copy of the populated database with ``system`` and run
    each selected case once against it; then, for ``pack``, a fresh copy of
    the pack case's database with another server of ``system``."""
    os.makedirs(directory, exist_ok=True)
    params = {
        "cold": {},
        "pipelined": {"window": settings.window},
        "warm": {"passes": settings.passes},
        "hotset": {"reads": settings.hot_reads, "cache_size": settings.hot_cache_size},
        "commits": {"count": settings.commits},
    }
    got = {}
    if any(c in settings.cases for c in POPULATED_CASES):
        server = Server(system, fresh_copy(os.path.join(tmp, "base.fs"), directory,
                                           "%s.fs" % system))
        try:
            server.start()
            for case in POPULATED_CASES:
                if case not in settings.cases:
                    continue
                if case == "hotset":
                    got[case] = with_writer(server, oidfile, params[case],
                                            settings.writer_rate)
                else:
                    got[case] = client(server, case, oidfile, params[case])
        finally:
            server.stop()
    if "pack" in settings.cases:
        filename = fresh_copy(os.path.join(tmp, "pack.fs"), directory, "%s-pack.fs" % system)
        size = os.path.getsize(filename)
        server = Server(system, filename)
        try:
            server.start()
            got["pack"] = client(server, "pack", oidfile, {})
        finally:
            server.stop()
        got["pack"].update(size_before=size, size_after=os.path.getsize(filename))
    return got


def fresh_copy(base: str, directory: str, name: str) -> str:
    """Copy ``base`` (and its index) into ``directory`` as ``name``; the copy's path."""
    filename = os.path.join(directory, name)
    shutil.copyfile(base, filename)
    if os.path.exists(base + ".index"):
        shutil.copyfile(base + ".index", filename + ".index")
    return filename


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
