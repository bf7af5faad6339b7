"""Kills: SIGKILL of `python -m engine sample | run | prune` at seeded random points, and SIGTERM
(in-process: cli.main handles it like Ctrl-C).

After every kill: no committed sample is lost (samples_lost), rerunning recomputes nothing already
stored, the export folder is absent or complete and verified, no export-check child outlives its
parent, and the rerun leaves no temporary folder behind. Seeds: $LAYERPRUNE_FAULT_SEEDS (a
count, default 1; `python -m bench.faults --seeds N`).
"""

import json
import os
import random
import signal
import time

import pytest

from faults.helpers import (
    FAST_FIT, count_rows, finish, lease_status, model_args, rows, spawn, verify_children, wait_for,
)

SEEDS = int(os.environ.get("LAYERPRUNE_FAULT_SEEDS", "0"))
SAMPLE_SEEDS = range(SEEDS or 1)
OTHER_SEEDS = range(SEEDS or 1)
METHOD = [*FAST_FIT, "--estimator", "exact"]  # exact Shapley on 6 layers: no Monte Carlo, no numba compile


def _db(cache):
    found = list(cache.glob("*/run.sqlite"))
    return found[0] if found else None


def _kill(proc, sig=signal.SIGKILL):
    if proc.poll() is None:
        os.kill(proc.pid, sig)


def _check_export(out, record):
    """`out` is absent or a complete, verified export; returns True if present."""
    if not out.exists():
        return False
    manifest = json.loads((out / "pruning_manifest.json").read_text())
    assert manifest["verification"] and manifest["verification"]["ok"], manifest["verification"]
    missing = [f for f in manifest["files"] if not (out / f).is_file()]
    assert not missing, f"export lists files it does not hold: {missing}"
    return True


def _no_orphans(tmp_path):
    assert wait_for(lambda: not verify_children(str(tmp_path)), timeout=5), "an export-check child outlived its parent"


@pytest.mark.parametrize("seed", SAMPLE_SEEDS)
def test_sigkill_sample_at_a_random_mask(seed, models, tmp_path, cli, record):
    rng = random.Random(seed)
    target = rng.randint(1, 10)
    argv = ["sample", *model_args(models, "llama6"), "--masks", 12, "--cache-dir", tmp_path]
    proc = spawn(argv)
    try:
        reached = wait_for(lambda: _db(tmp_path) is not None and count_rows(_db(tmp_path)) >= target, 180, proc)
        time.sleep(rng.uniform(0, 0.05))
        _kill(proc)
    finally:
        finish(proc, record)
    assert reached, "the run ended before it could be killed"
    db = _db(tmp_path)
    before = rows(db)
    code, _, err, js = cli(*argv)
    assert code == 0 and js["total"] == 12 and js["evaluated"] == 12 - len(before), err
    after = rows(db)
    record.samples_lost += len(set(before) - set(after))
    assert after[: len(before)] == before  # same rows, same commit times: nothing recomputed


@pytest.fixture
def sampled(models, tmp_path, cli):
    """A cache holding a finished 12-mask run of the 6-layer model."""
    code, _, err, js = cli("sample", *model_args(models, "llama6"), "--masks", 12, "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    return tmp_path / "cache" / js["run_id"] / "run.sqlite"


# Where an export is killed: the temporary folder has the weights (right after save_pretrained),
# the export-check child runs, or the manifest is written (just before the rename); plus a delay.
EXPORT_POINTS = ("verifying", "weights", "manifest")  # seed i kills at point i % 3, after a random delay


@pytest.mark.parametrize("seed", OTHER_SEEDS)
def test_sigkill_prune_during_export(seed, models, tmp_path, sampled, cli, record):
    rng = random.Random(seed)
    point = EXPORT_POINTS[seed % 3]
    out = tmp_path / "pruned"
    argv = ["prune", *model_args(models, "llama6"), "--masks", 12, "--remove", 2, *METHOD,
            "--cache-dir", sampled.parent.parent, "--out", out]
    before = rows(sampled)

    def partial():
        return [p for p in tmp_path.glob(".pruned.partial-*") if p.is_dir()]

    events = {
        "weights": lambda: any((p / "model.safetensors").exists() for p in partial()),
        "verifying": lambda: bool(verify_children(str(tmp_path))),
        "manifest": lambda: any((p / "pruning_manifest.json").exists() for p in partial()),
    }
    proc = spawn(argv)
    try:
        seen = wait_for(events[point], 240, proc, poll=0.001)
        time.sleep(rng.uniform(0, 0.2))
        _kill(proc)
    finally:
        code, _, _ = finish(proc, record)
    # The manifest exists for microseconds before the rename: a kill there may land after it (a complete export).
    assert seen or (point == "manifest" and code == 0), f"the export ended before the '{point}' point"
    _no_orphans(tmp_path)
    present = _check_export(out, record)
    # Recovery: the same command again (with --overwrite when the export had completed).
    code, _, err, js = cli(*argv, *(["--overwrite"] if present else []))
    assert code == 0 and js["verification"]["ok"], err
    assert _check_export(out, record)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".pruned")] == []  # leftovers swept
    record.samples_lost += len(set(before) - set(rows(sampled)))


