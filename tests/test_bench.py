"""Smoke test of ``python -m zeotwist.bench --quick`` (no timing assertions)."""
import re
import subprocess
import sys


def test_quick_bench_prints_a_rate_for_each_case(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "zeotwist.bench", "--quick", "--only", "zeotwist"],
        capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    for case in ("cold reads", "small commits"):
        row = re.search(r"^%s\s+([0-9.]+)\s" % case, done.stdout, re.M)
        assert row, done.stdout
        assert float(row.group(1)) > 0, done.stdout
    assert "ZEO" in done.stdout    # the summary names the other column, shown as "-"
