"""Multi-fidelity and active sampling in the engine: the evaluator's work counter, partial rows and
their completion, rounds that resume after a kill, and the stage-2 functions on such runs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from engine import fidelity
from engine.config import RunSpec, SamplingSpec
from engine.evaluate import MaskEvaluator
from engine.store import RunStore

META = {"model": "tiny", "data": "t.txt", "n_layers": 8, "model_identity": "abc", "data_hash": "d"}


# ---------------------------------------------------------------- work counter


def _layer_call_counter(lm):
    """Forward hooks on every decoder layer: counts[0] = layer forwards seen (each on all windows)."""
    counts = [0]
    handles = [layer.register_forward_hook(lambda *a: counts.__setitem__(0, counts[0] + 1))
               for layer in lm.adapter.layers(lm.model)]
    return counts, handles


@pytest.mark.parametrize("n_layers", [3, 6])
@pytest.mark.parametrize("batch_masks", [False, True])
def test_work_counter_equals_count_work_and_the_real_layer_calls(tiny_lm, tiny_windows, n_layers, batch_masks):
    lm = tiny_lm("llama", n_layers=n_layers)
    rng = np.random.default_rng(n_layers)
    masks = rng.random((12, n_layers)) < 0.6  # (12, L)
    masks = np.vstack([masks, masks[:3], np.zeros((1, n_layers), bool), np.ones((1, n_layers), bool)])  # dups, empty
    ev = MaskEvaluator(lm, tiny_windows, batch_masks=batch_masks, batch_states=64)
    counts, handles = _layer_call_counter(lm)  # after the recording forward, which is not counted
    try:
        ev.perplexities(masks)
    finally:
        for h in handles:
            h.remove()
    W, T = tiny_windows.input_ids.shape
    distinct = len(np.unique(masks, axis=0))
    assert ev.leaves == distinct
    assert ev.layer_calls == counts[0] if not batch_masks else ev.batched_calls == counts[0]
    assert ev.work == fidelity.count_work(masks, W, T) == (ev.layer_calls + distinct) * W * T


def test_work_counter_without_prefix_sharing_counts_every_kept_layer(tiny_lm, tiny_windows):
    lm = tiny_lm("llama", n_layers=4)
    masks = np.array([[1, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=bool)
    ev = MaskEvaluator(lm, tiny_windows, prefix_sharing=False)
    counts, handles = _layer_call_counter(lm)
    try:
        ev.perplexities(masks)
    finally:
        for h in handles:
            h.remove()
    assert ev.layer_calls == counts[0] == 7 and ev.leaves == 3
    W, T = tiny_windows.input_ids.shape
    assert ev.work == fidelity.work(7, 3, W, T)


# ---------------------------------------------------------------- partial rows, completion


def _windows(n: int, seq_len: int = 16, seed: int = 0):
    from engine.data import Windows

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (n, seq_len), generator=g)  # (n, T)
    return Windows(input_ids=ids, data_hash="tiny", source="random", n_tokens=ids.numel())


def _run(tmp_path, lm, windows, sampling: SamplingSpec, run_id: str = "r"):
    from engine import pipeline

    spec = RunSpec(sampling=sampling)
    store = RunStore.open(tmp_path, run_id, {**META, "n_layers": lm.n_layers})
    return spec, pipeline.OpenRun(spec=spec, lm=lm, windows=windows, run_id=run_id, store=store)


def test_completed_partial_rows_equal_a_full_evaluation(tmp_path, tiny_lm):
    """--first-windows 2 --complete 0.5: rows are partial (2 of 5 windows, `fidelity.first_windows` of the
    mask) or complete; every complete row has exactly the per-window losses and perplexity of a full
    evaluation (rtol 1e-6), every partial row those of its own windows."""
    from engine import pipeline

    lm, windows = tiny_lm("llama", n_layers=6), _windows(5)
    spec, run = _run(tmp_path, lm, windows, SamplingSpec(n_masks=20, first_windows=2, complete=0.5))
    result = pipeline.sample(spec, tmp_path, progress=False, run=run)
    t = run.store.table()
    done = fidelity.evaluated(t.window_tokens)  # (n, W)
    complete = done.all(axis=1)
    assert result.evaluated == 20 and result.completed == complete.sum() == 10 and result.partial == 10
    from engine.sampling import masks_to_strings

    own = fidelity.first_windows(masks_to_strings(t.masks), 5, 2, spec.sampling.seed)
    for i in np.flatnonzero(~complete):  # partial: the mask's own 2 windows
        assert np.flatnonzero(done[i]).tolist() == list(own[i])
    assert len({own[i] for i in np.flatnonzero(~complete)}) > 1  # spread over several window sets
    assert result.work == run.store.summary().work == t.work.sum() > 0
    full_nll, full_tok = MaskEvaluator(lm, windows).window_losses(t.masks)
    np.testing.assert_allclose(t.window_nll[complete], full_nll[complete], rtol=1e-6)
    np.testing.assert_allclose(t.ppl[complete], np.exp(full_nll[complete].sum(1) / full_tok[complete].sum(1)),
                               rtol=1e-6)
    part = done & ~complete[:, None]  # (n, W): the partial rows' evaluated windows
    np.testing.assert_allclose(t.window_nll[part], full_nll[part], rtol=1e-6)
    p = part[~complete]
    ppl_sub = np.exp(np.where(p, full_nll[~complete], 0).sum(1) / np.where(p, full_tok[~complete], 0).sum(1))
    np.testing.assert_allclose(t.ppl[~complete], ppl_sub, rtol=1e-6)
    # the stage-2 record: estimated scores for partial rows, stored ppl kept, complete rows exact
    s = pipeline.samples(run)
    assert s.complete.tolist() == complete.tolist() and (s.se[complete] == 0).all() and (s.se[~complete] > 0).all()
    np.testing.assert_array_equal(s.scores[complete], t.score[complete])
    np.testing.assert_array_equal(s.ppl, t.ppl)
    assert (s.weights[complete] == 1).all() and (s.weights[~complete] < 1).all()
    # resuming a finished run evaluates nothing
    again = pipeline.sample(spec, tmp_path, progress=False, run=run)
    assert again.evaluated == again.completed == again.work == 0 and again.total == 20


def test_default_options_keep_run_ids_and_rows_as_before(tmp_path, tiny_lm, tiny_windows):
    """New sampling fields at their defaults change neither the run id nor the stored numbers."""
    from engine import pipeline

    ident = RunSpec().identity("m", "d")
    assert set(ident["sampling"]) == {"scheme", "strata", "remove_range", "paired", "seed"}
    assert RunSpec(sampling=SamplingSpec(complete=0.5, explore=0.1)).run_id("m", "d") == RunSpec().run_id("m", "d")
    assert RunSpec(sampling=SamplingSpec(rounds=2)).run_id("m", "d") != RunSpec().run_id("m", "d")
    lm = tiny_lm("llama", n_layers=4)
    spec, run = _run(tmp_path, lm, tiny_windows, SamplingSpec(n_masks=6))
    pipeline.sample(spec, tmp_path, progress=False, run=run)
    t = run.store.table()
    ppl = MaskEvaluator(lm, tiny_windows).perplexities(t.masks)
    np.testing.assert_allclose(t.ppl, ppl, rtol=1e-12)
    np.testing.assert_allclose(t.score, run.store.meta()["ppl_full"] / ppl, rtol=1e-12)
    assert set(t.source) == {"design"} and set(t.round) == {0} and (t.windows == tiny_windows.input_ids.shape[0]).all()


# ---------------------------------------------------------------- active rounds


def _cancel_after(monkeypatch, n: int):
    """The app's Cancel button, pressed once the store holds n rows."""
    from engine.store import Writer

    original = Writer.add

    def add_then_cancel(self, *args, **kwargs):
        rowid = original(self, *args, **kwargs)
        if rowid == n:
            assert RunStore.open(self.store.cache_dir, self.store.run_id).request_cancel()
        return rowid

    monkeypatch.setattr(Writer, "add", add_then_cancel)


