"""Surrogates on a synthetic layer-pruning game: fit, determinism, split, diagnostics, ensembles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.config import SurrogateSpec
from engine.errors import EstimationError
from engine.shapley import flip_values, restricted_strata_semivalue
from engine.flip_kernel import FACTORED_MAX_WEIGHT, FLIP_CALL
from engine.surrogate import (
    SCORE_FLOOR,
    Ensemble,
    compare,
    diagnose,
    fit_with_diagnostics,
    learning_curve,
    make_surrogate,
    metrics,
    split,
)

L = 12
FAST = {"max_steps": 400}  # adam options that keep unit tests quick


def pruning_game(seed: int = 0):
    """score = sigmoid of a pairwise game; layer 0 dominant, like a real LM's first layer."""
    rng = np.random.default_rng(seed)
    a = np.abs(rng.normal(0.5, 0.3, L))
    a[0] = 4.0
    B = np.triu(rng.normal(0, 0.15, (L, L)), 1)

    def score(m):
        x = np.asarray(m, dtype=float)
        return 1.0 / (1.0 + np.exp(-(x @ a + np.einsum("ni,ij,nj->n", x, B, x) - a.sum() + 2.0)))

    return score


def stratified_masks(n: int, seed: int, strata=(11, 10, 9, 8, 7, 6)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k = np.array(strata)[np.arange(n) % len(strata)]
    return np.argsort(rng.random((n, L)), axis=1).argsort(axis=1) < k[:, None]


@pytest.fixture(scope="module")
def data():
    score = pruning_game()
    X = stratified_masks(240, seed=1)
    Xt = stratified_masks(600, seed=2)
    return X, score(X), Xt, score(Xt)


@pytest.mark.parametrize(
    "spec,options",
    [
        (SurrogateSpec(kind="mlp", preset="adam"), FAST),
        (SurrogateSpec(kind="mlp", preset="paper"), {"epochs": 30}),
        (SurrogateSpec(kind="ridge-pairwise"), {}),
        (SurrogateSpec(kind="gbt"), {"max_iter": 50}),
        (SurrogateSpec(kind="log-pairwise"), {}),
        (SurrogateSpec(kind="mlp+log-pairwise"), FAST),
    ],
    ids=["mlp-adam", "mlp-paper", "ridge-pairwise", "gbt", "log-pairwise", "mlp+log-pairwise"],
)
def test_every_kind_fits_and_is_deterministic(data, spec, options):
    X, y, Xt, yt = data
    p1 = make_surrogate(spec, **options).fit(X, y).predict(Xt)
    p2 = make_surrogate(spec, **options).fit(X, y).predict(Xt)
    assert p1.shape == (len(Xt),) and p1.dtype == np.float64 and np.all(np.isfinite(p1))
    np.testing.assert_array_equal(p1, p2)  # same seed, same numbers
    if spec.kind != "mlp" or spec.preset == "adam":
        assert metrics(yt, p1).r2 > 0.8, spec
    if spec.kind in ("mlp", "mlp+log-pairwise"):
        p3 = make_surrogate(spec, seed=spec.seed + 1, **options).fit(X, y).predict(Xt)
        assert not np.array_equal(p1, p3)


def test_adam_preset_beats_paper_preset_at_64_masks(data):
    X, y, Xt, yt = data
    adam = make_surrogate(SurrogateSpec(preset="adam"), max_steps=1500).fit(X[:64], y[:64])
    paper = make_surrogate(SurrogateSpec(preset="paper")).fit(X[:64], y[:64])
    r2_adam, r2_paper = metrics(yt, adam.predict(Xt)).r2, metrics(yt, paper.predict(Xt)).r2
    assert r2_adam > 0.9 and r2_adam > r2_paper + 0.3
    assert adam.history["best_step"] <= adam.history["steps"] and adam.history["n_val"] > 0


def test_predict_is_chunked_and_vectorised():
    rng = np.random.default_rng(0)
    X = rng.random((40, 20)) < 0.5
    y = rng.random(40)
    big = rng.random((2**17 + 5, 20)) < 0.5  # more than two chunks
    for spec in (SurrogateSpec(kind="mlp"), SurrogateSpec(kind="ridge-pairwise")):
        model = make_surrogate(spec, **({"max_steps": 20} if spec.kind == "mlp" else {})).fit(X, y)
        out = model.predict(big)
        assert out.shape == (len(big),)
        np.testing.assert_allclose(out[-5:], model.predict(big[-5:]), rtol=1e-6)


@pytest.mark.parametrize("case", ["trained", "huge weights", "extreme pre-activations"])
def test_mlp_flip_values_equal_predict_on_the_flipped_masks(case):
    rng = np.random.default_rng(1)
    X, y = rng.random((64, L)) < 0.7, rng.random(64)
    model = make_surrogate(SurrogateSpec(kind="mlp"), max_steps=50).fit(X, y)
    with torch.no_grad():
        first, second = model.net.body[0], model.net.body[2]
        if case == "huge weights":  # beyond FACTORED_MAX_WEIGHT: the per-element exponential path
            first.weight.mul_(3 * FACTORED_MAX_WEIGHT / float(first.weight.abs().max()))
            second.weight.mul_(0.01)
        if case == "extreme pre-activations":  # |z0| > 60: the clamped exponentials
            first.bias.copy_(torch.tensor([80.0, -80.0] * L))
            second.weight.mul_(0.01)
    base = rng.random((FLIP_CALL + 3, L)) < 0.6  # a partial last call
    fast = model.flip_values(base)
    slow = flip_values(model.predict, base)  # builds the flipped masks and calls predict
    assert fast.shape == (len(base), L + 1)
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-6)
    assert np.ptp(slow[:, 1:]) > 1e-3  # the flips do change the prediction: the comparison means something


