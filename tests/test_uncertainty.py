"""engine.contribution_intervals and engine.uncertainty on synthetic games whose semivalues are known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine import shapley
from engine import contribution_intervals as ci
from engine import uncertainty as unc
from engine.config import SamplingSpec
from engine.errors import EstimationError
from engine.sampling import sample_masks

L = 8
RNG = np.random.default_rng(7)
A = RNG.normal(0.1, 0.05, L)  # (L,) linear terms
B = np.triu(RNG.normal(0.0, 0.03, (L, L)), 1)  # (L, L) pairwise terms, upper triangle


def pairwise_game(masks):
    """f(m) = m.a + m^T B m: Shapley phi_i = a_i + 1/2 sum_j (B_ij + B_ji)."""
    x = np.asarray(masks, dtype=float)
    return x @ A + np.einsum("nj,nj->n", x @ B, x)


SHAPLEY_TRUE = A + 0.5 * (B + B.T).sum(axis=1)  # (L,)


def linear_fit(X, y):
    """A deliberately biased surrogate: least squares on the mask bits only (misses the pairs)."""
    Z = np.hstack([np.ones((len(X), 1)), np.asarray(X, float)])
    coef = np.linalg.lstsq(Z, y, rcond=None)[0]
    return lambda m: coef[0] + np.asarray(m, float) @ coef[1:]


def shrunk_fit(X, y):
    """A biased surrogate that shrinks toward zero, as an under-fitted network does (and misses the pairs)."""
    g = linear_fit(X, y)
    return lambda m: 0.7 * g(m)


def zero_fit(X, y):
    return lambda m: np.zeros(len(m))


def test_semivalue_by_size_sums_to_the_semivalue():
    for w in (shapley.SHAPLEY, shapley.BANZHAF, shapley.restricted_strata((6, 5, 3))):
        per = ci.semivalue_by_size(pairwise_game, L, w)  # (L+1, L)
        np.testing.assert_allclose(per.sum(axis=0), shapley.semivalue(pairwise_game, L, w).values, atol=1e-12)
    np.testing.assert_allclose(ci.semivalue_by_size(pairwise_game, L, shapley.SHAPLEY).sum(0), SHAPLEY_TRUE,
                               atol=1e-12)


def test_size_weight_mass_is_zero_exactly_where_the_strata_do_not_reach():
    mass = ci.size_weight_mass(shapley.restricted_strata((6, 3)), L)
    assert set(np.flatnonzero(mass)) == {2, 3, 4, 5, 6, 7}
    assert np.all(ci.size_weight_mass(shapley.SHAPLEY, L) > 0)


def test_folds_by_size_put_each_kept_count_in_every_fold():
    masks = sample_masks(SamplingSpec(n_masks=100, strata=(6, 5, 3), seed=0), L)
    folds = ci.folds_by_size(masks, 5, seed=1)
    for j in np.unique(masks.sum(1)):
        assert set(folds[masks.sum(1) == j]) == set(range(5))


def test_every_mask_evaluated_gives_the_exact_value_with_zero_noise():
    codes = np.arange(1 << L)
    masks = shapley._masks_from_codes(codes, L)
    iv = ci.regression_adjusted(masks, pairwise_game(masks), zero_fit, shapley.SHAPLEY, n_boot=5)
    np.testing.assert_allclose(iv.values, SHAPLEY_TRUE, atol=1e-12)
    np.testing.assert_allclose(iv.se, 0.0, atol=1e-15)
    assert iv.details["uncovered_kept_counts"] == [] and np.all(iv.bias_allowance == 0)


def test_cross_fitting_holds_each_row_out_of_one_fit_and_refuses_bad_input():
    """Moved here with shapley.regression_adjusted's removal (uncertainty.regression_adjusted superseded it)."""
    sizes = []

    def counting_fit(X, y):
        sizes.append(len(y))
        return linear_fit(X, y)

    masks = sample_masks(SamplingSpec(scheme="size-uniform", n_masks=60, seed=0), L)
    ci.regression_adjusted(masks, pairwise_game(masks), counting_fit, shapley.SHAPLEY, folds=3, n_boot=0)
    rows = len(masks) + 1  # the full mask's known score is appended as a row
    assert len(sizes) == 3 and sum(rows - s for s in sizes) == rows  # each row is held out of exactly one fit
    with pytest.raises(EstimationError, match="NaN"):
        ci.regression_adjusted(masks, np.where(np.arange(60) == 3, np.nan, pairwise_game(masks)), linear_fit, n_boot=0)
    with pytest.raises(EstimationError, match="folds"):
        ci.regression_adjusted(masks[:4], pairwise_game(masks[:4]), linear_fit, folds=5, n_boot=0)


