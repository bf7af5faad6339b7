"""Intervals and real-evaluation corrections for the pairwise interaction indices of engine.interactions
(numpy only; value functions in, no model).

- `residual_check`: cross-fitted residuals of the real evaluations, reweighted by their design
  probabilities, added to the surrogate's index (the regression-adjusted estimator for pairs).
- `jackknife_interval`: the interval `engine interactions` reports, a delete-a-group jackknife over the
  evaluated masks with the MLP's seed noise separated and a bias allowance (`parts_disagreement`) in
  quadrature.
- `restricted_weights` / `restricted_index` / `regression_adjusted_index`: the index restricted to the
  coalitions whose masks all have a sampled kept count, and its cross-fitted estimate post-stratified by
  kept count (unbiased whatever the surrogate's bias).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from engine.errors import EstimationError
from engine.interactions import (DEFAULT_SAMPLES, EXACT_MAX_L, INDICES, Interactions, ValueFn, all_values,
                                 count_ranges, index_weights, interaction_index, matrix_from_values, monte_carlo,
                                 size_weight, to_matrix)
from engine.shapley import DEFAULT_CHUNK, _evaluate, _masks_from_codes


# ---------------------------------------------------------------- bias check on real evaluations


def signed_coefficients(masks: np.ndarray, index: str) -> tuple[np.ndarray, np.ndarray]:
    """(float[n, L], float[n, P]): c(T) such that I = sum over all masks T of f(T) c(T), for the
    order-1 values and the pairs (np.triu_indices order). From the derivative form: T enters
    Δ_ij f(T minus {i, j}) with sign (-1)^(number of i, j not in T) and weight p_2(|T minus {i, j}|)."""
    masks = np.asarray(masks, dtype=bool)
    n, L = masks.shape
    w = index_weights(index, L)
    iu, ju = np.triu_indices(L, k=1)
    b = masks.astype(np.int64)  # (n, L)
    size = b.sum(axis=1, keepdims=True)  # (n, 1)
    single = np.where(masks, 1.0, -1.0) * w.delta1[size - b]  # (n, L)
    c2 = b[:, iu] + b[:, ju]  # (n, P): how many of i, j are kept
    pair = np.where(c2 == 1, -1.0, 1.0) * w.delta2[size - c2]  # (n, P)
    return single, pair


def residual_check(
    masks: np.ndarray,
    values: np.ndarray,
    probabilities: np.ndarray,
    fit: Callable[[np.ndarray, np.ndarray], ValueFn],
    index: str = "sii",
    folds: int = 5,
    seed: int = 0,
) -> dict:
    """Cross-fitted check of the surrogate's index against the real evaluations (the regression-
    adjusted estimator of Witter, Liu & Musco 2025, for interactions).

    For each of `folds` folds: fit(masks, values) on the other folds, its exact index, plus the
    Monte Carlo estimate of the index of the residual game from the held-out fold,
    mean of c(T) (f(T) - g(T)) / p(T) with p the design probability of one draw
    (engine.sampling.mask_probability). Unbiased for the index of the real game when every kept
    count with index weight has p > 0 (size-uniform or paired runs); on a stratified run it only
    corrects the sampled counts (`covered_weight` says how much of the index that is).
    Returns {"corrected": float[L, L], "stderr": float[L, L], "correction": float[L, L],
    "covered_weight": float, "folds": int}. Wide but honest: on the demo game (paired and mixed
    designs) 2-stderr intervals covered the exact SII of 88-96% of the pairs (bench/README.md).
    """
    masks = np.asarray(masks, dtype=bool)
    values = np.asarray(values, dtype=np.float64)
    p = np.asarray(probabilities, dtype=np.float64)
    n, L = masks.shape
    if len(values) != n or len(p) != n:
        raise EstimationError("masks, values and probabilities must have the same length")
    if np.any(~(p > 0)):
        raise EstimationError("every evaluated mask needs a positive design probability")
    if folds < 2 or n < 2 * folds:
        raise EstimationError(f"cross-fitting with {folds} folds needs at least {2 * folds} masks, got {n}")
    assign = np.random.default_rng(seed).permutation(n) % folds
    P = L * (L - 1) // 2
    surrogate = np.zeros(L + P)
    terms = np.empty((n, L + P))  # per-mask residual terms c(T) r(T) / p(T)
    iu, ju = np.triu_indices(L, k=1)
    for k in range(folds):
        test = assign == k
        g = fit(masks[~test], values[~test])
        M = matrix_from_values(all_values(g, L), index) if L <= EXACT_MAX_L else \
            monte_carlo([g], L, index, DEFAULT_SAMPLES, seed + k, DEFAULT_CHUNK)[0][0]
        surrogate += test.mean() * np.concatenate([np.diag(M), M[iu, ju]])
        r = values[test] - _evaluate(g, masks[test], DEFAULT_CHUNK)  # (n_k,)
        single, pair = signed_coefficients(masks[test], index)
        terms[test] = np.concatenate([single, pair], axis=1) * (r / p[test])[:, None]
    correction = terms.mean(axis=0)
    se = terms.std(axis=0, ddof=1) / np.sqrt(n)
    sw = size_weight(index, L)
    covered = float(sw[np.unique(masks.sum(axis=1))].sum())
    return {"corrected": to_matrix(surrogate + correction, L), "stderr": to_matrix(se, L),
            "correction": to_matrix(correction, L), "covered_weight": covered, "folds": int(folds)}


# ---------------------------------------------------------------- resampling interval over the masks


def jackknife_interval(
    masks: np.ndarray,
    values: np.ndarray,
    fit: Callable[[np.ndarray, np.ndarray], ValueFn],
    estimate: Interactions,
    index: str = "sii",
    folds: int = 5,
    seed: int = 0,
    seed_noise: bool = False,
    n_samples: int | None = None,
    mc_seed: int = 0,
    level: float = 0.9,
    bias: np.ndarray | None = None,
    sample_weight: np.ndarray | None = None,
) -> Interactions:
    """`estimate` (the index of an ensemble fitted on all the masks) with a standard error that
    includes the sampling of the masks: the delete-a-group jackknife over `folds` random groups.

    For each group k: fit(masks without group k, their values[, their sample_weight when given]) -> one
    value function, its index
    (exact for L <= EXACT_MAX_L unless n_samples, else Monte Carlo with `mc_seed`, the same draws
    for every group). Jackknife variance: (K-1)/K * sum_k (I_k - mean)^2, float[L, L].
    seed_noise: each fit also varies with its random seed (MLP members); the jackknife multiplies
    that variance by (K-1)^2/K, so it is subtracted (estimated by the ensemble's spread over members,
    `estimate.details['ensemble_spread']`), and the ensemble mean's own seed variance spread^2/k is
    added back. bias: float[L, L], a bias allowance added in quadrature (`parts_disagreement`: the
    jackknife sees the noise of the fits, not a bias that all of them share). Returned: `estimate`
    with stderr = sqrt(jackknife (corrected) + spread^2/k + Monte Carlo variance + bias^2),
    details['interval'] = {level, low, high, folds, jackknife_stderr, bias_allowance}, float[L, L]
    each. Calibrated on the demo game in bench/README.md (Interactions: coverage).
    """
    masks = np.asarray(masks, dtype=bool)
    values = np.asarray(values, dtype=np.float64)
    n, L = masks.shape
    if len(values) != n:
        raise EstimationError("masks and values must have the same length")
    if folds < 2 or n < 2 * folds:
        raise EstimationError(f"a {folds}-group jackknife needs at least {2 * folds} masks, got {n}")
    if not 0 < level < 1:
        raise EstimationError(f"level must be in (0, 1); got {level}")
    group = np.random.default_rng(seed).permutation(n) % folds  # (n,)
    keep = [group != k for k in range(folds)]  # (n,) rows fitted without group k
    fits = [fit(masks[r], values[r]) if sample_weight is None else fit(masks[r], values[r], np.asarray(sample_weight)[r])
            for r in keep]
    parts = [interaction_index(g, L, index, n_samples=n_samples, seed=mc_seed) for g in fits]
    mats = np.stack([r.matrix for r in parts])  # (K, L, L)
    jk_var = (folds - 1) / folds * ((mats - mats.mean(axis=0)) ** 2).sum(axis=0)  # (L, L)
    spread = np.asarray(estimate.details.get("ensemble_spread", np.zeros((L, L))))  # (L, L), one member's sd
    k = int(estimate.details.get("n_members", 1))
    if seed_noise:
        jk_var = np.maximum(jk_var - (folds - 1) ** 2 / folds * spread**2, 0.0)
    mc = np.asarray(estimate.details.get("monte_carlo_stderr", np.zeros((L, L))))
    allowance = np.zeros((L, L)) if bias is None else np.abs(np.asarray(bias, dtype=np.float64))  # (L, L)
    se = np.sqrt(jk_var + spread**2 / k + mc**2 + allowance**2)  # (L, L)
    z = _normal_quantile(0.5 + level / 2)
    details = {**estimate.details,
               "interval": {"level": level, "low": estimate.matrix - z * se, "high": estimate.matrix + z * se,
                            "folds": int(folds), "jackknife_stderr": np.sqrt(jk_var), "seed_noise_removed": seed_noise,
                            "bias_allowance": allowance},
               "stderr_is": f"sqrt(delete-a-group jackknife over the masks ({folds} groups) + the ensemble mean's seed "
                            "variance + Monte Carlo variance" + (" + the surrogate parts' disagreement^2" if bias is not
                                                                 None else "") + "): the sampling noise of the evaluated "
                            "masks is included" + ("; a bias that both parts share is not" if bias is not None else
                                                   "; a bias that every fit shares (kept counts never sampled) is not")}
    n_eval = estimate.n_evaluations + sum(r.n_evaluations for r in parts)
    return Interactions(estimate.index, estimate.matrix, se, estimate.method, int(n_eval), details)


def parts_disagreement(members: Sequence, L: int, index: str = "sii", n_samples: int | None = None,
                       seed: int = 0) -> np.ndarray | None:
    """Half the absolute difference, float[L, L], between the index of the members' first parts and of
    their second parts (members with ``parts() -> (g1, g2)`` whose mean they are, e.g. the MLP and the
    log-pairwise model of surrogate mlp+log-pairwise): the index of the mean lies between the two, so
    this is a bias allowance from two model classes fitted on the same masks. None if a member has no
    parts. 2 x (k) more index computations (exact, or Monte Carlo with `n_samples` and `seed`)."""
    if not members or not all(hasattr(m, "parts") for m in members):
        return None
    first = interaction_index([m.parts()[0] for m in members], L, index, n_samples=n_samples, seed=seed).matrix
    second = interaction_index([m.parts()[1] for m in members], L, index, n_samples=n_samples, seed=seed).matrix
    return np.abs(first - second) / 2  # (L, L)


def _normal_quantile(p: float) -> float:
    """Standard normal quantile (scipy-free)."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(p)