def _plans(store) -> list:
    return [store.get_artifact(f"round:{r}") for r in range(3)]


@pytest.mark.timeout(900)  # committee fits (5 MLPs per round): minutes on a loaded 2-core machine
def test_active_rounds_are_reproducible_and_resume_after_a_kill(tmp_path, tiny_lm, monkeypatch):
    """rounds=3: round 0 is the design's first third, rounds 1-2 mix design and active masks; a run
    cancelled inside round 1 resumes with the same plans and ends with the same rows as one that ran
    through; both-mode rows (first_windows) are a mix of partial and complete rows."""
    from engine import pipeline
    from engine.sampling import masks_to_strings

    lm, windows = tiny_lm("llama", n_layers=8), _windows(3)
    # rounds of 12 masks: the committee's MLPs get an early-stopping slice (below 10 masks they would
    # train for max_steps), which keeps this test fast
    sampling = SamplingSpec(n_masks=36, rounds=3, explore=0.25, first_windows=1, complete=0.5, seed=3)
    spec, run_a = _run(tmp_path / "a", lm, windows, sampling)
    a = pipeline.sample(spec, tmp_path / "a", progress=False, run=run_a)
    assert a.evaluated == 36 and a.stopped is None and a.rounds == {0: {"masks": 12, "active": 0},
                                                                  1: {"masks": 12, "active": 9},
                                                                  2: {"masks": 12, "active": 9}}
    plans = _plans(run_a.store)
    assert [p["source"].count("active") for p in plans] == [0, 9, 9]
    ta = run_a.store.table()
    complete = fidelity.evaluated(ta.window_tokens).all(axis=1)
    assert 0 < complete.sum() < 36 and a.partial == (~complete).sum()  # a mix of partial and complete rows

    _cancel_after(monkeypatch, 17)  # stops in round 1, after 5 of its masks
    _, run_b = _run(tmp_path / "b", lm, windows, sampling)
    b = pipeline.sample(spec, tmp_path / "b", progress=False, run=run_b)
    assert b.stopped == "cancelled" and run_b.store.count() == 17
    assert run_b.store.get_artifact("round:1") == plans[1] and run_b.store.get_artifact("round:2") is None
    monkeypatch.undo()
    b = pipeline.sample(spec, tmp_path / "b", progress=False, run=run_b)
    assert b.stopped is None and _plans(run_b.store) == plans
    tb = run_b.store.table()
    def rows(t):
        return sorted(zip(masks_to_strings(t.masks), t.round.tolist(), t.source.tolist(), t.windows.tolist()))

    assert rows(tb) == rows(ta)