def test_regression_adjustment_removes_the_surrogate_bias_and_its_intervals_cover():
    """Size-uniform masks from the pairwise game, a surrogate that shrinks and cannot fit the pairs:
    the surrogate alone is biased, the adjusted estimate is not, and its 90% intervals cover."""
    errors, surrogate_errors, covered = [], [], []
    for seed in range(24):
        masks = sample_masks(SamplingSpec(scheme="size-uniform", n_masks=120, seed=seed), L)
        iv = ci.regression_adjusted(masks, pairwise_game(masks), shrunk_fit, shapley.SHAPLEY, seed=seed, n_boot=0,
                                     full_score=float(pairwise_game(np.ones((1, L)))[0]))
        errors.append(iv.values - SHAPLEY_TRUE)
        surrogate_errors.append(iv.details["surrogate_part"] - SHAPLEY_TRUE)
        covered.append(iv.covers(SHAPLEY_TRUE))
        assert iv.estimand == "shapley" and iv.level == 0.9
    errors, surrogate_errors = np.array(errors), np.array(surrogate_errors)
    # the linear surrogate's exact Shapley values are off by far more than the adjusted estimate's mean error
    assert np.abs(surrogate_errors.mean(0)).max() > 4 * np.abs(errors.mean(0)).max()
    se_of_mean = errors.std(0, ddof=1) / math.sqrt(len(errors))
    assert np.all(np.abs(errors.mean(0)) < 4 * se_of_mean)  # unbiased within noise
    assert 0.8 <= np.mean(covered) <= 1.0


def test_stratified_design_names_the_uncovered_sizes_and_widens_for_them():
    masks = sample_masks(SamplingSpec(n_masks=90, strata=(6, 5, 3), seed=0), L)
    y = pairwise_game(masks)
    full = float(pairwise_game(np.ones((1, L)))[0])
    strata = ci.regression_adjusted(masks, y, linear_fit, shapley.restricted_strata((6, 5, 3)), full_score=full,
                                     n_boot=0)
    assert strata.estimand == "strata"
    assert strata.details["uncovered_kept_counts"] == [2, 4, 7]
    assert 0 < strata.details["uncovered_weight_fraction"] < 1
    assert np.all(strata.bias_allowance > 0)
    plain = ci.regression_adjusted(masks, y, linear_fit, shapley.restricted_strata((6, 5, 3)), full_score=full,
                                    n_boot=0, allowance=False)
    np.testing.assert_allclose(plain.values, strata.values)
    assert np.all(plain.bias_allowance == 0) and np.all(plain.ci_high - plain.ci_low < strata.ci_high - strata.ci_low)
    # Shapley weights every size: 0, 1, 2, 4 and 7 kept are uncovered here (8 = the full mask is known)
    sh = ci.regression_adjusted(masks, y, linear_fit, shapley.SHAPLEY, full_score=full, n_boot=0)
    assert sh.details["uncovered_kept_counts"] == [0, 1, 2, 4, 7]
    assert sh.details["uncovered_weight_fraction"] > strata.details["uncovered_weight_fraction"]


