"""Estimators on synthetic games whose semivalues are known (closed form or brute force)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from engine.errors import EstimationError
from engine.shapley import (
    BANZHAF,
    SHAPLEY,
    Contributions,
    _random_masks_of_sizes,
    efficiency_check,
    exact_shapley,
    flip_values,
    permutation_shapley,
    restricted_strata,
    restricted_strata_semivalue,
    semivalue,
    weighted_banzhaf,
    ensemble_mean,
)


def pairwise_game(L: int, seed: int = 0):
    """f(S) = sum a_i x_i + sum_{i<j} b_ij x_i x_j; Shapley/Banzhaf: a_i + 1/2 sum_j b_ij."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=L)
    B = np.triu(rng.normal(size=(L, L)), 1)

    def f(m):
        x = np.asarray(m, dtype=float)
        return x @ a + np.einsum("ni,ij,nj->n", x, B, x)

    return f, a, B + B.T


def three_way_game(L: int, seed: int = 1):
    f2, a, Bs = pairwise_game(L, seed)

    def f(m):
        x = np.asarray(m, dtype=float)
        return f2(m) + 1.5 * x[:, 0] * x[:, 2] * x[:, 3] - 0.7 * x[:, 1] * x[:, 3] * x[:, 4] * x[:, 5]

    return f


def sigmoid_game(L: int, seed: int = 2):
    f2, _, _ = pairwise_game(L, seed)
    return lambda m: 1.0 / (1.0 + np.exp(-f2(m)))


def brute_force(f, L: int, w) -> np.ndarray:
    """sum over S not containing i of w(|S|) (f(S+i) - f(S)), one subset at a time."""
    phi = np.zeros(L)
    for i in range(L):
        others = [j for j in range(L) if j != i]
        for s in range(L):
            for S in itertools.combinations(others, s):
                m = np.zeros((2, L), bool)
                m[:, list(S)] = True
                m[0, i] = True
                v = f(m)
                phi[i] += w(s) * (v[0] - v[1])
    return phi


def shapley_w(L):
    return lambda s: math.factorial(s) * math.factorial(L - 1 - s) / math.factorial(L)


def strata_brute_force(f, L: int, strata) -> np.ndarray:
    """The paper's definition: uniform over strata, uniform within a stratum, mean difference."""
    phi = np.zeros(L)
    for k in strata:
        masks = np.array([[j in c for j in range(L)] for c in itertools.combinations(range(L), k)])
        for i in range(L):
            on, off = masks.copy(), masks.copy()
            on[:, i], off[:, i] = True, False
            phi[i] += np.mean(f(on) - f(off)) / len(strata)
    return phi


# ---------------------------------------------------------------- exact results


def test_additive_game_every_estimator_gives_the_weights():
    L = 8
    a = np.random.default_rng(0).normal(size=L)
    f = lambda m: np.asarray(m, float) @ a  # noqa: E731
    exact = [
        exact_shapley(f, L),
        semivalue(f, L, BANZHAF),
        semivalue(f, L, weighted_banzhaf(0.3)),
        semivalue(f, L, restricted_strata([5, 6])),
        permutation_shapley(f, L, 10, seed=0, paired=False),
    ]
    for c in exact:
        np.testing.assert_allclose(c.values, a, atol=1e-10, err_msg=c.estimator)
    mc = [semivalue(f, L, SHAPLEY, n_samples=200), restricted_strata_semivalue(f, L, [5, 6], n_masks=200)]
    for c in mc:  # every sample's marginal is exactly a_i
        np.testing.assert_allclose(c.values, a, atol=1e-10, err_msg=c.estimator)


def test_pairwise_game_closed_form():
    L = 9
    f, a, Bs = pairwise_game(L)
    truth = a + 0.5 * Bs.sum(axis=1)
    np.testing.assert_allclose(exact_shapley(f, L).values, truth, atol=1e-10)
    np.testing.assert_allclose(semivalue(f, L, BANZHAF).values, truth, atol=1e-10)  # p = 1/2: same value
    np.testing.assert_allclose(semivalue(f, L, weighted_banzhaf(0.3)).values, a + 0.3 * Bs.sum(axis=1), atol=1e-10)
    # antithetic pairs are exact on a pairwise game (a permutation and its reverse split each b_ij evenly)
    np.testing.assert_allclose(permutation_shapley(f, L, 4, seed=3).values, truth, atol=1e-10)


def test_three_way_game_against_brute_force():
    L = 7
    f = three_way_game(L)
    np.testing.assert_allclose(exact_shapley(f, L).values, brute_force(f, L, shapley_w(L)), atol=1e-10)
    np.testing.assert_allclose(semivalue(f, L, BANZHAF).values, brute_force(f, L, lambda s: 0.5 ** (L - 1)), atol=1e-10)
    p = 0.7
    np.testing.assert_allclose(
        semivalue(f, L, weighted_banzhaf(p)).values, brute_force(f, L, lambda s: p**s * (1 - p) ** (L - 1 - s)), atol=1e-10
    )


