"""Smoke tests of ``python -m zeotwist.bench`` (no timing assertions)."""
import re
import subprocess
import sys

import pytest

from zeotwist.bench.__main__ import parse
from zeotwist.bench.reads import HOT_READS, HotSet
from zeotwist.bench.runner import CASE_NAMES

ROWS = ("cold reads", "pipelined cold", "warm reads", "hot-set mix", "small commits", "pack")


def bench(tmp_path, *args):
    done = subprocess.run(
        [sys.executable, "-m", "zeotwist.bench", "--quick", "--only", "zeotwist"] + list(args),
        capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_quick_bench_prints_a_rate_for_each_case(tmp_path):
    out = bench(tmp_path)
    for case in ROWS:
        row = re.search(r"^%s\s+([0-9.]+)\s" % case, out, re.M)
        assert row, out
        assert float(row.group(1)) > 0, out
    assert "ZEO" in out    # the summary names the other column, shown as "-"
    assert "zeotwist pipelined / zeotwist sequential cold reads: " in out, out
    hit = re.search(r"^  zeotwist\s+hit ratio ([0-9.]+) .*cache.stats\(\) hits/\(hits\+misses\) "
                    r"([0-9.]+)", out, re.M)
    assert hit, out
    assert 0 < float(hit.group(1)) <= 1 and 0 < float(hit.group(2)) <= 1, out
    # pack: 2,000 Items with history and garbage; the packed file is smaller
    assert "database of 2000 Items" in out, out
    sizes = re.search(r"^  zeotwist\s+file ([0-9.]+) MB -> ([0-9.]+) MB", out, re.M)
    assert sizes and float(sizes.group(2)) < float(sizes.group(1)), out
    # blobs: the blob bench's table, after the rounds
    for op in ("large store", "large load", "small store", "small load"):
        row = re.search(r"^%s: \d+ x \d+ [KM]B\s+([0-9.]+)$" % op, out, re.M)
        assert row and float(row.group(1)) > 0, out


def test_one_case_runs_alone(tmp_path):
    out = bench(tmp_path, "--cases", "warm")
    assert re.search(r"^warm reads\s+[0-9.]+\s", out, re.M), out
    for case in ROWS:
        if case != "warm reads":
            assert not re.search(r"^%s\s" % case, out, re.M), out
    assert "blob throughput" not in out, out


def test_cases_option_rejects_an_unknown_case(capsys):
    with pytest.raises(SystemExit):
        parse(["--cases", "cold,bogus"])
    assert "bogus" in capsys.readouterr().err
    assert parse(["--cases", "hotset,cold"]).cases == ("hotset", "cold")
    assert parse(["--cases", "pack,blobs"]).cases == ("pack", "blobs")
    assert parse([]).cases == CASE_NAMES
    assert {"pack", "blobs"} <= set(CASE_NAMES)
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