def test_bootstrap_over_masks_agrees_with_the_analytic_noise():
    masks = sample_masks(SamplingSpec(scheme="size-uniform", n_masks=150, seed=3), L)
    noisy = pairwise_game(masks) + np.random.default_rng(0).normal(0, 0.02, len(masks))
    iv = ci.regression_adjusted(masks, noisy, linear_fit, shapley.SHAPLEY, n_boot=300, seed=3)
    ratio = iv.details["se_masks_bootstrap"] / iv.se
    assert np.all((ratio > 0.6) & (ratio < 1.7))


def test_surrogate_interval_adds_the_estimated_bias():
    masks = sample_masks(SamplingSpec(scheme="size-uniform", n_masks=150, seed=1), L)
    y = pairwise_game(masks)
    full = float(pairwise_game(np.ones((1, L)))[0])
    ref = ci.regression_adjusted(masks, y, shrunk_fit, shapley.SHAPLEY, full_score=full, n_boot=0)
    iv = ci.surrogate_interval(masks, y, shrunk_fit, shapley.SHAPLEY, estimator="exact", n_boot=10,
                                reference=ref, full_score=full)
    bias = iv.details["bias_estimate"]
    np.testing.assert_allclose(bias, iv.values - ref.values)
    np.testing.assert_allclose(iv.bias_allowance, np.abs(bias))
    # the estimated bias tracks the real one (the surrogate shrinks and misses the pairwise terms)
    real = iv.values - SHAPLEY_TRUE
    assert np.corrcoef(bias, real)[0, 1] > 0.8
    assert iv.covers(SHAPLEY_TRUE).mean() >= 0.75
    assert np.all(iv.ci_high - iv.ci_low > 2 * np.abs(bias))
    with pytest.raises(EstimationError, match="reference targets"):
        ci.surrogate_interval(masks, y, linear_fit, shapley.BANZHAF, reference=ref, n_boot=2)


def test_bootstrap_semivalues_refits_on_resamples():
    masks = sample_masks(SamplingSpec(scheme="size-uniform", n_masks=80, seed=2), L)
    calls = []

    def counting_fit(X, y):
        calls.append(len(X))
        return linear_fit(X, y)

    out = ci.bootstrap_semivalues(masks, pairwise_game(masks), counting_fit,
                                   {"shapley": shapley.SHAPLEY, "banzhaf": shapley.BANZHAF}, n_boot=6, seed=0)
    assert len(calls) == 6  # one fit per resample serves both weightings
    assert out["shapley"].shape == (6, L) and np.all(out["shapley"].std(0) > 0)


def test_window_resampled_scores():
    rng = np.random.default_rng(0)
    nll = rng.uniform(200, 400, (5, 6))  # (n, W)
    tokens = np.full((5, 6), 100)
    full = nll.min(axis=0) - 10  # (W,)
    s = ci.window_resampled_scores(nll, tokens, full, tokens[0], n_boot=50, seed=0)
    assert s.shape == (50, 5) and np.all((s > 0) & (s < 1))
    # windows that all agree: every resample gives the same scores, equal to the whole-sample ones
    flat = np.tile(nll[:, :1], (1, 6))
    same = ci.window_resampled_scores(flat, tokens, np.full(6, full[0]), tokens[0], n_boot=5)
    np.testing.assert_allclose(same, np.tile(np.exp((full[0] - flat[:, 0]) / 100), (5, 1)))
    inf = nll.copy()
    inf[2, 3] = np.inf
    assert np.all(ci.window_resampled_scores(inf, tokens, full, tokens[0], n_boot=30)[:, 2] >= 0)


def test_window_noise_adds_to_the_interval():
    masks = sample_masks(SamplingSpec(scheme="size-uniform", n_masks=100, seed=4), L)
    y = pairwise_game(masks)
    ws = y[None, :] * np.random.default_rng(1).normal(1.0, 0.05, (40, 1))  # (B, n): a shared window effect
    base = ci.regression_adjusted(masks, y, linear_fit, shapley.SHAPLEY, n_boot=0)
    wide = ci.regression_adjusted(masks, y, linear_fit, shapley.SHAPLEY, n_boot=0, window_scores=ws)
    assert np.all(wide.se > base.se) and "windows" in wide.details["se"]
    with pytest.raises(EstimationError, match="window_scores"):
        ci.regression_adjusted(masks, y, linear_fit, shapley.SHAPLEY, n_boot=0, window_scores=ws[:, :5])


