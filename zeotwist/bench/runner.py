"""Run the benchmark: populate once, then interleaved rounds per system.

One FileStorage is populated here, then copied for every server run, so both
systems serve byte-identical data.  A round, for each system in turn (the
order alternates between rounds), starts that system's server on a fresh
copy, runs one fresh client process per selected case against it
(:mod:`zeotwist.bench.clients`; the hotset case with a writer process
beside it; the writers, counter, oids and tpc cases as groups of processes
started together, :mod:`zeotwist.bench.groups`), and stops it, in a ``finally``.  The
``resolving`` case runs its group against another server of the system, on
another fresh copy, started in client-side conflict resolution mode.  The ``pack``
case has a database of its own (:func:`zeotwist.bench.packing.build`, also
written once and copied): a second server is started on a fresh copy of it
after the first has stopped.  The ``blobs`` case runs once per round for
both systems, after their other cases: ``python -m zeotwist.bench.blobs
--json``, which alternates them run by run, each run a fresh client
process with a blob server of its own (one system per round would leave
whatever the file system's state costs at that moment to one of them).  Rates are ``count / seconds`` as timed inside the client process
(the pack case reports its seconds); the server's peak RSS is reset before
each case and read after it.  :mod:`zeotwist.bench.report` prints
per-system medians over the rounds and ratios of those medians, with the
spread of the per-round ratios.
"""
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

from zeotwist.bench.clients import BenchError, client, group, parse_result, with_writer
from zeotwist.bench.local import local_round
from zeotwist.bench.packing import build
from zeotwist.bench.procstat import peak_rss_mb, reset_peak
from zeotwist.bench.report import TIMED, label, summary
from zeotwist.bench.servers import Server, ServerError
from zeotwist.bench.workload import populate

SYSTEMS = ("zeotwist", "zeo")
#: (row, case, label, unit), in the order a round runs them.  A case is
#: what ``--cases`` selects and one client run (or group of processes)
#: measures; some cases give several rows.  Read cases come first, so they
#: read the populated data; ``pack`` and ``blobs`` have servers of their own.
ROWS = (
    ("cold", "cold", "cold reads", "loads/s"),
    ("pipelined", "pipelined", "pipelined cold", "loads/s"),
    ("warm", "warm", "warm reads", "loads/s"),
    ("hotset", "hotset", "hot-set mix", "ops/s"),
    ("graph", "graph", "graph cold read", "objects/s"),
    ("commits", "commits", "small commits", "commits/s"),
    ("add1000", "add1000", "add 1000 objects", "objects/s"),
    ("invalidation", "invalidation", "invalidation", "commits/s"),
    ("writers", "writers", "writers, distinct", "commits/s"),
    ("counter", "counter", "writers, 1 counter", "commits/s"),
    ("resolving", "resolving", "writers, 1 Length", "commits/s"),
    ("oids1", "oids", "100 oids, c=1", "allocs/s"),
    ("oids2", "oids", "100 oids, c=2", "allocs/s"),
    ("tpc1", "tpc", "empty tpc, c=1", "tpc/s"),
    ("tpc2", "tpc", "empty tpc, c=2", "tpc/s"),
    ("bigstore", "bigrecord", "big record store", "MB/s"),
    ("bigload", "bigrecord", "big record load", "MB/s"),
    ("pack", "pack", "pack", "s (lower is better)"),
    ("blob-large-store", "blobs", "blob large store", "MB/s"),
    ("blob-large-load", "blobs", "blob large load", "MB/s"),
    ("blob-small-store", "blobs", "blob small store", "MB/s"),
    ("blob-small-load", "blobs", "blob small load", "MB/s"),
)
#: The cases, in the order a round runs them; ``scaleout`` (zeotwist only:
#: two servers over PostgreSQL, :mod:`zeotwist.bench.scaleout`) runs after
#: the rounds, where PostgreSQL is available.
CASE_NAMES = tuple(dict.fromkeys(case for _, case, _, _ in ROWS)) + ("scaleout",)
#: Cases served by a copy of the populated database from a server of their own,
#: started in client-side conflict resolution mode.
CLIENT_RESOLUTION_CASES = ("resolving",)
#: The cases served by the populated database (not ``pack``'s or ``blobs``'s own).
POPULATED_CASES = tuple(c for c in CASE_NAMES[:CASE_NAMES.index("pack")]
                        if c not in CLIENT_RESOLUTION_CASES)
#: Cases run as a group of client processes started together: concurrency levels.
GROUP_CASES = {"writers": None, "counter": None, "resolving": None,
               "oids": (1, 2), "tpc": (1, 2)}