@pytest.mark.timeout(900)  # committee fits (5 MLPs per round): minutes on a loaded 2-core machine
def test_samples_of_an_active_run_feed_fit_and_the_design_only_correction(tmp_path, tiny_lm):
    """method.fit takes the fit weights and holds out complete rows only; the regression-adjusted
    estimator fits on every row but corrects with the complete design rows (details n_train_only)."""
    from engine import estimators, method, pipeline
    from engine.config import MethodSpec, SurrogateSpec

    lm, windows = tiny_lm("llama", n_layers=6), _windows(3)
    sampling = SamplingSpec(n_masks=30, rounds=2, first_windows=1, complete=0.5, seed=1)
    spec, run = _run(tmp_path, lm, windows, sampling)
    pipeline.sample(spec, tmp_path, progress=False, run=run)
    s = pipeline.samples(run)
    assert set(s.source) == {"design", "active"} and s.design_rows.sum() < s.n
    f = method.fit(s, SurrogateSpec(ensemble=2), curve=False)
    test_rows = f.fitted.report.split.test
    assert len(test_rows) > 0 and s.complete[test_rows].all()
    c = method.contributions(s, f, MethodSpec(surrogate=SurrogateSpec(ensemble=2), boot=0))
    train_only = estimators.real_rows(s)["train_only"]  # active rows (and partial ones once enough are complete)
    assert train_only[~s.design_rows].all() and c.details["n_train_only"] == int(train_only.sum()) > 0
    assert np.isfinite(c.values).all()