def test_metric_intervals():
    rng = np.random.default_rng(0)
    y = rng.uniform(0, 1, 200)
    perfect = unc.metric_intervals(y, y, n_boot=50)
    assert perfect["r2"].value == 1.0 and perfect["r2"].ci_low == 1.0
    assert perfect["spearman"].ci_low == pytest.approx(1.0)
    noisy = unc.metric_intervals(y, y + rng.normal(0, 0.1, 200), strata=(y > 0.5).astype(int), n_boot=400)
    for m in noisy.values():
        assert m.ci_low < m.value < m.ci_high < 1.0 and m.n == 200 and m.level == 0.9
    # a smaller held-out set gives a wider interval
    small = unc.metric_intervals(y[:40], (y + rng.normal(0, 0.1, 200))[:40], n_boot=400)
    assert small["r2"].ci_high - small["r2"].ci_low > noisy["r2"].ci_high - noisy["r2"].ci_low


def test_compare_candidates_chooses_the_best_and_lists_the_ties():
    rng = np.random.default_rng(0)
    W = 40  # even: the alternating noise of candidate 2 sums to zero
    base = rng.uniform(300, 500, W)  # (W,) per-window NLL shared by every candidate (paired windows)
    nll = np.stack([
        base + 5.0 + rng.normal(0, 1.0, W),  # 0: clearly worse
        base,  # 1: best
        base + 0.05 + 3.0 * (-1.0) ** np.arange(W),  # 2: worse by 2 nats in all, but window noise: tied with 1
        np.full(W, np.inf),  # 3: broken
    ])
    tokens = np.full((4, W), 127)
    cmp = unc.compare_candidates([(3, 5), (1, 2), (2, 7), (0, 1)], nll, tokens, n_boot=1000)
    assert cmp.chosen == (1, 2)
    assert cmp.tied == ((2, 7),)
    assert cmp.ratio[1] == 1.0 and cmp.ci_low[0] > 1.0 and math.isinf(cmp.ratio[3])
    assert cmp.ci_low[2] <= 1.0 <= cmp.ci_high[2]
    np.testing.assert_allclose(cmp.ppl[1], math.exp(nll[1].sum() / tokens[1].sum()))
    d = cmp.to_dict()
    assert d["tied"] == [[2, 7]] and d["chosen"] == [1, 2] and "rule" in d and d["level"] == 0.9
    with pytest.raises(EstimationError):
        unc.compare_candidates([(1,)], nll, tokens)


def test_estimand_names_and_levels():
    assert ci.estimand_of(shapley.SHAPLEY) == "shapley"
    assert ci.estimand_of(shapley.restricted_strata((3,))) == "strata"
    with pytest.raises(EstimationError):
        ci.estimand_of(shapley.weighted_banzhaf(0.3))
    with pytest.raises(EstimationError):
        ci._z(1.5)
    masks = sample_masks(SamplingSpec(scheme="size-uniform", n_masks=60, seed=0), L)
    iv = ci.regression_adjusted(masks, pairwise_game(masks), linear_fit, shapley.BANZHAF, level=0.5, n_boot=0)
    assert iv.estimand == "banzhaf" and iv.to_dict()["estimand_text"].startswith("Banzhaf")
    np.testing.assert_allclose(iv.ci_high - iv.values, ci._z(0.5) * iv.se + iv.bias_allowance)


