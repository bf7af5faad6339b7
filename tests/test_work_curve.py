"""The quality-vs-work curve (uncertainty.work_curve, pipeline.work_curve): held-out quality of the
surrogate against the real evaluation work spent on the rows it was fitted on, rows in store order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.config import MethodSpec, RunSpec, SamplingSpec, SurrogateSpec
from engine.store import RunStore
from engine.uncertainty import work_curve

RIDGE = SurrogateSpec(kind="ridge-pairwise", ensemble=1)


def _game(n: int = 120, L: int = 8, seed: int = 0):
    """Masks with an additive score (a surrogate learns it as rows come in) and a work count per row."""
    rng = np.random.default_rng(seed)
    masks = rng.random((n, L)) < 0.7  # (n, L)
    weights = np.linspace(0.02, 0.2, L)  # (L,)
    scores = 0.2 + masks @ weights / weights.sum() * 0.8 + rng.normal(0, 0.01, n)  # (n,)
    work = rng.integers(100, 1000, n)  # (n,) token-layer calls per row
    return masks, scores, work


def test_points_are_store_order_prefixes_with_their_cumulative_work():
    from engine.surrogate import split

    masks, scores, work = _game()
    out = work_curve(masks, scores, work, RIDGE, level=0.9)
    sp = split(masks, scores, RIDGE.holdout, RIDGE.seed)
    train = np.sort(sp.train)
    assert out["order"] == "store" and out["n_test"] == len(sp.test) and out["work_total"] == work.sum()
    pts = out["points"]
    assert [p["train_masks"] for p in pts] == sorted({int(s) for s in np.geomspace(8, len(train), 5).round()})
    for p in pts:
        rows = train[:p["train_masks"]]  # the first training rows in store order
        assert p["rows_stored"] == rows[-1] + 1
        assert p["work"] == work[:rows[-1] + 1].sum()  # everything stored up to the last fitted row
        assert p["work_fitted"] == work[rows].sum() <= p["work"]
        assert p["n_test"] == len(sp.test)
        for k in ("r2", "spearman"):
            assert p[f"{k}_low"] <= p[k] + 1e-12 and p[k] <= p[f"{k}_high"] + 1e-12
    assert np.all(np.diff([p["work"] for p in pts]) > 0)
    assert pts[-1]["spearman"] > 0.9 and pts[-1]["r2"] > pts[0]["r2"]  # more work, a better surrogate here
    assert out == work_curve(masks, scores, work, RIDGE, level=0.9)  # seeded: the same curve again


def test_a_fit_already_made_on_a_points_rows_is_reused_for_that_point():
    """`reuse=(rows, model)`: the point whose training rows are exactly `rows` takes the model (the same curve
    when it is the fit that point would make); other rows are refitted."""
    from engine.surrogate import make_surrogate, split

    masks, scores, work = _game()
    train = np.sort(split(masks, scores, RIDGE.holdout, RIDGE.seed).train)
    full = make_surrogate(RIDGE).fit(masks[train], scores[train])
    calls = []

    class Counted:
        def predict(self, X):
            calls.append(len(X))
            return full.predict(X)

    out = work_curve(masks, scores, work, RIDGE, level=0.9, reuse=(train, Counted()))
    assert out == work_curve(masks, scores, work, RIDGE, level=0.9) and len(calls) == 1
    calls.clear()
    assert work_curve(masks, scores, work, RIDGE, level=0.9, reuse=(train[1:], Counted())) == out and not calls


def test_the_fits_first_member_is_reusable_only_where_it_is_a_plain_fit(monkeypatch):
    """method.Fit.first_member_fit: batched adam MLP kinds give (the split's training rows, members[0]); bootstrap
    kinds and the sequential path (surrogate.BATCHED_FITS off, the code before issue 23) give None."""
    from engine import method as method_lib, surrogate as sg

    masks, scores, _ = _game(60)
    s = method_lib.Samples(masks=masks, scores=scores, ppl=20.0 / scores, nonfinite=np.zeros(60, bool), ppl_full=20.0,
                           design=SamplingSpec())
    mlp = method_lib.fit(s, SurrogateSpec(kind="mlp", ensemble=2), curve=False)
    rows, member = mlp.first_member_fit()
    assert member is mlp.members[0] and list(rows) == list(mlp.fitted.report.split.train)
    assert method_lib.fit(s, RIDGE, curve=False).first_member_fit() is None
    monkeypatch.setattr(sg, "BATCHED_FITS", False)
    assert mlp.first_member_fit() is None


def test_testable_rows_only_are_held_out_and_no_work_gives_a_note():
    masks, scores, work = _game(60)
    testable = np.arange(60) % 2 == 0
    out = work_curve(masks, scores, work, RIDGE, testable=testable, sample_weight=np.where(testable, 1.0, 0.5))
    assert out["points"] and out["n_test"] <= testable.sum()
    empty = work_curve(masks, scores, np.zeros(60, int), RIDGE)
    assert empty["points"] == [] and "work" in empty["note"]
    with pytest.raises(Exception, match="one work count per mask"):
        work_curve(masks, scores, work[:10], RIDGE)


def test_pipeline_stores_the_curve_of_a_multi_fidelity_run_in_the_fit_artifact(tmp_path, tiny_lm):
    """(One round: an active run's committee fit takes minutes on a loaded machine; tests/test_app.py's
    adaptive run covers pipeline.work_curve on an active run.)"""
    from engine import pipeline
    from engine.data import Windows

    lm = tiny_lm("llama", n_layers=6)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (3, 16), generator=g)  # (W, T)
    windows = Windows(input_ids=ids, data_hash="tiny", source="random", n_tokens=ids.numel())
    spec = RunSpec(sampling=SamplingSpec(n_masks=24, first_windows=1, complete=0.5, seed=1))
    meta = {"model": "tiny", "data": "t", "n_layers": 6, "model_identity": "abc", "data_hash": "tiny"}
    store = RunStore.open(tmp_path, "r", meta)
    run = pipeline.OpenRun(spec=spec, lm=lm, windows=windows, run_id="r", store=store)
    pipeline.sample(spec, tmp_path, progress=False, run=run)
    method = MethodSpec(surrogate=RIDGE)
    pipeline.fit(run, method)
    out = pipeline.work_curve(run, method)
    stored = pipeline.stored(run, "fit", method)
    assert stored["work_curve"] == out and not stored["stale"]
    t = store.table()
    assert out["work_total"] == store.summary().work == t.work.sum() > 0
    assert out["n_masks"] == 24 and out["n_windows_evaluated"] == store.evaluated_windows()
    s = pipeline.samples(run)
    assert out["n_test"] == stored["report"]["split"]["n_test"]  # the fit's held-out rows
    last = out["points"][-1]
    assert last["work"] == t.work[:last["rows_stored"]].sum()
    assert last["train_masks"] == stored["report"]["split"]["n_train"] and s.complete is not None
