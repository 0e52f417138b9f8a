"""Command line: ``python -m zeotwist.bench [--quick] [--rounds N] ...``."""
import argparse
import signal
import sys

from zeotwist.bench.runner import SYSTEMS, BenchError, ServerError, run

QUICK = dict(objects=500, commits=50, rounds=1)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m zeotwist.bench",
        description="Compare zeotwist with ZEO 6: cold reads and small commits, "
                    "server and client in separate processes, interleaved rounds.")
    p.add_argument("--rounds", type=int, default=3, help="rounds per system (default 3)")
    p.add_argument("--objects", type=int, default=10_000,
                   help="objects populated and cold-read (default 10000)")
    p.add_argument("--commits", type=int, default=1000,
                   help="transactions in the small-commits case (default 1000)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: %(objects)d objects, %(commits)d commits, "
                        "%(rounds)d round" % QUICK)
    p.add_argument("--only", choices=SYSTEMS, help="run one system only")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    for k in ("rounds", "objects", "commits"):
        if getattr(args, k) < 1:
            p.error("--%s must be at least 1" % k)
    return args


def main(argv=None) -> int:
    args = parse(argv)
    # SIGTERM unwinds like Ctrl-C, so the servers' finally blocks run.
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    systems = (args.only,) if args.only else SYSTEMS
    try:
        run(args.objects, args.commits, args.rounds, systems)
    except (BenchError, ServerError) as e:
        print("bench failed: %s" % e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
