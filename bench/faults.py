"""The fault matrix: kills, full disks, read-only caches, damaged stores, NaN weights, bad input.

Runs tests/faults (pytest, in a child process) with $LAYERPRUNE_FAULTS_REPORT set, so each case
reports its outcome, seconds, `samples_lost` (committed rows missing after the recovery) and
`tracebacks` (Python tracebacks printed by the commands it ran) and `wrong_results` (commands
that exited 0 with a model or number they should not have produced, e.g. a checkpoint whose
weights do not cover its config); prints one table row per case and, with --json, one JSON
object as the last stdout line:
{"cases", "passed", "failed", "skipped", "samples_lost", "tracebacks", "wrong_results", "seconds", "seeds"}.
The three counts must be 0 and every case must pass; the exit status is 0 only then.

Run: .venv/bin/python -m bench.faults [--seeds N] [--json] [-k EXPR]
--seeds N repeats every kill case with N seeds (default: the suite's own, 1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_matrix(seeds: int | None = None, select: str | None = None) -> tuple[list[dict], float, str]:
    """(one dict per case, wall seconds, pytest's output tail)."""
    with tempfile.TemporaryDirectory(prefix="faults-") as tmp:
        report = Path(tmp) / "report.jsonl"
        env = {**os.environ, "LAYERPRUNE_FAULTS_REPORT": str(report), "OMP_NUM_THREADS": "1"}
        if seeds:
            env["LAYERPRUNE_FAULT_SEEDS"] = str(seeds)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/faults"]
        if select:
            cmd += ["-k", select]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.monotonic() - t0
        cases = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    return cases, seconds, (proc.stdout + proc.stderr)[-3000:]


def summary(cases: list[dict], seconds: float, seeds: int | None) -> dict:
    return {
        "cases": len(cases),
        "passed": sum(c["outcome"] == "passed" for c in cases),
        "failed": sum(c["outcome"] == "failed" for c in cases),
        "skipped": sum(c["outcome"] == "skipped" for c in cases),
        "samples_lost": sum(c["samples_lost"] for c in cases),
        "tracebacks": sum(c["tracebacks"] for c in cases),
        "wrong_results": sum(c.get("wrong_results", 0) for c in cases),
        "seconds": round(seconds, 1),
        "seeds": seeds or 1,
    }


def table(cases: list[dict]) -> str:
    width = max([len(c["case"]) for c in cases] + [4])
    lines = [f"{'case':{width}}  {'outcome':8} {'seconds':>8} {'lost':>5} {'tracebacks':>10} {'wrong':>5}  file"]
    for c in cases:
        lines.append(f"{c['case']:{width}}  {c['outcome']:8} {c['seconds']:>8.1f} {c['samples_lost']:>5} "
                     f"{c['tracebacks']:>10} {c.get('wrong_results', 0):>5}  {Path(c['file']).name}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=None, help="seeds per kill case (default: the suite's, 1)")
    p.add_argument("-k", dest="select", default=None, help="pytest -k expression: run only matching cases")
    p.add_argument("--json", action="store_true", help="one JSON object as the last stdout line")
    args = p.parse_args(argv)
    cases, seconds, tail = run_matrix(args.seeds, args.select)
    result = summary(cases, seconds, args.seeds)
    print(table(cases))
    print(f"{result['passed']}/{result['cases']} passed, {result['skipped']} skipped, samples lost "
          f"{result['samples_lost']}, tracebacks {result['tracebacks']}, wrong results {result['wrong_results']}, "
          f"{result['seconds']} s")
    ok = (cases and result["failed"] == 0 and result["samples_lost"] == 0 and result["tracebacks"] == 0
          and result["wrong_results"] == 0)
    if not ok:
        print(tail, file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