def test_surrogates_are_value_functions_and_the_paper_estimator_uses_the_kernel():
    rng = np.random.default_rng(2)
    X, y = rng.random((64, L)) < 0.7, rng.random(64)
    model = make_surrogate(SurrogateSpec(kind="mlp"), max_steps=50).fit(X, y)
    np.testing.assert_array_equal(model(X), model.predict(X))
    via_kernel = restricted_strata_semivalue(model, L, (10, 8), n_masks=4000, seed=0)
    via_predict = restricted_strata_semivalue(model.predict, L, (10, 8), n_masks=4000, seed=0)
    np.testing.assert_allclose(via_kernel.values, via_predict.values, rtol=0, atol=1e-7)
    ens = Ensemble(SurrogateSpec(kind="ridge-pairwise", ensemble=2)).fit(X, y)
    np.testing.assert_array_equal(ens(X), ens.predict(X))
    assert all(callable(m) for m in ens.value_functions())


def test_ridge_pairwise_recovers_a_pairwise_game():
    rng = np.random.default_rng(3)
    a, B = rng.normal(size=L), np.triu(rng.normal(size=(L, L)), 1)
    X = rng.random((300, L)) < 0.5
    y = X @ a + np.einsum("ni,ij,nj->n", X.astype(float), B, X.astype(float)) + 0.5
    model = make_surrogate(SurrogateSpec(kind="ridge-pairwise")).fit(X, y)
    np.testing.assert_allclose(model.predict(X), y, atol=0.05)
    np.testing.assert_allclose(model.coef_pair, B, atol=0.05)


def test_log_pairwise_recovers_the_exp_of_a_pairwise_game_and_caps_extrapolation():
    rng = np.random.default_rng(4)
    a, B = rng.normal(0.2, 0.1, L), np.triu(rng.normal(0, 0.05, (L, L)), 1)
    X = rng.random((300, L)) < 0.7
    Xf = X.astype(float)
    y = np.exp(Xf @ a + np.einsum("ni,ij,nj->n", Xf, B, Xf) - a.sum())  # (300,): scores in (0, ~1.5)
    model = make_surrogate(SurrogateSpec(kind="log-pairwise")).fit(X, y)
    np.testing.assert_allclose(model.predict(X), y, rtol=0.02)
    np.testing.assert_allclose(model.game.coef_pair, B, atol=0.02)
    assert model.cap == pytest.approx(2 * max(1.0, y.max()))
    few = stratified_masks(120, seed=5, strata=(5, 4, 3))  # fitted on 3-5 kept layers only
    wild = make_surrogate(SurrogateSpec(kind="log-pairwise")).fit(few, np.exp(few.sum(axis=1) - 5.0))  # <= 1
    full = np.ones((1, L), bool)
    assert np.exp(wild.game.predict(full))[0] > 100  # the fitted game extrapolates to ~exp(7) at 12 kept
    assert wild.predict(full)[0] == wild.cap == 2.0