def test_exact_matches_shap_exact_explainer():
    shap = pytest.importorskip("shap")
    L = 7
    W = np.random.default_rng(4).normal(size=(L, 3))

    def f(m):
        x = np.asarray(m, dtype=float)
        return np.tanh(x @ W).prod(axis=1) + x[:, 0] * x[:, 3] * x[:, 5]

    # player absent = 0: a single all-zeros background row; explain the all-ones point
    explainer = shap.explainers.Exact(f, shap.maskers.Independent(np.zeros((1, L)), max_samples=1))
    expected = explainer(np.ones((1, L)), silent=True).values[0]
    np.testing.assert_allclose(exact_shapley(f, L).values, expected, atol=1e-9)


def test_restricted_strata_is_brute_force_over_the_strata():
    L, strata = 7, (5, 4, 3)
    f = three_way_game(L)
    truth = strata_brute_force(f, L, strata)
    np.testing.assert_allclose(semivalue(f, L, restricted_strata(strata)).values, truth, atol=1e-10)
    mc = restricted_strata_semivalue(f, L, strata, n_masks=4000, seed=1)
    assert "restricted-strata semivalue" in mc.estimator
    assert mc.n_evaluations == 4000 * (L + 1)
    assert np.all(np.abs(mc.values - truth) < 4 * mc.stderr + 1e-12)
    # not the Shapley value: the restriction changes the numbers on a game with interactions
    assert np.max(np.abs(truth - exact_shapley(f, L).values)) > 0.05


def test_monte_carlo_semivalue_agrees_with_exact():
    L = 8
    f = sigmoid_game(L)
    for weighting in (SHAPLEY, BANZHAF, weighted_banzhaf(0.25)):
        exact = semivalue(f, L, weighting).values
        mc = semivalue(f, L, weighting, n_samples=3000, seed=5)
        assert np.all(np.abs(mc.values - exact) < 4.5 * mc.stderr + 1e-12), weighting.name


def test_permutation_sampling_converges():
    L = 8
    f = sigmoid_game(L)
    truth = exact_shapley(f, L).values
    err = {n: np.mean([np.abs(permutation_shapley(f, L, n, seed=s, paired=False).values - truth).max()
                       for s in range(8)]) for n in (20, 800)}
    assert err[800] < err[20] / 3
    c = permutation_shapley(f, L, 800, seed=9)
    assert np.all(np.abs(c.values - truth) < 4.5 * c.stderr + 1e-12)
    conv = c.details["convergence"]
    assert conv[-1]["n_permutations"] == 800 and np.allclose(conv[-1]["values"], c.values)
    assert c.details["max_change_last_half"] < 0.05
    json.dumps(c.to_dict())


def test_efficiency_of_exact_and_permutation_shapley():
    L = 8
    f = sigmoid_game(L)
    for c in (exact_shapley(f, L), permutation_shapley(f, L, 30, seed=0)):
        eff = efficiency_check(c.values, f, L)
        assert abs(eff.gap) < 1e-10 and abs(eff.total - eff.grand_minus_empty) < 1e-10


def test_estimators_call_the_value_function_in_batches():
    L = 10
    f0 = sigmoid_game(L)
    sizes = []

    def f(m):
        sizes.append(len(m))
        return f0(m)

    exact_shapley(f, L)
    assert sizes == [2**L]
    sizes.clear()
    permutation_shapley(f, L, 100, seed=0)
    assert len(sizes) == 1 and sizes[0] == 100 * (L + 1)
    sizes.clear()
    restricted_strata_semivalue(f, L, (8, 6), n_masks=10_000, chunk=2**14)
    assert sum(sizes) == 10_000 * (L + 1) and max(sizes) <= 2**14 and len(sizes) <= 8


def test_flip_values_is_f_at_the_base_and_each_one_layer_flip():
    L = 7
    f = sigmoid_game(L)
    base = np.random.default_rng(0).random((50, L)) < 0.5
    v = flip_values(f, base, chunk=16)
    assert v.shape == (50, L + 1)
    np.testing.assert_array_equal(v[:, 0], f(base))
    for i in range(L):
        flipped = base.copy()
        flipped[:, i] = ~flipped[:, i]
        np.testing.assert_allclose(v[:, 1 + i], f(flipped), rtol=1e-12)


