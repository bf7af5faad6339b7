"""`python -m bench.faults --json`: the matrix runner's table and summary line."""

import json
import subprocess
import sys

from faults.helpers import ROOT


def test_bench_faults_reports_cases_and_counts():
    proc = subprocess.run([sys.executable, "-m", "bench.faults", "-k", "writer_refuses or the_table_itself", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["cases"] == result["passed"] == 5
    assert result["samples_lost"] == 0 and result["tracebacks"] == 0 and result["failed"] == 0
    assert result["wrong_results"] == 0
    assert lines[0].split()[:2] == ["case", "outcome"] and sum("passed" in line for line in lines[1:-2]) == 5
