"""Command line: ``python -m zeotwist.bench [--quick] [--rounds N] [--cases A,B] ...``."""
import argparse
import shlex
import signal
import sys

from zeotwist.bench.clients import BenchError
from zeotwist.bench.parallel import MAX_WRITERS
from zeotwist.bench.runner import CASE_NAMES, SYSTEMS, ServerError, Settings, run

QUICK = dict(objects=500, commits=50, rounds=1, hot_reads=2000, passes=1, pack_objects=2000,
             holders=5, writer_commits=20, iterations=20, records=2, record_mb=1.0,
             add_transactions=3, invalidations=20)
#: Options that must be at least 1.
POSITIVE = ("rounds", "objects", "commits", "window", "passes", "hot_reads", "pack_objects",
            "holders", "writers", "writer_commits", "iterations", "records",
            "add_transactions", "invalidations")


def case_list(text: str) -> tuple:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in CASE_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            "unknown case(s) %s; choose from %s" % (", ".join(unknown) or "(none)",
                                                    ", ".join(CASE_NAMES)))
    return names


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m zeotwist.bench",
        description="Compare zeotwist with ZEO 6: cold, pipelined, warm, hot-set and "
                    "object-graph reads, small commits, adding 1000 objects per transaction, "
                    "invalidation latency, concurrent writers, OID allocation "
                    "and empty two-phase commits, big records, pack time, blob throughput; "
                    "server and client in separate processes, interleaved rounds, medians "
                    "and ratios, latencies and peak memory.")
    p.add_argument("--rounds", type=int, default=3, help="rounds per system (default 3)")
    p.add_argument("--objects", type=int, default=10_000,
                   help="objects populated and read (default 10000)")
    p.add_argument("--commits", type=int, default=1000,
                   help="transactions in the small-commits case (default 1000)")
    p.add_argument("--add-transactions", type=int, default=20,
                   help="add1000: transactions of 1000 new objects (default 20)")
    p.add_argument("--invalidations", type=int, default=200,
                   help="invalidation: commits whose invalidation is timed (default 200)")
    p.add_argument("--cases", type=case_list, default=CASE_NAMES, metavar="A,B",
                   help="the cases to run, comma-separated, from: %s (default all)"
                        % ", ".join(CASE_NAMES))
    p.add_argument("--window", type=int, default=64,
                   help="pipelined: loads kept outstanding by zeotwist (default 64)")
    p.add_argument("--passes", type=int, default=3,
                   help="warm: timed passes over all objects (default 3)")
    p.add_argument("--hot-reads", type=int, default=50_000,
                   help="hotset: timed reads (default 50000)")
    p.add_argument("--writer-rate", type=float, default=50.0,
                   help="hotset: the writer process's commits per second (default 50)")
    p.add_argument("--pack-objects", type=int, default=100_000,
                   help="pack: Items in the pack case's database (default 100000)")
    p.add_argument("--holders", type=int, default=100,
                   help="graph: Holders of 100 Items each (default 100)")
    p.add_argument("--writers", type=int, default=4,
                   help="writers, counter, resolving: processes (default 4, at most %d)"
                   % MAX_WRITERS)
    p.add_argument("--writer-commits", type=int, default=250,
                   help="writers, counter, resolving: commits per process (default 250)")
    p.add_argument("--iterations", type=int, default=1000,
                   help="oids, tpc: iterations per process (default 1000)")
    p.add_argument("--records", type=int, default=5,
                   help="bigrecord: records stored and loaded (default 5)")
    p.add_argument("--record-mb", type=float, default=10.0,
                   help="bigrecord: MB per record (default 10)")
    p.add_argument("--blob-args", default="", metavar="'--small-count 10 ...'",
                   help="blobs: more options for python -m zeotwist.bench.blobs")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: %(objects)d objects, %(commits)d commits, "
                        "%(hot_reads)d hot-set reads, %(pack_objects)d pack objects, "
                        "%(add_transactions)d x 1000 added objects, %(invalidations)d "
                        "invalidations, "
                        "%(rounds)d round, %(holders)d holders, %(writer_commits)d commits "
                        "per writer, %(iterations)d oid/tpc iterations, %(records)d records of "
                        "%(record_mb)g MB, small blobs" % QUICK)
    p.add_argument("--only", choices=SYSTEMS, help="run one system only")
    p.add_argument("--no-local", dest="local", action="store_false",
                   help="leave out the local FileStorage column (cold, warm, graph, commits "
                        "and bigrecord on a FileStorage in the client process, no network)")
    args = p.parse_args(argv)
    if args.quick:                 # --quick changes the defaults; explicit options win
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)
    for k in POSITIVE:
        if getattr(args, k) < 1:
            p.error("--%s must be at least 1" % k.replace("_", "-"))
    if args.writer_rate <= 0 or args.record_mb <= 0:
        p.error("--writer-rate and --record-mb must be positive")
    if args.writers > MAX_WRITERS:
        p.error("--writers must be at most %d" % MAX_WRITERS)
    return args


def precompile() -> None:
    """Write the bytecode of zeotwist's modules, as ``pip install`` does.

    ZEO's modules come with theirs; a zeotwist checkout run where
    ``PYTHONDONTWRITEBYTECODE`` is set (this project's machines) has none,
    and then every client and server process compiles its zeotwist modules
    from source: 1-2 MB more of peak memory each (docs/performance.md,
    "Memory").  Best effort: nothing is written to a read-only tree."""
    import compileall
    import os
    import zeotwist
    compileall.compile_dir(os.path.dirname(zeotwist.__file__), quiet=2)


def main(argv=None) -> int:
    args = parse(argv)
    # SIGTERM unwinds like Ctrl-C, so the servers' finally blocks run.
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    systems = (args.only,) if args.only else SYSTEMS
    settings = Settings(objects=args.objects, commits=args.commits, rounds=args.rounds,
                        window=args.window, passes=args.passes, hot_reads=args.hot_reads,
                        writer_rate=args.writer_rate, pack_objects=args.pack_objects,
                        holders=args.holders, writers=args.writers,
                        writer_commits=args.writer_commits, iterations=args.iterations,
                        add_transactions=args.add_transactions,
                        invalidations=args.invalidations,
                        records=args.records, record_mb=args.record_mb,
                        cases=args.cases, quick=args.quick, local=args.local,
                        blob_args=tuple(shlex.split(args.blob_args)))
    precompile()
    try:
        results = run(settings, systems)
    except (BenchError, ServerError) as e:
        print("bench failed: %s" % e, file=sys.stderr)
        return 1
    # ZEO 6.2's own client-side resolution fails commits under concurrent
    # writers (issue 11): its resolving figures are reported, not held
    # against the run.
    lost = sum(r["extra"].get("lost") or 0 for (system, row), runs in results.items()
               if (system, row) != ("zeo", "resolving") for r in runs)
    if lost:
        print("bench failed: %d lost updates (see the writers notes)" % lost, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
