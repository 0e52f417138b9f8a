"""Smoke tests of ``python -m zeotwist.bench`` (no timing assertions)."""
import re
import subprocess
import sys

import pytest

from zeotwist.bench.__main__ import parse
from zeotwist.bench.reads import HOT_READS, HotSet
from zeotwist.bench.runner import CASE_NAMES
from zeotwist.bench.runner import ROWS as RUNNER_ROWS

ROWS = tuple(label for _, _, label, _ in RUNNER_ROWS)
#: Smaller than --quick: the bench's code paths, not its figures.
TINY = ("--writer-commits", "3", "--iterations", "3", "--holders", "2", "--records", "1",
        "--record-mb", "0.2", "--hot-reads", "500", "--commits", "10",
        "--add-transactions", "1", "--invalidations", "3",
        "--blob-args", "--large-mb 1 --small-count 20")


def bench(tmp_path, *args):
    done = subprocess.run(
        [sys.executable, "-m", "zeotwist.bench", "--quick", "--only", "zeotwist"] + list(TINY)
        + list(args), capture_output=True, text=True, timeout=240, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_quick_bench_prints_a_rate_for_each_case(tmp_path):
    # every case but scaleout, which has its own test below (it starts a PostgreSQL)
    out = bench(tmp_path, "--cases", ",".join(c for c in CASE_NAMES if c != "scaleout"))
    for case in ROWS:
        row = re.search(r"^%s\s+([0-9.]+)\s" % re.escape(case), out, re.M)
        assert row, out
        assert float(row.group(1)) > 0, out
    assert "ZEO" in out    # the summary names the other column, shown as "-"
    assert {"graph cold read", "writers, 1 counter", "100 oids, c=2", "empty tpc, c=2",
            "big record load", "blob small load"} <= set(ROWS)
    # latency and memory: p50/p99 where a latency, client and server peak RSS for every row
    table = out[out.index("latency, memory"):]
    for case in ("cold reads", "graph cold read", "small commits", "writers, 1 counter",
                 "empty tpc, c=1", "big record store"):
        lat = re.search(r"^%s\s+([0-9.]+)/([0-9.]+)\s+([0-9]+)/([0-9]+)$" % re.escape(case),
                        table, re.M)
        assert lat and 0 < float(lat.group(1)) <= float(lat.group(2)), table
        assert int(lat.group(3)) > 10 and int(lat.group(4)) > 10, table    # MB
    for case in ROWS:
        assert re.search(r"^%s\s.*\s[0-9]+/[0-9]+$" % re.escape(case), table, re.M), table
    assert re.search(r"^  zeotwist\s+server CPU per commit [0-9]+ µs", out, re.M), out
    # graph: 2 Holders of 100 Items; reference prefetch brings each Holder's Items along
    trips = re.search(r"^  zeotwist\s+(\d+) objects activated, (\d+) storage loads, (\d+) of "
                      r"them round trips", out, re.M)
    assert trips and int(trips.group(1)) == int(trips.group(2)) == 202, out
    assert 1 <= int(trips.group(3)) <= 2, out       # one per Holder, at most
    # the local FileStorage column: a rate for the cases it runs, none for the others
    assert re.search(r"^case\s.*\slocal FS\s", out, re.M), out
    for case in ("cold reads", "warm reads", "graph cold read", "small commits",
                 "big record store", "big record load"):
        row = re.search(r"^%s\s.*\s([0-9]+)\s+\S+/s$" % re.escape(case), out, re.M)
        assert row and int(row.group(1)) > 0, out
    # writers: 4 processes x 3 increments each, checked against the counters afterwards
    for what in ("distinct Counters", "one Counter"):
        assert "writers, %s: 4 processes, each committing 3 increments" % what in out, out
    assert len(re.findall(r"^  zeotwist\s+conflicts [0-9]+ \(all rounds\), lost updates 0, "
                          r"longest increment [0-9.e+]+ ms, p99 over time [0-9.e+]+ ms$",
                          out, re.M)) == 2, out
    # one Length, client-side resolution: no ConflictError, every conflict a re-vote
    assert "writers, 1 Length: 4 processes, each committing 3 increments" in out, out
    revotes = re.search(r"^  zeotwist\s+conflicts 0, errors 0, lost updates 0, "
                        r"re-votes ([0-9]+) \(all rounds\)$", out, re.M)
    assert revotes and int(revotes.group(1)) <= 12, out
    assert "zeotwist pipelined / zeotwist sequential cold reads: " in out, out
    hit = re.search(r"^  zeotwist\s+hit ratio ([0-9.]+) .*cache.stats\(\) hits/\(hits\+misses\) "
                    r"([0-9.]+)", out, re.M)
    assert hit, out
    assert 0 < float(hit.group(1)) <= 1 and 0 < float(hit.group(2)) <= 1, out
    # pack: 2,000 Items with history and garbage; the packed file is smaller
    assert "database of 2000 Items" in out, out
    sizes = re.search(r"^  zeotwist\s+file ([0-9.]+) MB -> ([0-9.]+) MB", out, re.M)
    assert sizes and float(sizes.group(2)) < float(sizes.group(1)), out
    assert "scale-out" not in out, out


def test_add1000_and_invalidation_cases_report_their_fields(tmp_path):
    out = bench(tmp_path, "--cases", "add1000,invalidation")
    add = re.search(r"^add 1000 objects\s+([0-9]+)\s+-\s+([0-9]+)\s+objects/s$", out, re.M)
    assert add and int(add.group(1)) > 0 and int(add.group(2)) > 0, out    # and local FS
    assert re.search(r"^invalidation\s+[0-9]+\s+-\s+commits/s$", out, re.M), out
    table = out[out.index("latency, memory"):]
    for case in ("add 1000 objects", "invalidation"):
        lat = re.search(r"^%s\s+([0-9.]+)/([0-9.]+)\s+([0-9]+)/([0-9]+)$" % case, table, re.M)
        assert lat and 0 < float(lat.group(1)) <= float(lat.group(2)), table
        assert int(lat.group(3)) > 10 and int(lat.group(4)) > 10, table      # MB
    assert re.search(r"^  zeotwist\s+p50 of the commit itself [0-9.]+ ms; from its return to "
                     r"the invalidation [0-9.]+ ms$", out, re.M), out


def test_summary_prints_rss_ratios_and_the_invalidation_ratio():
    from zeotwist.bench.report import summary
    rows = [r for r in RUNNER_ROWS if r[0] in ("cold", "invalidation")]

    def result(rate, cli, srv, p50):
        return {"rate": rate, "count": 1, "seconds": 1.0, "extra": {
            "rss_mb": cli, "server_rss_mb": srv, "p50": p50, "p99": 2 * p50,
            "commit_p50": p50 / 2, "after_p50": 0.0}}
    results = {("zeotwist", "cold"): [result(100, 60, 48, 0.2)],
               ("zeo", "cold"): [result(50, 30, 40, 0.4)],
               ("zeotwist", "invalidation"): [result(500, 30, 36, 1.0)],
               ("zeo", "invalidation"): [result(400, 30, 40, 2.0)]}
    out = summary(results, ("zeotwist", "zeo"), rows)
    assert re.search(r"^cold reads\s.*\s2\.00/1\.20$", out, re.M), out
    assert re.search(r"^invalidation\s.*\s1\.00/0\.90$", out, re.M), out
    assert "zeotwist/ZEO p50 latency 0.50 (lower is better" in out, out


def test_scale_out_case_measures_two_servers_over_postgresql(tmp_path, pg_cluster):
    """With PostgreSQL here (pg_cluster: under CI it must be), the case runs:
    its own cluster, two twistd servers, fan-out latency and commits/s."""
    out = bench(tmp_path, "--cases", "scaleout")
    lat = re.search(r"fan-out latency\s+median ([0-9.]+) ms, p99 ([0-9.]+) ms \(20 commits\)",
                    out)
    assert lat and 0 <= float(lat.group(1)) <= float(lat.group(2)), out
    rates = re.search(r"commits/s\s+([0-9]+) through 1 server, ([0-9]+) through 2", out)
    assert rates and int(rates.group(1)) > 0 and int(rates.group(2)) > 0, out


def test_one_case_runs_alone(tmp_path):
    out = bench(tmp_path, "--cases", "warm", "--no-local")
    assert re.search(r"^warm reads\s+[0-9.]+\s", out, re.M), out
    assert "local FS" not in out, out
    for case in ROWS:
        if case != "warm reads":
            assert not re.search(r"^%s\s" % case, out, re.M), out
    assert "blob" not in out, out


def test_cases_option_rejects_an_unknown_case(capsys):
    with pytest.raises(SystemExit):
        parse(["--cases", "cold,bogus"])
    assert "bogus" in capsys.readouterr().err
    assert parse(["--cases", "hotset,cold"]).cases == ("hotset", "cold")
    assert parse(["--cases", "pack,blobs"]).cases == ("pack", "blobs")
    assert parse([]).cases == CASE_NAMES
    assert {"pack", "blobs", "scaleout"} <= set(CASE_NAMES)
    assert parse(["--quick"]).pack_objects == 2000
    assert parse([]).pack_objects == 100_000


def test_hot_set_is_fixed_and_gets_most_reads():
    import random
    mixer = HotSet(1000, random.Random(1))
    first, second = mixer.picks(2000), mixer.picks(2000)
    hot = set(mixer.hot)
    assert len(hot) == 100
    for picks in (first, second):     # the same hot set for warm-up and timed reads
        share = sum(k in hot for k in picks) / len(picks)
        assert HOT_READS - 0.03 < share < HOT_READS + 0.03


def test_quick_keeps_explicit_options():
    args = parse(["--quick", "--writer-commits", "7", "--holders", "3"])
    assert (args.writer_commits, args.holders, args.iterations) == (7, 3, 20)
    assert parse(["--writers", "2"]).writers == 2
    with pytest.raises(SystemExit):
        parse(["--writers", "9"])        # more than the populated Counters


def _proc(count, initial, final, shared, samples=(0.001,)):
    return {"count": count, "seconds": 1.0, "extra": {
        "initial": initial, "final": final, "shared": shared, "samples": list(samples),
        "conflicts": 1, "rss_mb": 50.0}}


def test_the_p99_over_time_weights_each_latency_by_its_length():
    """A closed loop's starved writer makes one long sample while others make
    many short ones: per sample it hides under the p99, over time it is most
    of the run (procstat.time_weighted)."""
    from zeotwist.bench.groups import combine
    from zeotwist.bench.procstat import time_weighted
    samples = [0.001] * 99 + [1.0]
    assert time_weighted(samples, 0.99) == 1.0 and time_weighted(samples, 0.05) == 0.001
    assert time_weighted([0.002] * 10, 0.99) == 0.002
    got = combine([{"count": 100, "seconds": 1.1, "extra": {"samples": samples}}])["extra"]
    assert got["p99"] == 1.0 and got["p99_time"] == 1000.0      # ms


def test_group_results_combine_and_lost_updates_are_counted():
    from zeotwist.bench.groups import combine
    ok = combine([_proc(5, 0, 10, True), _proc(5, 0, 10, True, (0.002, 0.004))])
    assert ok["count"] == 10 and ok["extra"]["lost"] == 0 and ok["extra"]["conflicts"] == 2
    assert ok["extra"]["p50"] == 2.0 and ok["extra"]["p99"] == 4.0     # ms, all samples
    assert ok["extra"]["max"] == 4.0
    assert combine([_proc(5, 0, 10, True), _proc(5, 0, 9, True)])["extra"]["lost"] == 1
    assert combine([_proc(5, 3, 8, False), _proc(5, 0, 4, False)])["extra"]["lost"] == 1
    assert "lost" not in combine([{"count": 3, "seconds": 1.0, "extra": {"samples": [1]}}])["extra"]


def test_the_bench_runs_zeotwist_from_bytecode_as_zeo_runs():
    """ZEO's modules come with their bytecode (pip writes it); the bench
    writes zeotwist's, so its processes do not compile them from source
    where PYTHONDONTWRITEBYTECODE is set (docs/performance.md, "Memory")."""
    import importlib.util
    import os

    import zeotwist.wire.prefetch
    from zeotwist.bench.__main__ import precompile
    cached = importlib.util.cache_from_source(zeotwist.wire.prefetch.__file__)
    if os.path.exists(cached):
        os.unlink(cached)
    precompile()
    assert os.path.exists(cached)
