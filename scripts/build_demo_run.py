"""Build the precomputed demo run shipped in engine/assets/demo-run (see engine/demo_run.py).

Runs the whole method on the bundled demo model with the default settings, through the CLI, in a
temporary cache, then copies the run's store (one self-contained SQLite file, no WAL) into the assets:

    .venv/bin/python scripts/build_demo_run.py            # about 5-10 min on 2 CPU cores

Stages: `engine run --remove 4` (256 stratified masks, fit, contributions, the decision for k = 4,
export check), `fit` (its curves), `shapley --estimator exact`, `interactions`, `candidates --remove 4`, the cheap
baselines, and last `report --remove 4` (the Summary page). Rerun it whenever the demo model, the demo text
or a default that keys a stored result changes; tests/test_demo_run.py fails until then.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.demo_run import DB_NAME, DEMO_RUN_DIR  # noqa: E402

K = 4
# The summary comes last: the app opens on the settings of the run's latest result (engine.session), and
# the summary's are the defaults with k = 4; it also draws the baselines stored before it.
STEPS = [
    ("run", "--remove", str(K)),
    ("fit",),  # the Surrogate page's learning and quality-vs-work curves (`run` stores the fit without them)
    ("shapley", "--estimator", "exact"),
    ("interactions",),
    ("candidates", "--remove", str(K)),
    ("baselines", "--method", "block-influence,angular,ppl,last"),
    ("report", "--remove", str(K)),
]


def engine(cache: Path, work: Path, *argv: str) -> dict:
    extra = {"run": ("--out", str(work / "export")), "report": ("--out", str(work / "report.html"))}.get(argv[0], ())
    cmd = [sys.executable, "-m", "engine", *argv, *extra, "--cache-dir", str(cache), "--json"]
    t = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout.strip().splitlines()[-1:]}")
    print(f"{' '.join(argv):45} {time.time() - t:7.1f} s", flush=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache, work = Path(tmp) / "cache", Path(tmp) / "work"
        work.mkdir()
        run_id = engine(cache, work, *STEPS[0])["run_id"]
        for step in STEPS[1:]:
            engine(cache, work, *step)
        src = sqlite3.connect(cache / run_id / DB_NAME)
        if DEMO_RUN_DIR.exists():
            shutil.rmtree(DEMO_RUN_DIR)
        (DEMO_RUN_DIR / run_id).mkdir(parents=True)
        src.execute("VACUUM INTO ?", (str(DEMO_RUN_DIR / run_id / DB_NAME),))  # one file, no WAL, compacted
        src.close()
    size = (DEMO_RUN_DIR / run_id / DB_NAME).stat().st_size
    print(f"demo run {run_id}: {DEMO_RUN_DIR / run_id / DB_NAME} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