@pytest.mark.parametrize("seed", OTHER_SEEDS)
def test_sigkill_run_while_sampling_or_fitting(seed, models, tmp_path, cli, record):
    """Even seeds kill `run` at a random mask, odd seeds after sampling (fit, contributions, decide)."""
    rng = random.Random(100 + seed)
    target = rng.randint(1, 10) if seed % 2 == 0 else 12
    argv = ["run", *model_args(models, "llama6"), "--masks", 12, "--remove", 2, *METHOD, "--cache-dir", tmp_path]
    proc = spawn(argv)
    try:
        reached = wait_for(lambda: _db(tmp_path) is not None and count_rows(_db(tmp_path)) >= target, 180, proc)
        time.sleep(rng.uniform(0, 0.5) if seed % 2 else 0)
        _kill(proc)
    finally:
        code, _, _ = finish(proc, record)
    assert reached or code == 0
    db = _db(tmp_path)
    before = rows(db)
    code, _, err, js = cli(*argv)
    assert code == 0 and js["evaluated"] == 12 - len(before) and len(js["removed"]) == 2, err
    record.samples_lost += len(set(before) - set(rows(db)))


def _sigterm_self_when(predicate, timeout=240):
    """A thread that sends SIGTERM to this process once predicate() holds (cli.main handles it)."""
    import threading

    fired = threading.Event()

    def watch():
        if wait_for(predicate, timeout, poll=0.002):
            fired.set()
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()
    return fired


def test_sigterm_sample_stops_cleanly(models, tmp_path, cli, record):
    """In-process (cli.main installs the handler): SIGTERM after 2 masks."""
    argv = ["sample", *model_args(models, "llama6"), "--masks", 12, "--cache-dir", tmp_path]
    fired = _sigterm_self_when(lambda: _db(tmp_path) is not None and count_rows(_db(tmp_path)) >= 2)
    code, _, err, result = cli(*argv)
    assert fired.is_set()
    db = _db(tmp_path)
    assert code == 143, err
    assert result["stopped"] == "interrupted" and result["kind"] == "interrupted" and "SIGTERM" in result["message"]
    assert lease_status(db) == "cancelled"  # released: the next writer need not wait for it to expire
    before = rows(db)
    assert 2 <= len(before) < 12
    code, _, err, js = cli(*argv)
    assert code == 0 and js["evaluated"] == 12 - len(before)
    record.samples_lost += len(set(before) - set(rows(db)))


def test_sigterm_prune_while_verifying(models, tmp_path, sampled, cli, record):
    """In-process: SIGTERM while the export-check child runs; the child goes, nothing is left at --out."""
    out = tmp_path / "pruned"
    argv = ["prune", *model_args(models, "llama6"), "--masks", 12, "--remove", 2, *METHOD,
            "--cache-dir", sampled.parent.parent, "--out", out]
    fired = _sigterm_self_when(lambda: bool(verify_children(str(tmp_path))))
    code, _, err, js = cli(*argv)
    assert fired.is_set()
    assert code == 143, err
    assert js["kind"] == "interrupted" and "SIGTERM" in js["message"]
    _no_orphans(tmp_path)
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".pruned")] == []


def test_export_check_child_dies_with_its_parent(tmp_path):
    """The reload-check child is armed before its slow imports: killing the parent kills it."""
    import subprocess
    import sys

    from engine.export import VERIFY_SCRIPT

    parent = subprocess.Popen([sys.executable, "-c", (
        "import os, subprocess, sys, time\n"
        f"c = subprocess.Popen([sys.executable, {str(VERIFY_SCRIPT)!r}, {str(tmp_path / 'jobs.json')!r}, "
        f"{str(tmp_path / 'results.json')!r}, str(os.getpid())])\n"
        "print(c.pid, flush=True)\n"
        "time.sleep(120)\n")], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()

    def gone():
        try:
            state = open(f"/proc/{child}/status").read()
        except OSError:
            return True
        return "zombie" in state

    assert wait_for(gone, timeout=10), "the reload-check child outlived its killed parent"
    assert not (tmp_path / "results.json").exists()  # it died before doing anything