#: Seconds the blob bench may run.
BLOBS_TIMEOUT = 3600.0
#: ``python -m zeotwist.bench.blobs`` options of a ``--quick`` run.
QUICK_BLOBS = ("--large-mb", "2", "--large-count", "2", "--small-count", "100")
#: Client cache bytes per populated object in the hotset case: with Items of
#: ~57 bytes, zeotwist's cache (120 bytes accounted per entry) holds about
#: 23 % of them and ZEO's (43) about 40 %: the 10 % hot set fits, the rest not.
HOTSET_CACHE_PER_OBJECT = 40


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
    holders: int = 100          # graph: Holders of 100 Items each
    writers: int = 4            # writers, counter: processes
    writer_commits: int = 250   # writers, counter: commits per process
    iterations: int = 1000      # oids, tpc: iterations per process
    add_transactions: int = 20  # add1000: transactions of 1,000 new objects
    invalidations: int = 200    # invalidation: commits heard by the second client
    records: int = 5            # bigrecord: records stored and loaded
    record_mb: float = 10.0     # bigrecord: MB per record
    cases: tuple = field(default=CASE_NAMES)
    quick: bool = False         # blobs: a small run
    blob_args: tuple = ()       # blobs: more options for python -m zeotwist.bench.blobs
    local: bool = True          # also run LOCAL_CASES on a local FileStorage
    pack_built: dict = None     # set by run(): what packing.build() wrote

    @property
    def hot_cache_size(self) -> int:
        return self.objects * HOTSET_CACHE_PER_OBJECT


def run(settings: Settings, systems=SYSTEMS, out=None) -> dict:
    """Run every round; print progress and the summary to ``out``; return
    ``{(system, row): [result per round]}``, a result being the client's
    ``{"count", "seconds", "extra"}`` plus ``"rate"`` (for ``pack`` also
    ``"size_before"`` and ``"size_after"``, the file's bytes), its ``extra``
    with the client's and the server's peak RSS (``rss_mb``, ``server_rss_mb``)."""
    out = out or sys.stdout
    say = lambda *a: print(*a, file=out, flush=True)  # noqa: E731
    rows = [r for r in ROWS if r[1] in settings.cases]
    say(header(settings))
    tmp = tempfile.mkdtemp(prefix="zeotwist-bench-")
    try:
        base = os.path.join(tmp, "base.fs")
        oidfile = os.path.join(tmp, "oids")
        with open(oidfile, "wb") as f:
            if any(c in settings.cases for c in POPULATED_CASES + CLIENT_RESOLUTION_CASES):
                f.write(b"".join(populate(base, settings.objects, settings.holders)))
        if "pack" in settings.cases:
            settings.pack_built = build(os.path.join(tmp, "pack.fs"), settings.pack_objects)
        results = {(s, row): [] for s in systems for row, _, _, _ in rows}
        for r in range(settings.rounds if rows else 0):
            order = systems if r % 2 == 0 else tuple(reversed(systems))
            got = {system: one_round(system, tmp, oidfile, settings,
                                     os.path.join(tmp, "r%d" % r)) for system in order}
            if "blobs" in settings.cases:
                for system, blob_rows in blobs(settings, order, os.path.join(
                        tmp, "r%d" % r)).items():
                    got[system].update(blob_rows)
            for system in order:
                for row, result in got[system].items():
                    results[system, row].append(result)
                say("round %d  %-10s %s" % (r + 1, label(system), "   ".join(
                    ("%s %.2fs" if row in TIMED else "%s %.0f") % (
                        row, got[system][row]["seconds" if row in TIMED else "rate"])
                    for row, _, _, _ in rows)))
            if settings.local:
                for row, result in local_round(tmp, oidfile, settings,
                                               os.path.join(tmp, "r%d" % r)).items():
                    results.setdefault(("local", row), []).append(result)
        if rows:
            say()
            say(summary(results, systems, rows, settings))
        if "scaleout" in settings.cases and "zeotwist" in systems:
            say()
            say(scaleout(settings))
        if hasattr(os, "getloadavg"):
            say()
            say("load average at the end: %.2f %.2f %.2f (1, 5, 15 min)" % os.getloadavg())
        return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def blobs(settings: Settings, systems: tuple, directory: str) -> dict:
    """Run ``python -m zeotwist.bench.blobs --json`` for ``systems``, in
    this order (small with ``quick``); ``{system: {row: result}}``."""
    work = os.path.join(directory, "blobs")
    os.makedirs(work)
    argv = [sys.executable, "-m", "zeotwist.bench.blobs", "--workdir", work, "--json",
            "--systems", ",".join(systems), "--repeat", "2", "--warmup", "1"] + list(
                QUICK_BLOBS if settings.quick else ()) + list(settings.blob_args)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=BLOBS_TIMEOUT,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise BenchError("the blob bench ran over %g s" % BLOBS_TIMEOUT)
    if done.returncode != 0:
        raise BenchError("the blob bench failed (status %d):\n%s" % (
            done.returncode, done.stderr[-3000:]))
    got = json.loads(done.stdout.strip().splitlines()[-1])
    return {system: {row: parse_result(json.dumps(result))
                     for row, result in got[system]["rows"].items()} for system in systems}