# ---------------------------------------------------------------- the index on the sampled kept counts


@dataclass(frozen=True)
class RestrictedWeights:
    """An index's derivative-form weights kept only on coalitions whose masks all have a known kept count.

    delta2[s], s = 0..L-2: p_2(s) where s, s+1, s+2 are all in `known`, else 0; delta1[s], s = 0..L-1:
    p_1(s) where s, s+1 are. Each is rescaled so that its total weight sum_s C(L-t, s) p_t(s) is the
    full index's (1 for SII), i.e. the index's average of Δ_T f over the coalitions it can see."""

    index: str
    L: int
    known: tuple[int, ...]
    delta2: np.ndarray
    delta1: np.ndarray

    @property
    def label(self) -> str:
        return f"{INDICES[self.index]} on the sampled kept counts {count_ranges(self.known)}"


def restricted_weights(index: str, L: int, known) -> RestrictedWeights | None:
    """`index` restricted to the coalitions whose masks (S, S+i, S+j, S+ij) all have a kept count in
    `known` (the sampled counts; add L, the full mask, known exactly); None when no pair coalition
    qualifies (e.g. the demo's strata 9, 10, 12, 13, 15: no three consecutive counts)."""
    w = index_weights(index, L)
    ok = {int(k) for k in known}
    keep2 = np.array([s in ok and s + 1 in ok and s + 2 in ok for s in range(L - 1)])
    keep1 = np.array([s in ok and s + 1 in ok for s in range(L)])
    c2 = np.array([math.comb(L - 2, s) for s in range(L - 1)], dtype=np.float64)
    c1 = np.array([math.comb(L - 1, s) for s in range(L)], dtype=np.float64)
    t2, t1 = float(np.sum(c2 * w.delta2 * keep2)), float(np.sum(c1 * w.delta1 * keep1))
    if not keep2.any() or t2 == 0 or t1 == 0:
        return None
    return RestrictedWeights(index, L, tuple(sorted(ok)), w.delta2 * keep2 * (np.sum(c2 * w.delta2) / t2),
                             w.delta1 * keep1 * (np.sum(c1 * w.delta1) / t1))


