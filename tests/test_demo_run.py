"""The precomputed demo run shipped in engine/assets/demo-run: still the run the defaults make, with the
results the app opens on, and installed into a cache once (scripts/build_demo_run.py rebuilds it)."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine import demo_run, pipeline, session
from engine.config import EvalSpec, MethodSpec, RunSpec
from engine.store import RunStore

ROOT = Path(__file__).resolve().parents[1]


def test_a_demo_run_is_shipped():
    assert [p.name for p in demo_run.shipped()], "no demo run in engine/assets/demo-run: run scripts/build_demo_run.py"


def test_the_shipped_run_is_the_one_the_defaults_make(tmp_path):
    """Fails when the demo model, its text or a default that keys the run changed: rebuild the demo run."""
    (shipped,) = demo_run.shipped()
    lm, windows = pipeline.load(RunSpec(), EvalSpec(threads=1))
    assert RunSpec().run_id(lm.identity, windows.data_hash) == shipped.name


def test_install_copies_once_and_the_app_opens_on_its_stored_results(tmp_path):
    (shipped,) = demo_run.shipped()
    first = demo_run.install(tmp_path)
    assert first["installed"] == [shipped.name] and demo_run.install(tmp_path)["present"] == [shipped.name]
    store = RunStore(tmp_path, shipped.name)
    assert store.count() >= 256 and not store.read_only()
    got = session.restore(tmp_path, {})
    assert got.run_id == shipped.name and got.method.remove == 4
    for stage in ("fit", "contributions", "decisions", "summary"):  # what every page shows without a click
        assert pipeline.stored(store, stage, got.method) is not None, stage
        assert not pipeline.stored(store, stage, got.method)["stale"], stage
    assert got.method == dataclasses.replace(MethodSpec(), remove=4)  # the defaults, so the pages' inputs match
    fit = pipeline.stored(store, "fit", got.method)
    assert fit.get("work_curve") and fit.get("learning_curve"), "the Surrogate page's curves: rebuild the demo run"


def test_engine_demo_run_command(tmp_path):
    out = subprocess.run([sys.executable, "-m", "engine", "demo-run", "--cache-dir", str(tmp_path), "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["installed"] == [p.name for p in demo_run.shipped()]
    human = subprocess.run([sys.executable, "-m", "engine", "demo-run", "--cache-dir", str(tmp_path)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert human.returncode == 0 and "present" in human.stdout
    bad = tmp_path / "file"
    bad.write_text("x")
    failed = subprocess.run([sys.executable, "-m", "engine", "demo-run", "--cache-dir", str(bad / "c"), "--json"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 5 and "error" in json.loads(failed.stdout.strip().splitlines()[-1])