def test_monte_carlo_uses_flip_values_and_its_draws_do_not_depend_on_chunk():
    L = 9
    f0 = sigmoid_game(L)
    calls = []

    class WithFlips:
        def __call__(self, masks):
            raise AssertionError("the Monte Carlo estimator should go through flip_values")

        def flip_values(self, base):
            calls.append(len(base))
            return flip_values(f0, base)

    plain = restricted_strata_semivalue(f0, L, (7, 5), n_masks=3000, seed=3)
    fast = restricted_strata_semivalue(WithFlips(), L, (7, 5), n_masks=3000, seed=3)
    small_chunks = restricted_strata_semivalue(f0, L, (7, 5), n_masks=3000, seed=3, chunk=50)
    assert calls == [3000]
    np.testing.assert_array_equal(fast.values, plain.values)
    np.testing.assert_allclose(small_chunks.values, plain.values, rtol=0, atol=1e-12)

    class WrongShape:
        def __call__(self, masks):
            return np.zeros(len(masks))

        def flip_values(self, base):
            return np.zeros((len(base), L))

    with pytest.raises(EstimationError, match="flip_values returned shape"):
        restricted_strata_semivalue(WrongShape(), L, (7, 5), n_masks=10)


def test_monte_carlo_mean_and_stderr_over_blocks_equal_the_direct_formula(monkeypatch):
    import engine.shapley as shapley_module

    monkeypatch.setattr(shapley_module, "DRAW_BLOCK", 700)  # 2500 draws: three full blocks and a partial one
    L, strata, n = 8, (6, 3), 2500
    f0 = sigmoid_game(L)
    seen = []

    class Recording:
        def __call__(self, masks):
            return f0(masks)

        def flip_values(self, base):
            seen.append((base.copy(), flip_values(f0, base)))
            return seen[-1][1]

    est = restricted_strata_semivalue(Recording(), L, strata, n_masks=n, seed=5)
    base = np.concatenate([b for b, _ in seen])
    v = np.concatenate([x for _, x in seen])
    w = restricted_strata(strata)
    terms = np.empty((n, L))  # f(m + i) - f(m - i), weighted as the estimator documents it
    pi, weights = w.size_distribution(L), w.vector(L)
    binom = np.array([math.comb(L, k) for k in range(L + 1)], dtype=float)
    s = np.arange(L)
    p_s = pi[s + 1] / binom[s + 1] + pi[s] / binom[s]
    iw = np.divide(weights, p_s, out=np.zeros(L), where=p_s > 0)
    k = base.sum(axis=1)
    for r in range(n):
        for i in range(L):
            d = v[r, 1 + i] - v[r, 0]
            terms[r, i] = -d * iw[k[r] - 1] if base[r, i] else d * iw[k[r]]
    np.testing.assert_allclose(est.values, terms.mean(axis=0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(est.stderr, terms.std(axis=0, ddof=1) / math.sqrt(n), rtol=1e-9)


def test_random_masks_of_sizes_are_uniform_subsets_of_the_asked_size():
    from scipy.stats import chisquare

    L, n = 6, 30_000
    rng = np.random.default_rng(0)
    sizes = rng.permutation(np.repeat([0, 2, 4, 6], n))  # mixed rows: kept side (2) and dropped side (4)
    masks = _random_masks_of_sizes(sizes, L, rng)
    np.testing.assert_array_equal(masks.sum(axis=1), sizes)
    codes = masks @ (1 << np.arange(L))
    for k in (2, 4):
        counts = np.bincount(codes[sizes == k], minlength=1 << L)
        counts = counts[[c for c in range(1 << L) if bin(c).count("1") == k]]  # the C(6, k) = 15 subsets
        assert len(counts) == 15 and counts.min() > 0
        assert chisquare(counts).pvalue > 1e-4  # deterministic seed; a biased sampler fails by far


def test_large_L_needs_sampling():
    L = 24
    a = np.arange(L, dtype=float)
    f = lambda m: np.asarray(m, float) @ a  # noqa: E731
    with pytest.raises(EstimationError, match="permutation"):
        exact_shapley(f, L)
    c = semivalue(f, L, SHAPLEY, n_samples=50)  # falls back to Monte Carlo
    np.testing.assert_allclose(c.values, a, atol=1e-9)


# ---------------------------------------------------------------- ensembles


def test_ensemble_mean_and_spread():
    L = 6
    f, a, Bs = pairwise_game(L)
    truth = a + 0.5 * Bs.sum(axis=1)
    members = [f, lambda m: 2 * f(m), lambda m: 3 * f(m)]
    c = ensemble_mean([exact_shapley(g, L) for g in members])
    np.testing.assert_allclose(c.values, 2 * truth, atol=1e-10)
    np.testing.assert_allclose(c.stderr, np.abs(truth), atol=1e-10)  # std of (1, 2, 3) * x is |x|
    assert isinstance(c, Contributions) and c.n_evaluations == 3 * 2**L
    json.dumps(c.to_dict())
    with pytest.raises(EstimationError, match="at least one"):
        ensemble_mean([])