def test_hybrid_is_the_mean_of_its_mlp_and_log_pairwise_parts(data):
    X, y, Xt, _ = data
    model = make_surrogate(SurrogateSpec(kind="mlp+log-pairwise"), **FAST).fit(X, y)
    mlp, logp = model.parts()
    np.testing.assert_allclose(model.predict(Xt), 0.5 * (mlp.predict(Xt) + logp.predict(Xt)))
    alone = make_surrogate(SurrogateSpec(kind="mlp"), **FAST).fit(X, y)
    np.testing.assert_array_equal(mlp.predict(Xt), alone.predict(Xt))  # the same MLP as the mlp kind
    ens = Ensemble(SurrogateSpec(kind="mlp+log-pairwise", ensemble=2), **FAST).fit(X, y)
    a, b = ens.members  # all masks, seeds differ: the log-pairwise parts are equal, the MLPs are not
    np.testing.assert_array_equal(a.log_pairwise.predict(Xt), b.log_pairwise.predict(Xt))
    assert not np.array_equal(a.mlp.predict(Xt), b.mlp.predict(Xt))


def test_stratified_split_keeps_proportions():
    X = stratified_masks(300, seed=4, strata=(11, 9, 7))  # 100 per kept count
    y = np.linspace(0.1, 0.9, 300)
    sp = split(X, y, holdout=0.2, seed=0)
    assert sp.stratified and sp.note == ""
    assert len(np.intersect1d(sp.train, sp.test)) == 0 and len(sp.train) + len(sp.test) == 300
    counts = X.sum(axis=1)
    for k in (11, 9, 7):
        assert np.sum(counts[sp.test] == k) == 20
    again = split(X, y, holdout=0.2, seed=0)
    np.testing.assert_array_equal(sp.test, again.test)
    assert not np.array_equal(sp.test, split(X, y, holdout=0.2, seed=1).test)


def test_split_with_singleton_strata_and_fallback():
    X = stratified_masks(40, seed=5, strata=(11, 10))
    X[0] = False  # a single mask with 0 kept layers
    sp = split(X, np.linspace(0, 1, 40), 0.25, seed=0)
    assert sp.stratified and 0 in sp.train and "[0]" in sp.note
    # every kept count appears once: no stratum can be split
    Xs = np.tril(np.ones((L + 1, L), bool), -1)  # row j keeps j layers
    sp2 = split(Xs, np.linspace(0, 1, L + 1), 0.25, seed=0)
    assert not sp2.stratified and "unstratified" in sp2.note and len(sp2.test) == 3


def test_too_few_masks_or_bad_scores_raise():
    X = stratified_masks(7, seed=0)
    with pytest.raises(EstimationError, match="at least 8"):
        make_surrogate().fit(X, np.ones(7))
    X = stratified_masks(20, seed=0)
    with pytest.raises(EstimationError, match="NaN"):
        split(X, np.where(np.arange(20) == 2, np.nan, 0.5))
    with pytest.raises(EstimationError, match="unknown surrogate kind"):
        make_surrogate(SurrogateSpec(kind="svm"))
    with pytest.raises(EstimationError, match="preset"):
        make_surrogate(SurrogateSpec(preset="lbfgs"))