def _coefficients(masks: np.ndarray, delta1: np.ndarray, delta2: np.ndarray) -> np.ndarray:
    """float[n, L + P]: c(T) of each mask T in I = sum_T f(T) c(T) (order-1 | pairs, triu order), for
    derivative weights delta1 / delta2 (see `signed_coefficients`)."""
    b = masks.astype(np.int64)  # (n, L)
    L = b.shape[1]
    iu, ju = np.triu_indices(L, k=1)
    size = b.sum(axis=1, keepdims=True)  # (n, 1)
    single = np.where(masks, 1.0, -1.0) * delta1[size - b]  # (n, L)
    c2 = b[:, iu] + b[:, ju]  # (n, P)
    d2 = np.concatenate([delta2, [0.0, 0.0]])  # index size - c2 may reach L - 1 (never weighted)
    pair = np.where(c2 == 1, -1.0, 1.0) * d2[size - c2]  # (n, P)
    return np.concatenate([single, pair], axis=1)


def index_by_size(f: ValueFn, rw: RestrictedWeights, chunk: int = 1 << 14) -> np.ndarray:
    """C[j] = sum over masks T with |T| = j of c(T) f(T), float[L+1, L+P]: C.sum(0) is the restricted
    index of f (order-1 | pairs). Exact enumeration of the 2^L masks (L <= EXACT_MAX_L)."""
    L = rw.L
    if L > EXACT_MAX_L:
        raise EstimationError(f"the index on the sampled kept counts enumerates 2^L masks (L <= {EXACT_MAX_L})")
    out = np.zeros((L + 1, L + L * (L - 1) // 2))
    for a in range(0, 1 << L, chunk):
        m = _masks_from_codes(np.arange(a, min(a + chunk, 1 << L), dtype=np.int64), L)  # (c, L)
        v = _evaluate(f, m, chunk)  # (c,)
        np.add.at(out, m.sum(axis=1), _coefficients(m, rw.delta1, rw.delta2) * v[:, None])
    return out


def restricted_index(f: ValueFn, rw: RestrictedWeights) -> np.ndarray:
    """float[L, L]: the restricted index of f (pairs off the diagonal, order-1 values on it)."""
    return to_matrix(index_by_size(f, rw).sum(axis=0), rw.L)


def _folds_by_size(sizes: np.ndarray, k: int, seed: int) -> np.ndarray:
    """int[n]: a seeded shuffle within each kept count dealt round-robin over k folds."""
    rng = np.random.default_rng(seed)
    out = np.empty(len(sizes), dtype=np.int64)
    offset = 0
    for j in np.unique(sizes):
        idx = rng.permutation(np.flatnonzero(sizes == j))
        out[idx] = (np.arange(len(idx)) + offset) % k
        offset += len(idx)
    return out


def regression_adjusted_index(
    masks: np.ndarray,
    values: np.ndarray,
    fit: Callable[..., ValueFn],
    index: str = "sii",
    known=None,
    folds: int = 5,
    seed: int = 0,
    level: float = 0.9,
    full_score: float | None = 1.0,
    train_only: np.ndarray | None = None,
    sample_weight: np.ndarray | None = None,
) -> Interactions:
    """The index on the sampled kept counts (`restricted_weights`), estimated by cross-fitted regression
    adjustment post-stratified by kept count (engine.contribution_intervals.regression_adjusted, for pairs): per
    fold k a surrogate g_k fitted on the other folds gives its exact per-count index C_j(g_k) plus
    (N_j / n_jk) x the sum over fold k's masks of count j of c(T) (f(T) - g_k(T)). Every mask the
    index weighs has a sampled kept count, so this is unbiased whatever the surrogate's bias; kept
    counts whose every mask was evaluated are summed exactly. stderr: the stratified-sampling standard
    error of the correction (finite population corrected); details['interval'] at `level`.

    masks bool[n, L], values float[n] (scores); fit(X, y[, w]) -> value function; known: kept counts
    treated as sampled (default: those of `masks`, and L); full_score: the full mask's score, appended
    when no row has it. train_only bool[n]: rows that train every fold's fit but are not in the
    correction (actively chosen or partial rows); sample_weight: fit weights. EstimationError when no
    pair coalition has all four kept counts sampled."""
    X = np.asarray(masks, dtype=bool)
    y = np.asarray(values, dtype=np.float64)
    n, L = X.shape
    extra = np.zeros(n, bool) if train_only is None else np.asarray(train_only, dtype=bool)
    wts = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if full_score is not None and not X.all(axis=1).any():
        X, y = np.vstack([X, np.ones((1, L), bool)]), np.append(y, float(full_score))
        extra = np.append(extra, False)
        wts = None if wts is None else np.append(wts, 1.0)
    known = sorted(set(int(k) for k in (np.unique(X[~extra].sum(axis=1)) if known is None else known)) | {L})
    rw = restricted_weights(index, L, known)
    if rw is None:
        raise EstimationError(f"no pair coalition has all four masks' kept counts among the sampled ones "
                              f"({count_ranges(known)}): the {INDICES[index]} on the sampled kept counts is empty; sample "
                              "three consecutive kept counts (e.g. --scheme size-uniform, or strata such as 9,10,11)")
    rows = np.flatnonzero(~extra)
    sizes = X[rows].sum(axis=1)
    N = np.array([math.comb(L, j) for j in range(L + 1)], dtype=np.float64)
    n_j = np.bincount(sizes, minlength=L + 1)
    exhausted = n_j == N
    fit_rows = ~exhausted[sizes]
    if 0 < fit_rows.sum() < 2 * folds:
        raise EstimationError(f"cross-fitting with {folds} folds needs at least {2 * folds} sampled masks")
    assign = _folds_by_size(sizes, folds, seed)
    coef = _coefficients(X[rows], rw.delta1, rw.delta2)  # (s, L + P)
    pred = np.zeros(len(rows))
    C = [np.zeros((L + 1, coef.shape[1]))] if not fit_rows.any() else []  # every mask known: nothing to fit
    for k in range(folds if fit_rows.any() else 0):
        test = (assign == k) & fit_rows
        train = np.ones(len(y), bool)
        train[rows[test]] = False
        g = fit(X[train], y[train]) if wts is None else fit(X[train], y[train], wts[train])
        C.append(index_by_size(g, rw))
        pred[test] = _evaluate(g, X[rows[test]], DEFAULT_CHUNK)
    C = np.stack(C)  # (K, L+1, L+P)
    ys = y[rows]
    t = coef * (ys - pred)[:, None]  # (s, L+P) residual terms
    P = C.mean(axis=0)
    var = np.zeros(P.shape[1])
    for j in np.flatnonzero(n_j):
        sel = sizes == j
        if exhausted[j]:
            P[j] = (coef[sel] * ys[sel][:, None]).sum(axis=0)
            continue
        est = np.zeros(P.shape[1])
        for k in range(folds):
            in_k = sel & (assign == k)
            if in_k.any():
                est += in_k.sum() / n_j[j] * (C[k, j] + N[j] / in_k.sum() * t[in_k].sum(axis=0))
        P[j] = est
        m = int(sel.sum())
        # each fold corrects its own fit from its own ~m/K masks: the finite population correction is per fold
        fpc = 1 - m / (folds * N[j])
        var += (N[j] ** 2 * fpc * t[sel].var(axis=0, ddof=1) / m) if m >= 2 else (N[j] * t[sel][0]) ** 2
    flat = P.sum(axis=0)
    matrix, se = to_matrix(flat, L), to_matrix(np.sqrt(var), L)
    z = _normal_quantile(0.5 + level / 2)
    sw = size_weight(index, L)
    details = {
        "estimand": rw.label, "known_kept_counts": list(rw.known), "restricted": True,
        "surrogate_part": to_matrix(C.mean(axis=0).sum(axis=0), L), "n_folds": int(folds),
        "sampled_sizes": [int(j) for j in np.flatnonzero(n_j)],
        "unsampled_weight_fraction": 0.0,
        "full_index_unsampled_weight_fraction": float(1.0 - sw[[j for j in np.flatnonzero(n_j)]].sum()),
        "interval": {"level": level, "low": matrix - z * se, "high": matrix + z * se, "folds": int(folds),
                     "bias_allowance": np.zeros((L, L))},
        "stderr_is": "stratified-sampling standard error of the cross-fitted correction (by kept count, finite "
                     "population corrected); no bias term: every coalition the index weighs was sampled",
    }
    method = f"regression-adjusted ({folds} cross-fits, post-stratified by kept count), exact per fold"
    return Interactions(index, matrix, se, method, int(folds) << L, details)
