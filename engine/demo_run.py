"""The precomputed demo run shipped with the repo, so a first look at the app shows a whole story at once.

`engine/assets/demo-run/<run_id>/run.sqlite` is a finished run of the bundled demo model with the
default settings: 256 stratified masks, the surrogate fit, contributions, the decision for k = 4,
the summary, interactions and the cheap baselines, made by `scripts/build_demo_run.py` (rerun it after
changing the demo model or a default; tests/test_demo_run.py checks the shipped run still matches).
`install(cache_dir)` copies it into a cache once (never over a run already there); `make run` calls
`python -m engine demo-run` before opening the app, which then opens on it (engine.session).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from engine.config import ASSETS_DIR, default_cache_dir
from engine.errors import from_exception

DEMO_RUN_DIR = ASSETS_DIR / "demo-run"
DB_NAME = "run.sqlite"


def shipped() -> list[Path]:
    """The run folders shipped in engine/assets/demo-run (each holds one run.sqlite)."""
    if not DEMO_RUN_DIR.is_dir():
        return []
    return sorted(p for p in DEMO_RUN_DIR.iterdir() if (p / DB_NAME).is_file())


def install(cache_dir=None) -> dict:
    """Copy each shipped run into `cache_dir` unless a run of that id is there already.

    Returns {"installed": [run ids], "present": [run ids], "cache_dir": path}. Atomic per run: copied
    into a temporary folder inside the cache, then renamed into place."""
    cache = Path(cache_dir).resolve() if cache_dir is not None else default_cache_dir()
    installed, present = [], []
    for src in shipped():
        dest = cache / src.name
        if dest.exists():
            present.append(src.name)
            continue
        try:
            cache.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{src.name}.partial-", dir=cache))
            shutil.copy2(src / DB_NAME, tmp / DB_NAME)
            os.replace(tmp, dest)
        except OSError as e:
            raise (from_exception(e, path=cache, doing="installing the demo run") or e) from None
        installed.append(src.name)
    return {"installed": installed, "present": present, "cache_dir": str(cache)}