def test_diagnostics_on_a_hand_made_example():
    masks = np.array([[1, 1, 0], [1, 1, 0], [1, 0, 0], [1, 0, 0]], bool)  # kept counts 2, 2, 1, 1
    y = np.array([0.8, 0.5, 0.4, 0.2])
    p = np.array([0.9, 0.45, 0.4, 0.25])
    d = diagnose(masks, y, p, ppl_full=2.0)
    o = d.overall
    assert o.n == 4
    assert o.r2 == pytest.approx(1 - 0.015 / 0.1875)  # SS_res 0.015, SS_tot 0.1875
    assert o.spearman == pytest.approx(1.0)  # same order
    assert o.mae == pytest.approx(0.05)
    # perplexities: true 2.5, 4, 5, 10; predicted 2.222.., 4.444.., 5, 8
    assert o.mae_ppl == pytest.approx((2.5 - 20 / 9 + 40 / 9 - 4 + 0 + 2) / 4)
    assert o.mape_ppl == pytest.approx(((2.5 - 20 / 9) / 2.5 + (40 / 9 - 4) / 4 + 0 + 2 / 10) / 4)
    assert set(d.per_stratum) == {1, 2}
    assert d.per_stratum[2].mae == pytest.approx(0.075) and d.per_stratum[1].mae == pytest.approx(0.025)
    assert d.per_stratum[1].r2 == pytest.approx(1 - 0.0025 / 0.02)
    # a zero score is clipped, not divided by
    z = metrics(np.array([0.0, 0.5]), np.array([0.0, 0.5]), ppl_full=1.0)
    assert z.mae_ppl == 0.0 and np.isfinite(metrics(np.array([0.0, 0.5]), np.array([0.5, 0.5])).mae_ppl)
    assert metrics(np.array([0.0]), np.array([1.0])).mae_ppl == pytest.approx(1 / SCORE_FLOOR - 1)
    json.dumps(d.to_dict())


def test_ensembles_give_k_predictions(data):
    X, y, Xt, _ = data
    ens = Ensemble(SurrogateSpec(kind="mlp", ensemble=3), **FAST).fit(X, y)
    allp = ens.predict_all(Xt)
    assert allp.shape == (3, len(Xt))
    assert not np.array_equal(allp[0], allp[1])
    np.testing.assert_allclose(ens.predict(Xt), allp.mean(axis=0))
    assert len(ens.value_functions()) == 3
    ridge = Ensemble(SurrogateSpec(kind="ridge-pairwise", ensemble=4)).fit(X, y)  # bootstrap members
    rp = ridge.predict_all(Xt)
    assert rp.shape == (4, len(Xt)) and rp.std(axis=0).mean() > 0


def test_fit_with_diagnostics_learning_curve_and_compare(data):
    X, y, _, _ = data
    fs = fit_with_diagnostics(X, y, SurrogateSpec(kind="ridge-pairwise", ensemble=2), ppl_full=20.0)
    rep = fs.report
    assert rep.split.stratified and rep.test.overall.n == len(rep.split.test) == 48
    assert rep.test.overall.r2 > 0.8 and set(rep.test.per_stratum) == {6, 7, 8, 9, 10, 11}
    json.dumps(rep.to_dict())

    lc = learning_curve(X, y, [4, 16, 64, 180, 10_000], SurrogateSpec(kind="ridge-pairwise"))
    assert lc.sizes == (16, 64, 180) and "[4, 10000]" in lc.note and lc.n_test == 48
    r2 = [m.r2 for m in lc.metrics]
    assert r2[-1] > r2[0] and r2[-1] > 0.9
    assert all(m.n == 48 for m in lc.metrics)

    cmp = compare(X, y, kinds=("ridge-pairwise", "gbt"), spec=SurrogateSpec())
    assert [r["kind"] for r in cmp.rows] == ["ridge-pairwise", "gbt"]
    assert all(r["n"] == 48 and r["fit_seconds"] >= 0 for r in cmp.rows)
    json.dumps(cmp.to_dict())