def test_semivalue_by_size_monte_carlo_above_the_enumeration_limit(monkeypatch):
    """Past EXACT_MAX_L the per-kept-count parts are Monte Carlo with a control variate: on the
    pairwise game (L = 8, limit lowered to 4) they land close to the exact parts."""
    exact = ci.semivalue_by_size(pairwise_game, L, shapley.SHAPLEY)
    monkeypatch.setattr(shapley, "EXACT_MAX_L", 4)
    mc = ci.semivalue_by_size(pairwise_game, L, shapley.SHAPLEY, n_mc=20, seed=1)  # C(8, j) > 20 for 2 <= j <= 6
    np.testing.assert_allclose(mc[[0, 1, 7, 8]], exact[[0, 1, 7, 8]], atol=1e-12)  # small counts enumerated
    assert np.abs(mc.sum(0) - SHAPLEY_TRUE).max() < 0.1 * np.abs(SHAPLEY_TRUE).max()
    assert not np.allclose(mc[4], exact[4])  # really sampled


def test_bench_uncertainty_end_to_end(tmp_path, capsys):
    """bench.uncertainty on a tiny 6-layer model's complete ground truth: coverage JSON and decisions."""
    import json

    from bench import ground_truth as gtm
    from bench import uncertainty as bench_unc
    from tests.conftest import save_tiny_llama, write_words

    save_tiny_llama(tmp_path / "model", n_layers=6, seed=4)
    for i, name in enumerate(("cal", "test")):
        write_words(tmp_path / f"{name}.txt", 400, seed=10 + i)
    gtm.build(str(tmp_path / "model"), str(tmp_path / "cal.txt"), 3, 16, out=tmp_path / "gt.npz", progress=False)
    r = bench_unc.main(["--ground-truth", str(tmp_path / "gt.npz"), "--seeds", "2", "--masks", "30", "--boot", "3",
                        "--surrogate", "ridge-pairwise",
                        "--ks", "1", "2", "--near", "4", "--val-windows", "12", "--heldout-windows", "3",
                        "--eval-data", str(tmp_path / "test.txt"), "--json"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["level"] == 0.9 and last["seeds"] == 2 and last["masks"] == 30
    assert 0 <= last["coverage"] <= 1
    assert set(last["coverage_by_estimator"]) == {"regression-adjusted", "paper", "exact", "regression-adjusted:other"}
    assert set(last["coverage_by_design"]) == {"stratified", "size-uniform"}
    assert last["default"]["estimand"] == "sampled-strata"  # the product's estimand on its default design
    assert [g["name"] for g in last["games"]] == ["gt"] and last["min_coverage"] == last["coverage"]
    assert last["games"][0]["pairs"] == 2 * 6 and len(last["games"][0]["mean_error"]) == 6
    for m in last["metrics"]["stratified"].values():
        assert 0 <= m["coverage"] <= 1 and m["n"] == 2
    rows = r["decisions"]["rows"]
    assert {(row["k"], row["split"]) for row in rows} == {(k, str(tmp_path / "test.txt")) for k in (1, 2)}
    for row in rows:
        assert row["ratio"] >= 1.0 and row["calibration_best_ratio"] >= 1.0 and len(row["chosen"]) == row["k"]


def test_sampled_strata_weighs_only_coalitions_whose_two_masks_were_sampled():
    strata = (6, 5, 3)  # with the full mask (8): adjacent counts 5-6 and 7-8? 7 is not sampled: only (5, 6)
    w = shapley.sampled_strata(strata).vector(L)  # (L,) over the other players' coalition size s
    assert np.flatnonzero(w).tolist() == [5]  # s = 5: masks keeping 5 and 6 layers, both strata
    assert sum(math.comb(L - 1, s) * w[s] for s in range(L)) == pytest.approx(1.0)
    mass = ci.size_weight_mass(shapley.sampled_strata(strata), L)
    assert set(np.flatnonzero(mass)) == {5, 6}
    assert ci.estimand_of(shapley.sampled_strata(strata)) == "sampled-strata"
    assert shapley.sampled_strata((7, 5)).vector(L)[7] > 0  # 7 and the full mask, 8
    with pytest.raises(EstimationError, match="adjacent"):
        shapley.sampled_strata((6, 4)).vector(L)
    assert not shapley.has_adjacent_strata((6, 4), L) and shapley.has_adjacent_strata((7, 4), L)


def test_regression_adjusted_sampled_strata_is_unbiased_and_needs_no_allowance():
    """Stratified masks (strata 7, 6, 5 of 8), a surrogate that cannot fit the pairs: the estimate of the
    sampled-strata semivalue is unbiased (every weighted kept count sampled), has no allowance, covers."""
    weighting = shapley.sampled_strata((7, 6, 5))
    truth = shapley.semivalue(pairwise_game, L, weighting).values
    full = float(pairwise_game(np.ones((1, L)))[0])
    errors, covered = [], []
    for seed in range(24):
        masks = sample_masks(SamplingSpec(n_masks=90, strata=(7, 6, 5), seed=seed), L)
        iv = ci.regression_adjusted(masks, pairwise_game(masks), shrunk_fit, weighting, seed=seed, n_boot=0,
                                     full_score=full)
        assert iv.details["uncovered_kept_counts"] == [] and np.all(iv.bias_allowance == 0)
        errors.append(iv.values - truth)
        covered.append(iv.covers(truth))
    errors = np.array(errors)
    assert np.all(np.abs(errors.mean(0)) < 4 * errors.std(0, ddof=1) / math.sqrt(len(errors)))
    assert 0.8 <= np.mean(covered) <= 1.0


def test_the_default_estimator_targets_the_sampled_strata_on_stratified_runs():
    from engine import estimators

    w = estimators.weighting_for("regression-adjusted", SamplingSpec(), 12)
    assert w.kind == "sampled_strata" and w.strata == (11, 10, 9, 8, 7)
    assert estimators.estimand("regression-adjusted", SamplingSpec()) == estimators.SAMPLED_STRATA_SEMIVALUE
    assert estimators.weighting_for("paper", SamplingSpec(), 12).kind == "restricted_strata"  # the paper's, unchanged
    assert estimators.weighting_for("regression-adjusted", SamplingSpec(scheme="size-uniform"), 12) == shapley.SHAPLEY
    lone = SamplingSpec(strata=(10, 7))  # no two adjacent kept counts: the paper's estimand, with its allowance
    assert estimators.estimand("regression-adjusted", lone, 12) == estimators.STRATA_SEMIVALUE
    assert estimators.weighting_for("regression-adjusted", lone, 12).kind == "restricted_strata"


def test_resampling_draws_within_groups_and_counts_every_window_draw():
    from engine.resampling import stratified_resample, window_counts

    groups = np.array([3, 3, 3, 5, 5, 7])
    idx = stratified_resample(groups, np.random.default_rng(0), fixed={7})
    np.testing.assert_array_equal(np.sort(groups[idx]), np.sort(groups))  # each group keeps its size
    assert idx[-1] == 5  # a fixed group stays as it is
    counts = window_counts(np.random.default_rng(0), 9, 40)  # (40, 9)
    assert counts.shape == (40, 9) and np.all(counts.sum(axis=1) == 9) and counts.std() > 0


def test_many_stratified_resamples_are_the_same_draws_as_one_call_each():
    """resampling.stratified_resamples (metric_intervals' bootstrap) = n_boot calls of stratified_resample."""
    from engine.resampling import stratified_resample, stratified_resamples

    groups = np.random.default_rng(1).integers(0, 6, 57)
    for fixed in ((), {2}):
        a, b = np.random.default_rng(3), np.random.default_rng(3)
        one_by_one = np.stack([stratified_resample(groups, a, fixed) for _ in range(50)])
        np.testing.assert_array_equal(stratified_resamples(groups, b, 50, fixed), one_by_one)
        assert a.random() == b.random()  # the generators are left in the same state
    assert stratified_resamples(groups, b, 0).shape == (0, 57)