def test_sampling_progress_and_the_cli_report_work_and_rounds(tmp_path, tiny_lm, capsys):
    from engine import pipeline
    from engine.terminal import sample_summary, status_summary

    lm, windows = tiny_lm("llama", n_layers=6), _windows(4)
    spec, run = _run(tmp_path, lm, windows, SamplingSpec(n_masks=12, first_windows=1, complete=0.5))
    result = pipeline.sample(spec, tmp_path, progress=False, run=run).to_json()
    p = pipeline.sampling_progress(run.store)
    assert p["n_masks"] == 12 and p["n_windows"] == 4 and p["complete"] == 6 and p["partial"] == 6
    assert p["rows"]["cumulative_work"][-1] == p["work"] == result["work"] == result["work_total"] > 0
    assert p["rounds"] == {0: {"masks": 12, "active": 0, "complete": 6, "work": p["work"]}}
    assert sorted(p["rows"]["windows"]) == [1] * 6 + [4] * 6
    assert "work:" in sample_summary(result) and "6 stay evaluated" in sample_summary(result)
    status = pipeline.status(tmp_path)
    assert status[0]["work"] == p["work"] and status[0]["partial"] == 6
    assert "6 partial rows" in status_summary({"runs": status})


@pytest.mark.timeout(900)  # committee fits (5 MLPs per round): minutes on a loaded 2-core machine
def test_cli_sample_and_run_with_fidelity_and_rounds(tmp_path, capsys):
    import json

    from conftest import save_tiny_llama, write_words
    from engine import cli

    model = save_tiny_llama(tmp_path / "m", n_layers=8)
    text = write_words(tmp_path / "t.txt", 3000)
    common = ["--model", str(model), "--data", str(text), "--windows", "3", "--seq-len", "16",
              "--first-windows", "2", "--complete", "0.25", "--cache-dir", str(tmp_path / "c"), "--json"]
    assert cli.main(["sample", *common, "--masks", "16", "--rounds", "4"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["evaluated"] == 16 and out["work"] > 0 and out["completed"] == 4 and out["partial"] == 12
    assert {int(k): v["masks"] for k, v in out["rounds"].items()} == {0: 4, 1: 4, 2: 4, 3: 4}
    # the paper's estimator: on 24 masks the regression adjustment has too few complete design rows to cross-fit
    assert cli.main(["run", *common, "--masks", "24", "--rounds", "2", "--remove", "1", "--ensemble", "2",
                     "--boot", "0", "--n-verify", "1", "--estimator", "paper", "--budget", "900"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["n_masks"] == 24 and out["sampling"]["work"] > 0 and len(out["removed"]) == 1
    assert cli.main(["status", "--cache-dir", str(tmp_path / "c"), "--json"]) == 0
    runs = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"]
    assert {r["n_samples"] for r in runs} == {16, 24} and all(r["work"] > 0 for r in runs)


def test_bad_fidelity_and_round_settings_are_refused_before_any_model_is_loaded(tmp_path):
    from engine import pipeline, validate
    from engine.config import DataSpec, EvalSpec, SpecError
    from engine.errors import InputError, WorkbenchError

    for bad in (dict(first_windows=-1), dict(rounds=0), dict(complete=1.5), dict(explore=-0.1)):
        with pytest.raises(SpecError, match=next(iter(bad)).replace("_", " ")):
            SamplingSpec(**bad)
    spec = RunSpec(data=DataSpec(n_windows=3), sampling=SamplingSpec(first_windows=3))
    with pytest.raises(InputError, match="--first-windows 3: the run has 3 calibration windows"):
        validate.check_run(spec)
    spec = RunSpec(sampling=SamplingSpec(first_windows=2))
    with pytest.raises(WorkbenchError, match="Ray workers"):
        pipeline.sample(spec, tmp_path, progress=False, evaluation=EvalSpec(workers=2))


# ---------------------------------------------------------------- weighted surrogate fits


def test_surrogates_take_sample_weights_and_hold_out_exact_rows_only():
    from engine.config import SurrogateSpec
    from engine.surrogate import Ensemble, RidgePairwiseSurrogate, split

    rng = np.random.default_rng(0)
    X = rng.random((60, 6)) < 0.5  # (60, 6)
    y = 0.2 + 0.1 * X.sum(axis=1) / 6 + 0.05 * X[:, 0]  # (60,)
    base = split(X, y, 0.2, 0)
    same = split(X, y, 0.2, 0, testable=np.ones(60, bool))
    assert base.test.tolist() == same.test.tolist() and base.train.tolist() == same.train.tolist()
    testable = np.arange(60) % 3 == 0
    sp = split(X, y, 0.2, 0, testable=testable)
    assert len(sp.test) > 0 and testable[sp.test].all() and len(sp.test) + len(sp.train) == 60
    # a zero-weight row counts as if it were not there (ridge), and down-weights a corrupted row (MLP)
    bad = y.copy()
    bad[5] = 0.0
    w = np.ones(60)
    w[5] = 0.0
    keep = np.arange(60) != 5
    r_w = RidgePairwiseSurrogate().fit(X, bad, sample_weight=w)
    r_drop = RidgePairwiseSurrogate().fit(X[keep], bad[keep])
    np.testing.assert_allclose(r_w.predict(X), r_drop.predict(X), rtol=1e-6, atol=1e-9)
    spec = SurrogateSpec(ensemble=2)
    err_w = abs(Ensemble(spec).fit(X, bad, sample_weight=w).predict(X[5:6])[0] - y[5])
    err_1 = abs(Ensemble(spec).fit(X, bad).predict(X[5:6])[0] - y[5])
    assert err_w < err_1


def test_a_run_stopped_while_completing_finishes_its_completions(tmp_path, tiny_lm, monkeypatch):
    """Cancelled during the completions: the rerun evaluates no mask and completes the same planned rows;
    once finished, a rerun takes no writer lease at all."""
    from engine import pipeline
    from engine.sampling import masks_to_strings
    from engine.store import Writer

    original = Writer.complete

    def complete_then_cancel(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        RunStore.open(self.store.cache_dir, self.store.run_id).request_cancel()
        return out

    monkeypatch.setattr(Writer, "complete", complete_then_cancel)
    lm, windows = tiny_lm("llama", n_layers=6), _windows(4)
    spec, run = _run(tmp_path, lm, windows, SamplingSpec(n_masks=12, first_windows=1, complete=0.5))
    first = pipeline.sample(spec, tmp_path, progress=False, run=run)
    assert first.stopped == "cancelled" and first.evaluated == 12 and first.completed == 1
    monkeypatch.undo()
    plan = run.store.get_artifact("complete:0:12")
    again = pipeline.sample(spec, tmp_path, progress=False, run=run)
    assert again.evaluated == 0 and again.completed == 5 and again.partial == 6
    assert run.store.get_artifact("complete:0:12") == plan
    t = run.store.table()
    complete = dict(zip(masks_to_strings(t.masks), fidelity.evaluated(t.window_tokens).all(axis=1)))
    assert len(plan["masks"]) == 6 and all(complete[m] for m in plan["masks"])
    heartbeat = run.store.lease().heartbeat
    pipeline.sample(spec, tmp_path, progress=False, run=run)
    assert run.store.lease().heartbeat == heartbeat  # nothing left to do: no writer
