"""Wall time and peak memory of the end-to-end CLI job, `python -m engine run` (default settings).

Runs the command as a subprocess with --json, a fresh temporary cache dir (and output folder, when
the command has such an option), waits for it, and reads its peak resident memory from
resource.getrusage(RUSAGE_CHILDREN).ru_maxrss (the largest of this process's waited-for
children: run this script as its own process, e.g. `make bench`, for a clean figure).
If `engine run` does not exist yet, `python -m engine sample` (default settings) is timed
instead, and the output says so.

ratio = wall seconds / the seconds the command reports for its own work (its JSON "seconds"):
how much process start-up, imports and model loading add around the work.

Run: .venv/bin/python -m bench.run_wall [--command auto|run|sample] [--json] [-- extra CLI options]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import emit, run_script

ROOT = Path(__file__).resolve().parent.parent
OUTPUT_OPTIONS = ("--out", "--output", "--output-dir", "--out-dir", "--export-dir")


def _help(command: str) -> str | None:
    """`python -m engine <command> --help` text, or None when the command does not exist."""
    p = subprocess.run([sys.executable, "-m", "engine", command, "--help"], cwd=ROOT, capture_output=True, text=True)
    return p.stdout if p.returncode == 0 else None


def build_command(which: str, cache: Path, out: Path, extra: list[str]) -> tuple[list[str], str, str | None]:
    """(argv, command name, output option used or None)."""
    help_text = _help("run") if which in ("auto", "run") else None
    if which == "run" and help_text is None:
        raise SystemExit("`python -m engine run` does not exist here; use --command sample")
    name = "run" if help_text is not None else "sample"
    argv = [sys.executable, "-m", "engine", name, "--json", "--cache-dir", str(cache)]
    out_option = next((o for o in OUTPUT_OPTIONS if help_text and f"{o} " in help_text + " "), None)
    if out_option:
        argv += [out_option, str(out)]
    return argv + extra, name, out_option


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python -m bench.run_wall", description=__doc__.splitlines()[0])
    p.add_argument("--command", default="auto", choices=("auto", "run", "sample"))
    p.add_argument("--json", action="store_true")
    return p.parse_args(own), extra


def main(argv=None) -> dict:
    args, extra = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        cache, out = Path(tmp) / "cache", Path(tmp) / "out"
        cmd, name, out_option = build_command(args.command, cache, out, extra)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    try:
        child = json.loads(last)
    except json.JSONDecodeError:
        child = {}
    inner = child.get("seconds") if isinstance(child, dict) else None
    ok = proc.returncode == 0 and "error" not in child
    shown = " ".join(["python -m engine", name, "--json --cache-dir <tmp>"] + ([out_option, "<tmp>"] if out_option else [])
                     + extra)
    result = {
        "bench": "run_wall",
        "command": shown,
        "engine_command": name,
        "fallback_to_sample": name != "run",
        "returncode": proc.returncode,
        "ok": ok,
        "ratio": (wall / inner) if ok and inner else None,
        "wall_seconds": wall,
        "reported_seconds": inner,
        "peak_rss_mb": peak_mb,
        "child_result": child,
    }
    lines = [f"run_wall: {shown}" + ("  (engine run does not exist yet: timing engine sample)" if name != "run" else ""),
             f"  wall       {wall:8.2f} s   peak RSS {peak_mb:.0f} MiB   exit code {proc.returncode}",
             f"  reported   {inner if inner is not None else float('nan'):8.2f} s (the command's own 'seconds'); "
             f"ratio wall/reported {result['ratio'] or float('nan'):.2f}"]
    stages = (child or {}).get("stage_seconds") if isinstance(child, dict) else None
    if stages:
        lines.append("  stages     " + ", ".join(f"{k} {v:.1f} s" for k, v in stages.items()))
    if not ok:
        lines.append("  FAILED: " + (proc.stderr.strip().splitlines() or ["no stderr"])[-1])
    return emit(lines, result, args.json)


if __name__ == "__main__":
    run_script(main)
