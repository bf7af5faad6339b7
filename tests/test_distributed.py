"""Ray workers (engine/distributed.py) on a local 2-CPU Ray cluster with tiny models.

One Ray cluster for the module (started once); every RayEvaluator starts its own 2 actors. Checks:
equality with one process, an actor killed mid-run (restarted by Ray; dead for good: requeued),
cancel and resume through pipeline.sample, a killed driver (CLI subprocess) resumed, and the
subtree split the workers receive.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_llama, write_words

from engine.config import DataSpec, EvalSpec, ModelSpec, RunSpec, SamplingSpec
from engine.evaluate import MaskEvaluator, count_prefix_computations
from engine.fidelity import count_work
from engine.mask_order import split_subtrees
from engine.sampling import sample_masks

ray = pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parents[1]
N_LAYERS = 6


@pytest.fixture(scope="module")
def cluster():
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": env})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    save_tiny_llama(root / "tiny6", n_layers=N_LAYERS, seed=3)
    write_words(root / "words.txt", 3000)
    return root


@pytest.fixture(scope="module")
def lm(files):
    from engine.models import load_model

    return load_model(ModelSpec(name=str(files / "tiny6")))


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, 16), generator=g)  # (n, T)


def masks_for_test(n: int = 48) -> np.ndarray:
    rng = np.random.default_rng(1)
    m = rng.random((n, N_LAYERS)) < 0.65
    m[0], m[1], m[3] = True, False, m[2]  # full, empty, a duplicate
    return m


# ------------------------------------------------------------------ the split (no Ray)


def test_split_subtrees_partitions_into_whole_subtrees():
    masks = sample_masks(SamplingSpec(n_masks=256, seed=0), 16)
    groups = split_subtrees(masks, 16)
    assert 16 <= len(groups) < 16 + 16  # one split adds up to L - 1 groups
    assert sorted(i for g in groups for i in g) == list(range(256))
    whole = count_prefix_computations(masks)
    split = sum(count_prefix_computations(masks[g]) for g in groups)
    assert whole <= split <= 1.05 * whole  # only the groups' own prefixes are recomputed
    # Whole subtrees: a group's masks share a prefix that no mask of another group has.
    seqs = [tuple(np.flatnonzero(m)) for m in masks]
    for g in groups:
        common = min(len(seqs[i]) for i in g)
        while len({seqs[i][:common] for i in g}) > 1:
            common -= 1
        prefix = seqs[g[0]][:common]
        others = [i for h in groups if h is not g for i in h]
        assert not any(seqs[i][:common] == prefix and len(seqs[i]) > common for i in others)
    assert split_subtrees(masks, 1) == [list(range(256))]
    same = np.ones((5, 4), dtype=bool)
    assert split_subtrees(same, 4) == [[0, 1, 2, 3, 4]]  # identical masks cannot be split


def test_driver_model_has_no_weights_but_the_same_identity(files, lm):
    from engine.distributed import driver_model

    skeleton = driver_model(ModelSpec(name=str(files / "tiny6")))
    assert skeleton.identity == lm.identity and skeleton.n_layers == lm.n_layers == N_LAYERS
    assert {p.device.type for p in skeleton.model.parameters()} == {"meta"}
    assert skeleton.tokenizer("a b").input_ids == lm.tokenizer("a b").input_ids


def test_open_evaluator_without_workers_is_the_plain_evaluator(lm, ids):
    from engine.distributed import open_evaluator

    with open_evaluator(lm, ids, EvalSpec(batch_masks=True)) as ev:
        assert type(ev) is MaskEvaluator and ev.batch_masks


# ------------------------------------------------------------------ the evaluator on Ray


@pytest.fixture(scope="class")
def evaluator(cluster, lm, ids):
    """One RayEvaluator (2 actors) shared by the tests of TestTwoWorkers, which run in file order;
    closed after them, so its actors free their CPUs for the pipeline tests."""
    from engine.distributed import RayEvaluator

    with RayEvaluator(lm, ids, EvalSpec(workers=2), tasks_per_worker=8) as ev:
        yield ev


@pytest.fixture(scope="module")
def want(lm, ids):
    return MaskEvaluator(lm, ids).perplexities(masks_for_test())


def _collect(ev, masks, on_first=None) -> np.ndarray:
    got = np.full(len(masks), np.nan)
    for n, (i, p, _) in enumerate(ev.iter_perplexities(masks)):
        if n == 0 and on_first:
            on_first()
        assert np.isnan(got[i])  # every index exactly once
        got[i] = p
    return got


class TestTwoWorkers:
    def test_two_workers_equal_one_process(self, evaluator, want):
        masks = masks_for_test()
        ev = evaluator
        assert ev.ppl_full == pytest.approx(want[0], rel=1e-6)
        np.testing.assert_allclose(_collect(ev, masks), want, rtol=1e-6)
        assert ev.pids == {i["pid"] for i in ev.info}  # both workers evaluated subtrees
        # Sharing stays inside each subtree: exactly the layer calls of the split, no more.
        assert ev.layer_calls == sum(count_prefix_computations(masks[g]) for g in split_subtrees(masks, 16))
        groups = split_subtrees(masks, 16)  # the work counter: the same definition as one process's
        assert ev.leaves == sum(len(np.unique(masks[g], axis=0)) for g in groups)
        W, T = ev._shape
        assert ev.work == sum(count_work(masks[g], W, T) for g in groups)

    def test_rows_carry_the_per_window_losses_of_one_process(self, evaluator, lm, ids):
        masks = masks_for_test()
        one = MaskEvaluator(lm, ids)
        want_nll, want_tok = one.window_losses(masks)
        nll, tok = evaluator.window_losses(masks)
        np.testing.assert_allclose(nll, want_nll, rtol=1e-6)
        np.testing.assert_array_equal(tok, want_tok)
        full_nll, full_tok = evaluator.full_window_losses()
        np.testing.assert_allclose(full_nll, one.full_window_losses()[0], rtol=1e-6)
        np.testing.assert_array_equal(full_tok, one.full_window_losses()[1])

    def test_actor_killed_mid_run_is_restarted_by_ray(self, evaluator, want):
        ev = evaluator
        victim = ev.info[0]["pid"]
        got = _collect(ev, masks_for_test(), on_first=lambda: ray.kill(ev.actors[0], no_restart=False))
        np.testing.assert_allclose(got, want, rtol=1e-6)
        # Ray restarted the actor in a new process and retried its unfinished task there.
        assert len(ev.pids - {victim, ev.info[1]["pid"]}) == 1 and ev.requeued == 0

    def test_actor_dead_for_good_has_its_subtrees_requeued(self, evaluator, want):
        ev = evaluator
        got = _collect(ev, masks_for_test(), on_first=lambda: ray.kill(ev.actors[0], no_restart=True))
        np.testing.assert_allclose(got, want, rtol=1e-6)
        assert ev.requeued >= 1 and ev._alive == [False, True]




# ------------------------------------------------------------------ through pipeline.sample


def _spec(files, n: int) -> RunSpec:
    return RunSpec(model=ModelSpec(name=str(files / "tiny6")),
                   data=DataSpec(source=str(files / "words.txt"), n_windows=2, seq_len=16),
                   sampling=SamplingSpec(n_masks=n, strata=(5, 4, 3), seed=0))


def _rows(store) -> dict[str, float]:
    return {s.mask: s.ppl for s in store.results()}


def test_cancel_then_resume_matches_one_process(cluster, files, tmp_path, monkeypatch):
    from engine import pipeline, store as store_mod

    spec = _spec(files, 40)
    ref = pipeline.sample(spec, tmp_path / "one", progress=False)
    want = _rows(pipeline.open_run(spec, tmp_path / "one").store)
    assert ref.total == 40 and len(want) == 40

    original_add = store_mod.Writer.add
    added = []

    def add_then_cancel(self, *args, **kwargs):  # a user pressing Cancel after the 3rd stored mask
        rowid = original_add(self, *args, **kwargs)
        added.append(rowid)
        if len(added) == 3:
            self.store.request_cancel()
        return rowid

    monkeypatch.setattr(store_mod.Writer, "add", add_then_cancel)
    first = pipeline.sample(spec, tmp_path / "ray", progress=False, evaluation=EvalSpec(workers=2))
    assert first.stopped == "cancelled" and first.evaluated == 3 and first.total == 3
    monkeypatch.setattr(store_mod.Writer, "add", original_add)

    # Resumed here in one process (the store is the same either way; test_killed_driver_resumes
    # resumes with Ray workers).
    resumed = pipeline.sample(spec, tmp_path / "ray", progress=False)
    assert resumed.stopped is None and resumed.evaluated == 37 and resumed.total == 40
    got = _rows(pipeline.open_run(spec, tmp_path / "ray").store)
    assert got.keys() == want.keys()
    np.testing.assert_allclose([got[k] for k in want], [want[k] for k in want], rtol=1e-6)
    # the rows the workers stored carry their per-window losses, as the in-process rows do
    t_one, t_ray = (pipeline.open_run(spec, tmp_path / d).store.table() for d in ("one", "ray"))
    order = {m.tobytes(): i for i, m in enumerate(t_one.masks)}
    idx = [order[m.tobytes()] for m in t_ray.masks]
    assert not np.isnan(t_ray.window_nll).any()
    np.testing.assert_allclose(t_ray.window_nll, t_one.window_nll[idx], rtol=1e-6)
    assert resumed.ppl_full == pytest.approx(ref.ppl_full, rel=1e-6)


def test_killed_driver_resumes(cluster, files, tmp_path):
    """`engine sample --workers 2 --ray-address ADDR` (joining this module's cluster) killed with SIGKILL
    mid-run; the same command resumes and finishes (with one remote worker: cheaper to start here)."""
    cache = tmp_path / "cache"
    address = ray.get_runtime_context().gcs_address
    argv = [sys.executable, "-m", "engine", "sample", "--model", str(files / "tiny6"), "--data",
            str(files / "words.txt"), "--windows", "2", "--seq-len", "16", "--strata", "5,4,3", "--masks", "40",
            "--workers", "2", "--ray-address", address, "--single-pass", "--threads", "1",
            "--cache-dir", str(cache), "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    slow = {**env, "LAYERPRUNE_TEST_TASK_DELAY_S": "0.3"}  # each subtree task sleeps: time to kill mid-run
    proc = subprocess.Popen(argv, cwd=ROOT, env=slow, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    db = None
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            found = list(cache.glob("*/run.sqlite"))
            if found:
                db = found[0]
                with sqlite3.connect(db) as con:
                    ready = con.execute("SELECT 1 FROM sqlite_master WHERE name = 'samples'").fetchone()
                    if ready and con.execute("SELECT COUNT(*) FROM samples").fetchone()[0] >= 1:  # not while
                        break  # the store is still being created (the file exists before its tables)
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and anything it started in its session
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    with sqlite3.connect(db) as con:
        before = con.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
    assert 1 <= before < 40
    # Resumed by one remote worker on the same cluster (--workers 1 --ray-address still uses Ray).
    argv[argv.index("--workers") + 1] = "1"
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["total"] == 40 and result["evaluated"] == 40 - before and result["stopped"] is None