def scaleout(settings: Settings) -> str:
    """``python -m zeotwist.bench.scaleout`` (small with ``quick``): its report,
    or the line saying there is no PostgreSQL here."""
    from zeotwist.bench.scaleout import NO_POSTGRES
    argv = [sys.executable, "-m", "zeotwist.bench.scaleout"] + (
        ["--quick"] if settings.quick else [])
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=BLOBS_TIMEOUT,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise BenchError("the scale-out bench ran over %g s" % BLOBS_TIMEOUT)
    if done.returncode not in (0, NO_POSTGRES):
        raise BenchError("the scale-out bench failed (status %d):\n%s" % (
            done.returncode, done.stderr[-3000:]))
    return done.stdout.strip()


def header(settings: Settings) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return ("zeotwist bench %s: %d objects, %d commits, %d x 1000 added objects, "
            "%d invalidations, %d holders, %d x %d writer commits, "
            "%d oid/tpc iterations, %d x %g MB records, %d pack objects, %d round(s), "
            "cases %s; Python %s on %s, %d CPU(s), load average %.2f" % (
                datetime.date.today().isoformat(), settings.objects, settings.commits,
                settings.add_transactions, settings.invalidations,
                settings.holders, settings.writers, settings.writer_commits,
                settings.iterations, settings.records, settings.record_mb,
                settings.pack_objects, settings.rounds, ",".join(settings.cases),
                platform.python_version(), platform.machine(), os.cpu_count() or 0, load))


def case_params(settings: Settings, case: str) -> dict:
    return {
        "cold": {},
        "pipelined": {"window": settings.window},
        "warm": {"passes": settings.passes},
        "hotset": {"reads": settings.hot_reads, "cache_size": settings.hot_cache_size},
        "graph": {},
        "commits": {"count": settings.commits},
        "add1000": {"count": settings.add_transactions},
        "invalidation": {"count": settings.invalidations},
        "writers": {"count": settings.writer_commits},
        "counter": {"count": settings.writer_commits},
        "resolving": {"count": settings.writer_commits},
        "oids": {"count": settings.iterations},
        "tpc": {"count": settings.iterations},
        "bigrecord": {"records": settings.records, "mb": float(settings.record_mb)},
    }[case]


def populated_case(server: Server, case: str, oidfile: str, settings: Settings) -> dict:
    """Run one case of the populated database; ``{row: result}``, each result
    with the server's peak RSS during the case."""
    params = case_params(settings, case)
    if case in GROUP_CASES:
        got = {}
        for n in GROUP_CASES[case] or (settings.writers,):
            reset_peak(server.process.pid)
            result = group(server, case, oidfile, n, params)
            result["extra"]["server_rss_mb"] = peak_rss_mb(server.process.pid)
            got[case + str(n) if GROUP_CASES[case] else case] = result
        return got
    reset_peak(server.process.pid)
    if case == "hotset":
        result = with_writer(server, oidfile, params, settings.writer_rate)
    else:
        if case == "commits":
            params = dict(params, server_pid=server.process.pid)
        result = client(server, case, oidfile, params)
    peak = peak_rss_mb(server.process.pid)
    rows = result.get("rows") or {case: result}
    for one in rows.values():
        one["extra"]["server_rss_mb"] = peak
    return rows


def one_round(system: str, tmp: str, oidfile: str, settings: Settings,
              directory: str) -> dict:
    """Serve a fresh copy of the populated database with ``system`` and run
    each selected case once against it; then, for ``pack``, a fresh copy of
    the pack case's database with another server of ``system`` (``blobs``
    runs for both systems at once, :func:`blobs`).  ``{row: result}``."""
    os.makedirs(directory, exist_ok=True)
    got = {}
    if any(c in settings.cases for c in POPULATED_CASES):
        server = Server(system, fresh_copy(os.path.join(tmp, "base.fs"), directory,
                                           "%s.fs" % system))
        try:
            server.start()
            for case in POPULATED_CASES:
                if case in settings.cases:
                    got.update(populated_case(server, case, oidfile, settings))
        finally:
            server.stop()
    for case in CLIENT_RESOLUTION_CASES:
        if case in settings.cases:
            server = Server(system, fresh_copy(os.path.join(tmp, "base.fs"), directory,
                                               "%s-%s.fs" % (system, case)),
                            client_resolution=True)
            try:
                server.start()
                got.update(populated_case(server, case, oidfile, settings))
            finally:
                server.stop()
    if "pack" in settings.cases:
        filename = fresh_copy(os.path.join(tmp, "pack.fs"), directory, "%s-pack.fs" % system)
        size = os.path.getsize(filename)
        server = Server(system, filename)
        try:
            server.start()
            got["pack"] = client(server, "pack", oidfile, {})
            got["pack"]["extra"]["server_rss_mb"] = peak_rss_mb(server.process.pid)
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


__all__ = ["run", "Settings", "ServerError", "SYSTEMS", "ROWS", "CASE_NAMES"]
