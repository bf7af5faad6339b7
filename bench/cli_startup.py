"""Start-up time of the CLI's light commands against `import torch`.

`python -m engine --help` and `python -m engine status` build only what they need and import no
torch, scikit-learn or scipy; this prints their median wall time over `--repeats` fresh
processes next to `python -c "import torch"` in the same run (the machine may be shared and
noisy: compare the ratios, not the seconds).

ratio_help / ratio_status = command seconds / `import torch` seconds (below 1 is the point).

Run: .venv/bin/python -m bench.cli_startup [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import emit, run_script

ROOT = Path(__file__).resolve().parent.parent


def _median_wall(argv: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run(argv, cwd=ROOT, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as cache:
        torch_s = _median_wall([py, "-c", "import torch"], args.repeats)
        help_s = _median_wall([py, "-m", "engine", "--help"], args.repeats)
        status_s = _median_wall([py, "-m", "engine", "status", "--cache-dir", cache], args.repeats)
    result = {"import_torch_s": round(torch_s, 3), "help_s": round(help_s, 3), "status_s": round(status_s, 3),
              "ratio_help": round(help_s / torch_s, 3), "ratio_status": round(status_s / torch_s, 3),
              "repeats": args.repeats}
    emit([f"import torch            {torch_s:.3f} s (median of {args.repeats})",
          f"python -m engine --help {help_s:.3f} s  ({result['ratio_help']:.2f}x import torch)",
          f"python -m engine status {status_s:.3f} s  ({result['ratio_status']:.2f}x import torch)"],
         result, args.json)


if __name__ == "__main__":
    run_script(main)
