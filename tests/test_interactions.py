"""Pairwise interaction indices on synthetic games with closed-form values, against the per-pair
definitions, and against shapiq's exact computer."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from engine.errors import EstimationError
from engine.interactions import (
    INDICES,
    index_weights,
    interaction_index,
    moebius_transform,
    size_weight,
    superset_sums,
)

SHAPIQ_NAME = {"sii": "SII", "stii": "STII", "fsii": "FSII", "banzhaf": "BII"}


def table_game(values: np.ndarray):
    """f(m) = values[code(m)], bit j of the code = layer j kept."""

    def f(m):
        m = np.asarray(m, dtype=bool)
        return values[(m.astype(np.int64) << np.arange(m.shape[1])).sum(axis=1)]

    return f


def random_game(L: int, seed: int = 0):
    return table_game(np.random.default_rng(seed).normal(size=1 << L))


def pairwise_game(L: int, seed: int = 0):
    """f = a.x + sum_{i<j} b_ij x_i x_j: every pair index is b_ij."""
    rng = np.random.default_rng(seed)
    a, B = rng.normal(size=L), np.triu(rng.normal(size=(L, L)), 1)

    def f(m):
        x = np.asarray(m, dtype=float)
        return x @ a + np.einsum("ni,ij,nj->n", x, B, x)

    return f, a, B + B.T


def triple_game(L: int, triple=(0, 2, 3), c: float = 1.5):
    def f(m):
        m = np.asarray(m, dtype=bool)
        return c * m[:, list(triple)].all(axis=1).astype(float)

    return f


def per_pair_definition(f, L: int, index: str) -> np.ndarray:
    """The indices by their discrete-derivative definitions, one pair at a time (literature weights)."""
    values = {S: float(f(np.array([[i in S for i in range(L)]]))[0]) for r in range(L + 1)
              for S in map(frozenset, itertools.combinations(range(L), r))}
    if index == "sii":
        w2 = lambda s: math.factorial(s) * math.factorial(L - s - 2) / math.factorial(L - 1)
        w1 = lambda s: math.factorial(s) * math.factorial(L - s - 1) / math.factorial(L)
    elif index == "banzhaf":
        w2, w1 = (lambda s: 0.5 ** (L - 2)), (lambda s: 0.5 ** (L - 1))
    elif index == "stii":
        w2 = lambda s: 2.0 / (L * math.comb(L - 1, s))
        w1 = lambda s: float(s == 0)
    else:
        raise AssertionError(index)
    M = np.zeros((L, L))
    for i in range(L):
        others = [x for x in range(L) if x != i]
        M[i, i] = sum(w1(r) * (values[frozenset(S) | {i}] - values[frozenset(S)])
                      for r in range(L) for S in itertools.combinations(others, r))
        for j in range(i + 1, L):
            rest = [x for x in range(L) if x not in (i, j)]
            tot = 0.0
            for r in range(L - 1):
                for S in map(frozenset, itertools.combinations(rest, r)):
                    tot += w2(r) * (values[S | {i, j}] - values[S | {i}] - values[S | {j}] + values[S])
            M[i, j] = M[j, i] = tot
    return M


# ---------------------------------------------------------------- closed forms


@pytest.mark.parametrize("index", list(INDICES))
def test_additive_game_has_no_interactions(index):
    L = 7
    a = np.random.default_rng(3).normal(size=L)
    r = interaction_index(lambda m: np.asarray(m, float) @ a, L, index)
    off = r.matrix[~np.eye(L, dtype=bool)]
    np.testing.assert_allclose(off, 0.0, atol=1e-12)
    np.testing.assert_allclose(np.diag(r.matrix), a, atol=1e-12)  # every index's order-1 value of an additive game


@pytest.mark.parametrize("index", list(INDICES))
def test_pairwise_game_pair_values_are_b(index):
    L = 8
    f, a, B = pairwise_game(L)
    r = interaction_index(f, L, index)
    iu = np.triu_indices(L, 1)
    np.testing.assert_allclose(r.matrix[iu], B[iu], atol=1e-10)
    # order 1: Shapley / Banzhaf share each pair equally; STII and FSII keep the Möbius value a_i
    expected = a + B.sum(axis=1) / 2 if index in ("sii", "banzhaf") else a
    np.testing.assert_allclose(np.diag(r.matrix), expected, atol=1e-10)


@pytest.mark.parametrize("index,pair,single", [
    ("sii", 1 / 2, 1 / 3), ("banzhaf", 1 / 2, 1 / 4), ("stii", 1 / 3, 0.0), ("fsii", 1 / 2, -1 / 6),
])
def test_three_way_game_closed_form(index, pair, single):
    L, c, T = 6, 1.5, (0, 2, 3)
    r = interaction_index(triple_game(L, T, c), L, index)
    for i, j in itertools.combinations(range(L), 2):
        expected = c * pair if {i, j} <= set(T) else 0.0
        assert r.matrix[i, j] == pytest.approx(expected, abs=1e-12)
    np.testing.assert_allclose(np.diag(r.matrix), [c * single if i in T else 0.0 for i in range(L)], atol=1e-12)


# ---------------------------------------------------------------- transform = definition


@pytest.mark.parametrize("index", ["sii", "banzhaf", "stii"])
@pytest.mark.parametrize("L", [3, 6, 8])
def test_exact_transform_equals_per_pair_definition(index, L):
    f = random_game(L, seed=L)
    np.testing.assert_allclose(interaction_index(f, L, index).matrix, per_pair_definition(f, L, index), atol=1e-10)


@pytest.mark.parametrize("index", list(INDICES))
def test_derivative_weights_reproduce_the_moebius_form(index):
    # p (derivative form, from exact inversion) used one pair at a time == the butterfly result
    L = 8
    f = random_game(L, seed=11)
    w = index_weights(index, L)
    per_pair = np.zeros((L, L))
    vals = {S: float(f(np.array([[x in S for x in range(L)]]))[0]) for r in range(L + 1)
            for S in map(frozenset, itertools.combinations(range(L), r))}
    for i, j in itertools.combinations(range(L), 2):
        rest = [x for x in range(L) if x not in (i, j)]
        per_pair[i, j] = per_pair[j, i] = sum(
            w.delta2[len(S)] * (vals[S | {i, j}] - vals[S | {i}] - vals[S | {j}] + vals[S])
            for r in range(L - 1) for S in map(frozenset, itertools.combinations(rest, r)))
    for i in range(L):
        rest = [x for x in range(L) if x != i]
        per_pair[i, i] = sum(w.delta1[len(S)] * (vals[S | {i}] - vals[S])
                             for r in range(L) for S in map(frozenset, itertools.combinations(rest, r)))
    np.testing.assert_allclose(interaction_index(f, L, index).matrix, per_pair, atol=1e-10)


def test_sii_derivative_weights_match_closed_form_at_l80():
    L = 80
    w = index_weights("sii", L)
    closed = np.array([1.0 / ((L - 1) * math.comb(L - 2, s)) for s in range(L - 1)])
    np.testing.assert_allclose(w.delta2, closed, rtol=1e-12)
    np.testing.assert_allclose(w.delta1, [1.0 / (L * math.comb(L - 1, s)) for s in range(L)], rtol=1e-12)


def test_moebius_and_superset_butterflies_invert_known_sums():
    L = 5
    v = np.random.default_rng(0).normal(size=1 << L)
    a = moebius_transform(v)
    # f(T) = sum_{S ⊆ T} a(S): the subset sum of the Möbius transform gives f back
    back = np.array([sum(a[s] for s in range(1 << L) if s & t == s) for t in range(1 << L)])
    np.testing.assert_allclose(back, v, atol=1e-12)
    c = superset_sums(v)
    assert c[0] == pytest.approx(v.sum()) and c[(1 << L) - 1] == v[-1]
    assert c[0b00101] == pytest.approx(sum(v[s] for s in range(1 << L) if s & 0b00101 == 0b00101))


# ---------------------------------------------------------------- axioms


@pytest.mark.parametrize("index", list(INDICES))
def test_symmetry_and_player_relabelling(index):
    L = 7
    f = random_game(L, seed=5)
    perm = np.random.default_rng(1).permutation(L)
    r = interaction_index(f, L, index)
    np.testing.assert_allclose(r.matrix, r.matrix.T, atol=0)
    # g(m) = f(m with layer perm[i] placed at i): g's (i, j) is f's (perm[i], perm[j])
    g = lambda m: f(np.asarray(m)[:, np.argsort(perm)])
    np.testing.assert_allclose(interaction_index(g, L, index).matrix, r.matrix[np.ix_(perm, perm)], atol=1e-10)


@pytest.mark.parametrize("index", ["stii", "fsii"])
def test_efficient_indices_share_out_grand_minus_empty(index):
    L = 8
    f = random_game(L, seed=2)
    r = interaction_index(f, L, index)
    full, empty = f(np.ones((1, L), bool))[0], f(np.zeros((1, L), bool))[0]
    total = np.trace(r.matrix) + r.matrix[np.triu_indices(L, 1)].sum()
    assert total == pytest.approx(full - empty, abs=1e-9)
    assert abs(r.details["efficiency"]["gap"]) < 1e-9


def test_sii_diagonal_is_shapley_and_banzhaf_diagonal_is_banzhaf():
    from engine.shapley import BANZHAF, exact_shapley, semivalue

    L = 8
    f = random_game(L, seed=9)
    np.testing.assert_allclose(np.diag(interaction_index(f, L, "sii").matrix), exact_shapley(f, L).values, atol=1e-10)
    np.testing.assert_allclose(np.diag(interaction_index(f, L, "banzhaf").matrix),
                               semivalue(f, L, BANZHAF).values, atol=1e-10)


# ---------------------------------------------------------------- shapiq


@pytest.mark.parametrize("index", list(INDICES))
@pytest.mark.parametrize("game", ["random", "pairwise", "triple"])
def test_matches_shapiq_exact_computer(index, game):
    from shapiq import ExactComputer

    L = 6
    f = {"random": random_game(L, 4), "pairwise": pairwise_game(L, 1)[0], "triple": triple_game(L)}[game]
    iv = ExactComputer(f, n_players=L)(SHAPIQ_NAME[index], order=2)
    r = interaction_index(f, L, index)
    for i in range(L):
        assert r.matrix[i, i] == pytest.approx(iv[(i,)], abs=1e-8)
        for j in range(i + 1, L):
            assert r.matrix[i, j] == pytest.approx(iv[(i, j)], abs=1e-8)


# ---------------------------------------------------------------- Monte Carlo


@pytest.mark.parametrize("index", list(INDICES))
def test_monte_carlo_agrees_with_exact_within_its_stderr(index):
    L = 7
    f = random_game(L, seed=6)
    exact = interaction_index(f, L, index)
    mc = interaction_index(f, L, index, n_samples=6000, seed=1)
    z = (mc.matrix - exact.matrix) / mc.stderr
    assert np.all(mc.stderr > 0)
    assert np.abs(z).max() < 4.5
    assert mc.n_evaluations == 6000 * (1 + L + L * (L - 1) // 2)
    assert mc.method.startswith("Monte Carlo")


def test_monte_carlo_sii_of_a_pairwise_game_is_exact_at_l32():
    # uniform kept counts make every SII pair importance weight 1, and Δ_ij of a pairwise game is b_ij
    L = 32
    f, a, B = pairwise_game(L, seed=2)
    r = interaction_index(f, L, "sii", n_samples=64, seed=0)
    iu = np.triu_indices(L, 1)
    np.testing.assert_allclose(r.matrix[iu], B[iu], atol=1e-9)
    assert np.all(r.stderr[iu] < 1e-9)
    # the order-1 terms Δ_i = a_i + sum_j b_ij x_j do vary with the coalition: noisy, unbiased
    z = (np.diag(r.matrix) - (a + B.sum(axis=1) / 2)) / np.diag(r.stderr)
    assert np.abs(z).max() < 4.5


@pytest.mark.parametrize("L", [32, 40, 80])
def test_monte_carlo_runs_above_the_exact_limit(L):
    T = (1, 5, L - 1)
    r = interaction_index(triple_game(L, T, 2.0), L, "sii", n_samples=200, seed=0)
    assert r.matrix.shape == (L, L) and np.all(np.isfinite(r.stderr))
    z = (r.matrix[1, 5] - 1.0) / r.stderr[1, 5]  # SII of a triple: c / 2 on its pairs
    assert abs(z) < 4.5
    assert r.matrix[0, 2] == 0.0 and r.stderr[0, 2] == 0.0  # pairs outside the triple never move


@pytest.mark.parametrize("index", ["stii", "banzhaf", "fsii"])
def test_monte_carlo_unbiased_on_pairwise_game_at_l32(index):
    L = 32
    f, _, B = pairwise_game(L, seed=4)
    r = interaction_index(f, L, index, n_samples=400, seed=3)
    iu = np.triu_indices(L, 1)
    err, se = r.matrix[iu] - B[iu], r.stderr[iu]
    if index == "banzhaf":  # uniform masks: every Banzhaf pair weight is 1, Δ_ij = b_ij, no noise
        np.testing.assert_allclose(err, 0.0, atol=1e-9)
        return
    z = err / se
    assert np.abs(z).max() < 5.0
    assert np.mean(np.abs(z) < 2) > 0.85


# ---------------------------------------------------------------- ensembles, records, weights


def test_ensemble_mean_and_spread():
    L = 6
    f1, f2 = random_game(L, 1), random_game(L, 2)
    r = interaction_index([f1, f2], L, "sii")
    m1, m2 = interaction_index(f1, L, "sii").matrix, interaction_index(f2, L, "sii").matrix
    np.testing.assert_allclose(r.matrix, (m1 + m2) / 2, atol=1e-12)
    np.testing.assert_allclose(r.stderr, np.abs(m1 - m2) / np.sqrt(2), atol=1e-12)  # std, ddof=1
    assert r.n_evaluations == 2 * 2**L and r.details["n_members"] == 2


def test_size_weight_and_unsampled_fraction():
    L = 16
    sw = size_weight("sii", L)
    assert sw.shape == (L + 1,) and sw.sum() == pytest.approx(1.0) and np.all(sw >= 0)
    f = random_game(L, 0)
    everything = interaction_index(f, L, "sii", sampled_sizes=range(L + 1))
    assert everything.details["unsampled_weight_fraction"] == pytest.approx(0.0, abs=1e-12)
    strata = (15, 13, 12, 10, 9)
    r = interaction_index(f, L, "sii", sampled_sizes=strata)
    assert r.details["unsampled_weight_fraction"] == pytest.approx(1 - sw[list(strata)].sum())
    assert r.details["unsampled_weight_fraction"] > 0.5  # SII weighs every kept count about equally
    # Banzhaf concentrates on middle counts
    assert size_weight("banzhaf", L)[L // 2] > size_weight("banzhaf", L)[L - 1]


def test_record_pairs_sorted_and_json():
    L = 6
    r = interaction_index(triple_game(L), L, "sii")
    pairs = r.pairs()
    assert len(pairs) == L * (L - 1) // 2
    assert [abs(p["value"]) for p in pairs] == sorted((abs(p["value"]) for p in pairs), reverse=True)
    assert {(p["i"], p["j"]) for p in pairs[:3]} == {(0, 2), (0, 3), (2, 3)}
    d = json.loads(json.dumps(r.to_dict()))
    assert d["index"] == "sii" and "Shapley values" in d["diagonal"]
    assert np.array(d["matrix"]).shape == (L, L) and d["n_evaluations"] == 2**L


def test_errors():
    with pytest.raises(EstimationError, match="unknown interaction index"):
        interaction_index(random_game(3), 3, "nope")
    with pytest.raises(EstimationError, match="at least 2 layers"):
        interaction_index(lambda m: np.zeros(len(m)), 1, "sii")


# ---------------------------------------------------------------- residual check


def test_signed_coefficients_reproduce_the_exact_index():
    from engine.interaction_intervals import signed_coefficients

    L = 6
    f = random_game(L, 8)
    codes = np.arange(1 << L)
    masks = ((codes[:, None] >> np.arange(L)) & 1).astype(bool)
    single, pair = signed_coefficients(masks, "stii")
    v = f(masks)
    M = interaction_index(f, L, "stii").matrix
    iu = np.triu_indices(L, 1)
    np.testing.assert_allclose(v @ pair, M[iu], atol=1e-10)
    np.testing.assert_allclose(v @ single, np.diag(M), atol=1e-10)


def test_residual_check_is_unbiased_for_a_misspecified_surrogate():
    # the real game has a 3-way term; the "surrogate" is additive (least squares on the mask bits), so
    # its pair values are all 0 and the SII of pairs in the triple (c / 2) is missed; the residual
    # check corrects it from size-uniform draws
    from engine.interaction_intervals import residual_check

    L, c = 7, 1.5
    rng = np.random.default_rng(0)
    a = rng.normal(size=L)
    f = lambda m: np.asarray(m, float) @ a + c * np.asarray(m)[:, [0, 2, 3]].all(axis=1)  # noqa: E731
    truth = interaction_index(f, L, "sii").matrix

    def fit(X, y):
        A = np.c_[np.ones(len(X)), X.astype(float)]  # (n, 1 + L)
        coef = np.linalg.lstsq(A, y, rcond=None)[0]
        return lambda m: np.c_[np.ones(len(m)), np.asarray(m, float)] @ coef

    n = 4000
    sizes = rng.integers(0, L + 1, n)
    masks = np.array([rng.permutation(L) < s for s in sizes])  # size-uniform draws, (n, L)
    prob = 1.0 / ((L + 1) * np.array([math.comb(L, int(s)) for s in masks.sum(axis=1)]))
    r = residual_check(masks, f(masks), prob, fit, "sii", folds=4, seed=0)
    biased = interaction_index(fit(masks, f(masks)), L, "sii").matrix
    assert abs(biased[0, 2] - truth[0, 2]) == pytest.approx(c / 2, abs=1e-9)  # an additive model has no pairs
    z = (r["corrected"] - truth) / r["stderr"]
    assert np.abs(z).max() < 4.5 and r["covered_weight"] == pytest.approx(1.0)
    assert abs(r["corrected"][0, 2] - truth[0, 2]) < abs(biased[0, 2] - truth[0, 2]) / 3


def _pairwise_lstsq(X, y):
    """Least squares on [1, m, m_i m_j]: exact on a pairwise game, a value function of its fit."""
    iu, ju = np.triu_indices(X.shape[1], 1)

    def feats(m):
        m = np.asarray(m, float)
        return np.c_[np.ones(len(m)), m, m[:, iu] * m[:, ju]]

    coef = np.linalg.lstsq(feats(X), y, rcond=None)[0]
    return lambda m: feats(m) @ coef


def test_jackknife_interval_matches_the_spread_over_fresh_samples():
    from engine.interaction_intervals import jackknife_interval

    L, n, sd = 5, 60, 0.3
    f, _, _ = pairwise_game(L, seed=1)
    rng = np.random.default_rng(0)
    iu = np.triu_indices(L, 1)
    estimates, ses = [], []
    for rep in range(150):  # fresh noisy data sets: the real spread of the estimate vs the jackknife's
        X = rng.random((n, L)) < 0.5
        y = f(X) + rng.normal(0, sd, n)
        est = interaction_index(_pairwise_lstsq(X, y), L, "sii")
        r = jackknife_interval(X, y, _pairwise_lstsq, est, "sii", folds=5, seed=rep)
        estimates.append(est.matrix[iu])
        ses.append(r.stderr[iu])
    ratio = np.mean(ses, axis=0) / np.std(estimates, axis=0)  # (P,)
    assert 0.75 < np.median(ratio) < 1.35  # without the (K-1)/K factor it would be ~2


def test_jackknife_interval_bias_allowance_level_and_exact_fits():
    from engine.interaction_intervals import jackknife_interval

    L = 5
    f, _, B = pairwise_game(L, seed=2)
    X = np.random.default_rng(1).random((40, L)) < 0.5
    est = interaction_index(_pairwise_lstsq(X, f(X)), L, "sii")
    exact = jackknife_interval(X, f(X), _pairwise_lstsq, est, "sii", folds=4)
    np.testing.assert_allclose(exact.stderr, 0, atol=1e-9)  # every group's fit is exact: nothing to resample
    bias = np.full((L, L), 0.01)
    r = jackknife_interval(X, f(X), _pairwise_lstsq, est, "sii", folds=4, level=0.8, bias=bias)
    np.testing.assert_allclose(r.stderr, 0.01, atol=1e-9)
    iv = r.details["interval"]
    np.testing.assert_allclose(iv["high"] - r.matrix, 1.2815516 * 0.01, rtol=1e-6)
    np.testing.assert_allclose(r.matrix - iv["low"], 1.2815516 * 0.01, rtol=1e-6)
    assert iv["folds"] == 4 and r.n_evaluations == est.n_evaluations + 4 * (1 << L)
    json.dumps(r.to_dict())
    with pytest.raises(EstimationError, match="jackknife"):
        jackknife_interval(X, f(X), _pairwise_lstsq, est, "sii", folds=1)
    with pytest.raises(EstimationError, match="at least 60"):
        jackknife_interval(X, f(X), _pairwise_lstsq, est, "sii", folds=30)


def test_jackknife_interval_separates_the_seed_noise_of_the_fits():
    # every fit is exact plus seed noise (independent of the data): the jackknife alone inflates it by
    # (K-1)^2/K; with seed_noise the inflation is removed and the ensemble mean's own sigma^2/k kept
    from engine.interaction_intervals import jackknife_interval

    L, K, k, sigma = 5, 5, 10, 0.05
    f, _, _ = pairwise_game(L, seed=3)
    X = np.random.default_rng(2).random((50, L)) < 0.5
    rng = np.random.default_rng(3)

    def noisy(_X, _y):
        g = _pairwise_lstsq(_X, _y)
        e, _, _ = pairwise_game(L, seed=int(rng.integers(1 << 30)))
        return lambda m: g(m) + sigma * e(m)

    iu = np.triu_indices(L, 1)
    raw, fixed = [], []
    for rep in range(30):
        est = interaction_index([noisy(X, f(X)) for _ in range(k)], L, "sii")
        raw.append(jackknife_interval(X, f(X), noisy, est, folds=K, seed=rep).stderr[iu] ** 2)
        fixed.append(jackknife_interval(X, f(X), noisy, est, folds=K, seed=rep, seed_noise=True).stderr[iu] ** 2)
    member_var = sigma**2  # the pair values of the noise game are N(0, 1) x sigma
    assert 2.5 < np.mean(raw) / member_var < 4.5  # (K-1)^2/K = 3.2 member variances, plus 1/k
    # 1/k of a member's variance remains, plus what max(., 0) keeps of the noisy difference (the
    # spread is estimated from k = 10 members)
    assert 0.25 < np.mean(fixed) / member_var < 0.5 * np.mean(raw) / member_var


def test_parts_disagreement_is_half_the_gap_between_the_parts():
    from engine.interaction_intervals import parts_disagreement

    L = 4
    g1, _, B1 = pairwise_game(L, seed=4)
    g2, _, B2 = pairwise_game(L, seed=5)

    class Mean:
        def __init__(self, a, b):
            self.a, self.b = a, b

        def parts(self):
            return self.a, self.b

        def __call__(self, m):
            return 0.5 * (self.a(m) + self.b(m))

    d = parts_disagreement([Mean(g1, g2), Mean(g1, g2)], L, "sii")
    iu = np.triu_indices(L, 1)
    np.testing.assert_allclose(d[iu], np.abs(B1 - B2)[iu] / 2, atol=1e-12)
    assert parts_disagreement([g1], L) is None


def test_jackknife_interval_passes_each_groups_weights_to_the_fit():
    from engine.interaction_intervals import jackknife_interval

    L = 4
    f, _, _ = pairwise_game(L, seed=6)
    X = np.random.default_rng(4).random((24, L)) < 0.5
    y = f(X)
    w = np.arange(1.0, 25.0)  # row i weighs i + 1: identifies the rows each fit received
    seen = []

    def fit(Xk, yk, wk):
        rows = (wk - 1).astype(int)
        np.testing.assert_array_equal(Xk, X[rows])
        np.testing.assert_array_equal(yk, y[rows])
        seen.append(set(rows.tolist()))
        return _pairwise_lstsq(Xk, yk)

    est = interaction_index(_pairwise_lstsq(X, y), L, "sii")
    jackknife_interval(X, y, fit, est, "sii", folds=3, sample_weight=w)
    assert len(seen) == 3 and all(len(s) == 16 for s in seen)  # each fit leaves out one group of 8
    assert set().union(*[set(range(24)) - s for s in seen]) == set(range(24))  # every row left out once


def test_index_on_the_sampled_kept_counts():
    from engine.interaction_intervals import restricted_index, restricted_weights

    L = 7
    f = random_game(L, 3)
    everything = restricted_weights("sii", L, range(L + 1))  # every count known: the index itself
    np.testing.assert_allclose(restricted_index(f, everything), interaction_index(f, L, "sii").matrix, atol=1e-12)
    rw = restricted_weights("sii", L, (4, 5, 6, 7))
    assert np.flatnonzero(rw.delta2).tolist() == [4, 5] and np.flatnonzero(rw.delta1).tolist() == [4, 5, 6]
    assert sum(math.comb(L - 2, s) * rw.delta2[s] for s in range(L - 1)) == pytest.approx(1.0)
    assert rw.label == "Shapley interaction index on the sampled kept counts 4-7"
    assert restricted_weights("sii", 16, (9, 10, 12, 13, 15, 16)) is None  # the demo's strata: no 3 in a row
    # an additive game has no interactions on any coalitions
    a = np.arange(L, dtype=float)
    M = restricted_index(lambda m: np.asarray(m, float) @ a, rw)
    assert np.abs(M[np.triu_indices(L, 1)]).max() < 1e-12


def test_regression_adjusted_index_is_unbiased_on_the_sampled_counts_and_labels_them():
    """Stratified draws (kept 4, 5, 6 of 7, the full mask appended); the real game has a 3-way term the
    additive surrogate misses: the restricted index is recovered within its stderr, no bias term."""
    from engine.config import SamplingSpec
    from engine.interaction_intervals import regression_adjusted_index, restricted_index, restricted_weights
    from engine.sampling import sample_masks

    L, c = 7, 1.5
    a = np.random.default_rng(0).normal(size=L)
    f = lambda m: np.asarray(m, float) @ a + c * np.asarray(m)[:, [0, 2, 3]].all(axis=1)  # noqa: E731

    def fit(X, y):
        A = np.c_[np.ones(len(X)), X.astype(float)]
        coef = np.linalg.lstsq(A, y, rcond=None)[0]
        return lambda m: np.c_[np.ones(len(m)), np.asarray(m, float)] @ coef

    truth = restricted_index(f, restricted_weights("sii", L, (4, 5, 6, 7)))
    iu = np.triu_indices(L, 1)
    errs, inside = [], []
    for seed in range(12):
        masks = sample_masks(SamplingSpec(n_masks=60, strata=(6, 5, 4), seed=seed), L)
        r = regression_adjusted_index(masks, f(masks), fit, "sii", seed=seed, full_score=float(f(np.ones((1, L)))[0]))
        assert r.details["restricted"] and r.details["known_kept_counts"] == [4, 5, 6, 7]
        assert r.to_dict()["name"] == "Shapley interaction index on the sampled kept counts 4-7"
        iv = r.details["interval"]
        inside.append(((iv["low"] <= truth) & (truth <= iv["high"]))[iu])
        errs.append((r.matrix - truth)[iu])
    errs = np.array(errs)
    assert np.all(np.abs(errs.mean(0)) < 4.5 * errs.std(0, ddof=1) / math.sqrt(len(errs)) + 1e-12)
    assert np.mean(inside) >= 0.8
    surrogate = restricted_index(fit(masks, f(masks)), restricted_weights("sii", L, (4, 5, 6, 7)))
    assert abs(surrogate[0, 2] - truth[0, 2]) > 0.1  # the surrogate alone misses the triple's pairs
    with pytest.raises(EstimationError, match="sampled kept counts"):
        regression_adjusted_index(masks, f(masks), fit, "sii", known=(4, 6, 7))


def test_the_surrogate_index_says_when_it_extrapolates():
    L = 16
    r = interaction_index(random_game(L, 0), L, "sii", sampled_sizes=(15, 13, 12, 10, 9))
    assert r.details["extrapolated"] and "extrapolated" in r.to_dict()["name"]
    assert "kept counts never sampled (sampled 9-10, 12-13, 15)" in r.details["estimand"]
    full = interaction_index(random_game(L, 0), L, "sii", sampled_sizes=range(L + 1))
    assert not full.details["extrapolated"] and full.to_dict()["name"] == INDICES["sii"] + " of the surrogate"


def test_regression_adjusted_index_is_exact_when_every_mask_of_the_sampled_counts_is_known():
    from engine.interaction_intervals import regression_adjusted_index, restricted_index, restricted_weights

    L = 6
    f = random_game(L, 1)
    codes = np.arange(1 << L)
    masks = ((codes[:, None] >> np.arange(L)) & 1).astype(bool)
    masks = masks[masks.sum(axis=1) >= 3]  # every mask keeping 3..6 layers
    r = regression_adjusted_index(masks, f(masks), lambda X, y: f, "sii")
    truth = restricted_index(f, restricted_weights("sii", L, (3, 4, 5, 6)))
    np.testing.assert_allclose(r.matrix, truth, atol=1e-12)
    assert np.all(r.stderr == 0) and r.details["known_kept_counts"] == [3, 4, 5, 6]