@pytest.mark.parametrize("kind", ["mlp", "mlp+log-pairwise"])
def test_batched_ensemble_fits_the_same_functions_as_the_sequential_one(data, kind):
    """The members trained as one batched network (fit_mlps_batched) against one after another: held-out R²
    and the members' exact Shapley values agree within seed noise (the spread between two seeds)."""
    from engine.shapley import exact_shapley

    X, y, Xt, yt = data
    spec = SurrogateSpec(kind=kind, ensemble=3)
    seq = Ensemble(spec, batched=False, **FAST).fit(X, y)
    bat = Ensemble(spec, batched=True, **FAST).fit(X, y)
    other_seed = Ensemble(SurrogateSpec(kind=kind, ensemble=3, seed=7), batched=False, **FAST).fit(X, y)
    r2 = {name: metrics(yt, e.predict(Xt)).r2 for name, e in (("seq", seq), ("bat", bat), ("seed", other_seed))}
    assert abs(r2["bat"] - r2["seq"]) <= max(0.01, 2 * abs(r2["seed"] - r2["seq"]))
    phi = {name: exact_shapley(e.predict, L).values for name, e in (("seq", seq), ("bat", bat), ("seed", other_seed))}
    seed_noise = np.abs(phi["seed"] - phi["seq"]).max()
    assert np.abs(phi["bat"] - phi["seq"]).max() <= max(2 * seed_noise, 0.005)
    mlp = [m if kind == "mlp" else m.mlp for m in bat.members]
    assert all(m.history["batched"] == 3 and m.history["steps"] <= FAST["max_steps"] for m in mlp)


def test_batched_fit_takes_each_members_own_adam_steps():
    """The hand-written batched backward and Adam step against autograd + torch.optim.Adam, step for step: over
    a few steps (before float rounding grows) every member's weights equal its own fit's, with sample weights,
    row subsets, no validation slice (8 rows) and members leaving the batch at different steps."""
    from engine.surrogate_mlp import MLPSurrogate, fit_mlps_batched

    rng = np.random.default_rng(0)
    X = rng.random((120, L)) < 0.6
    y = 1 / (1 + np.exp(-(X @ rng.normal(size=L) - 1)))
    w = rng.uniform(0.2, 1.0, 120)
    rows = [np.arange(120), rng.permutation(120)[:40], np.arange(8)]
    steps = [30, 12, 20]
    batched = [MLPSurrogate(seed=j, max_steps=s, patience=1000) for j, s in enumerate(steps)]
    fit_mlps_batched(batched, X, y, rows, w)
    for j, (m, r, s) in enumerate(zip(batched, rows, steps)):
        alone = MLPSurrogate(seed=j, max_steps=s, patience=1000).fit(X[r], y[r], w[r])
        assert m.history["steps"] == alone.history["steps"] == s and m.history["n_val"] == alone.history["n_val"]
        for p, q in zip(m.net.parameters(), alone.net.parameters()):
            np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), atol=1e-5)


def test_fit_on_rows_batches_row_subsets_like_separate_fits(data):
    from engine.surrogate import fit_on_rows

    X, y, Xt, yt = data
    spec = SurrogateSpec(kind="mlp")
    rows = [np.arange(60), np.arange(120), np.arange(240)]
    batched = fit_on_rows(spec, X, y, rows, max_steps=400)
    for r, m in zip(rows, batched):
        alone = make_surrogate(spec, max_steps=400).fit(X[r], y[r])
        assert m.history["n_val"] == alone.history["n_val"]
        assert abs(metrics(yt, m.predict(Xt)).r2 - metrics(yt, alone.predict(Xt)).r2) < 0.03


def test_fit_with_curve_batches_the_ensemble_and_the_curve_like_the_two_calls(data, monkeypatch):
    from engine import surrogate as sg

    X, y, Xt, yt = data
    spec = SurrogateSpec(kind="mlp", ensemble=2)
    sizes = (16, 64, 192)
    fitted, curve = sg.fit_with_curve(X, y, spec, sizes, max_steps=400)
    monkeypatch.setattr(sg, "BATCHED_FITS", False)
    ref, ref_curve = sg.fit_with_curve(X, y, spec, sizes, max_steps=400)
    assert curve.sizes == ref_curve.sizes == sizes and list(fitted.report.split.test) == list(ref.report.split.test)
    assert abs(fitted.report.test.overall.r2 - ref.report.test.overall.r2) < 0.01
    assert all(abs(a.r2 - b.r2) < 0.05 for a, b in zip(curve.metrics, ref_curve.metrics))
    rows = compare(X, y, ["mlp:adam", "mlp+log-pairwise"], spec, adam_mlp=fitted.ensemble.members[0]).rows
    assert all(r.get("reused") for r in rows)
    assert rows[0]["r2"] == pytest.approx(metrics(y[fitted.report.split.test], fitted.ensemble.members[0].predict(
        X[fitted.report.split.test])).r2)
