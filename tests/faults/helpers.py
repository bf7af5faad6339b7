"""Helpers of the fault matrix: tiny saved models, CLI runners that count tracebacks, mounts.

Every case records what `python -m bench.faults` reports: `samples_lost` (rows committed before
a fault and missing after the recovery), `tracebacks` (Python tracebacks printed by any
command the case ran) and `wrong_results` (a command that exited 0 where it should have refused:
a model or number it should not have produced). With $LAYERPRUNE_FAULTS_REPORT set, one JSON line per test goes there.
Full disks and read-only caches use a tmpfs mount when this process may mount (root, Linux),
and otherwise the patched variants of the same cases.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import byte_tokenizer, family_config

ROOT = Path(__file__).resolve().parents[2]
TEXT = " ".join(f"The quick brown fox number {i} jumps over the lazy dog near the river." for i in range(200))
# 4 layers, 2 windows x 16 tokens: each CLI step is about a second in-process.
BASE = ["--windows", "2", "--seq-len", "16", "--threads", "1", "--json"]
FAST_FIT = ["--ensemble", "1"]


def save_llama(folder: Path, n_layers: int = 4, seed: int = 0, tokenizer: bool = True, nan_at: str | None = None):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config("llama", n_layers))
    if nan_at is not None:
        with torch.no_grad():
            model.get_parameter(nan_at).view(-1)[0] = float("nan")
    model.save_pretrained(folder)
    if tokenizer:
        byte_tokenizer().save_pretrained(folder)
    return folder


def model_args(models: Path, name: str = "llama4") -> list[str]:
    return ["--model", str(models / name), "--data", str(models / "text.txt"), *BASE]


class Record:
    """What one fault case reports (see the module docstring)."""

    def __init__(self):
        self.samples_lost = 0
        self.tracebacks = 0
        self.wrong_results = 0  # commands that exited 0 with a model or number they should not have produced
        self.commands = 0

    def saw(self, *texts: str) -> None:
        self.commands += 1
        self.tracebacks += sum(t.count("Traceback (most recent call last)") for t in texts if t)


def last_json(out: str):
    lines = [line for line in out.strip().splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def spawn(argv, record: Record | None = None, **kw) -> subprocess.Popen:
    """`python -m engine *argv` as a child process (one torch thread), stdout/stderr piped."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "engine", *map(str, argv)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def finish(proc: subprocess.Popen, record: Record, timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    record.saw(out, err)
    return proc.returncode, out, err


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, poll: float = 0.005) -> bool:
    """Poll until predicate() is true; False on timeout or when proc ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return bool(predicate())
        time.sleep(poll)
    return False


def rows(db: Path) -> list[tuple]:
    """(rowid, mask, score, created) of every stored sample, read-only."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute("SELECT rowid, mask, score, created FROM samples ORDER BY rowid").fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


def count_rows(db: Path) -> int:
    try:
        return len(rows(db))
    except sqlite3.Error:
        return 0


def lease_status(db: Path):
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = con.execute("SELECT status FROM lease").fetchone()
        return row[0] if row else None
    finally:
        con.close()


def verify_children(marker: str) -> list[int]:
    """Pids of running export-check processes whose command line mentions `marker`."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().decode(errors="replace")
            state = next((l for l in (p / "status").read_text().splitlines() if l.startswith("State:")), "")
        except OSError:
            continue
        if "_verify_export.py" in cmd and marker in cmd and "zombie" not in state:
            pids.append(int(p.name))
    return pids


# ------------------------------------------------------------------ mounts (tmpfs when permitted)
def _can_mount() -> bool:
    return sys.platform.startswith("linux") and os.geteuid() == 0 and shutil.which("mount") is not None


@contextlib.contextmanager
def tmpfs(path: Path, size_kib: int):
    """A tmpfs of `size_kib` KiB at `path` (unmounted afterwards); pytest.skip if mounting is not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    if not _can_mount():
        pytest.skip("mounting a tmpfs needs root on Linux; the patched variant of this case runs instead")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({proc.stderr.strip()}); the patched variant runs")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount_read_only(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True)


def fill(path: Path) -> Path:
    """Fill the file system holding `path` to the last byte; returns the filler (delete it to free space)."""
    filler = path / "filler.bin"
    with open(filler, "wb", buffering=0) as fh:  # unbuffered: nothing left to flush at close
        for size in (65536, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while fh.write(b"\0" * size):
                    pass
    return filler
