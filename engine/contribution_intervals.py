"""Intervals for layer contributions: every estimator's interval, with the estimand it is for.

numpy + engine.shapley only: no store, no model, no I/O. Masks are bool[n, L] (True = layer kept),
scores float[n] (s = ppl_full / ppl, non-finite already mapped to 0). The estimators
(engine.estimators) call `regression_adjusted` and `surrogate_interval`; the intervals on held-out
data (surrogate metrics, candidate comparisons) are engine.uncertainty's.

Estimands. Every interval says which number it is for (`ESTIMANDS`): the Shapley value, the
restricted-strata semivalue of the paper's strata, or the Banzhaf value, each of the game on
the calibration windows that were evaluated (or, with window resampling, of the text those
windows were drawn from).

Design. Both samplers of engine.sampling draw masks uniformly *within a kept count*, so
everything here post-stratifies by kept count j: n_j evaluated masks of the N_j = C(L, j) there
are. Kept counts the estimand weights but no mask was drawn from are *uncovered*: no real
evaluation says anything about the surrogate's error there (the paper's strata leave most of the
Shapley weight uncovered). The full mask's score is known exactly (1: it is ppl_full itself).

`regression_adjusted` (the default; Witter, Liu & Musco 2025, post-stratified): cross-fitted
difference estimator. For each fold k a surrogate g_k is fitted on the other folds; per kept
count j, phi_j = sum_k (n_jk / n_j) [C_j(g_k) + (N_j / n_jk) sum_{m in fold k, |m| = j} q(m) (f(m) -
g_k(m))], C_j(g) = sum_{|m| = j} q(m) g(m) (exact enumeration, L <= 22). Unbiased for the covered
kept counts whatever the surrogate's bias; kept counts whose every mask was evaluated are summed
exactly. Its noise is the stratified-sampling variance of the residual terms (with the finite
population correction); a bootstrap over masks of the same terms is reported next to it.
Uncovered kept counts get a *bias allowance*: the largest correction measured at the nearest
covered kept counts, scaled by the estimand's weight there. That is an assumption (the
surrogate's error varies smoothly with the kept count), stated in `details`, not a guarantee.

`surrogate_interval` (the paper's estimator, exact Shapley / Banzhaf on the surrogate): the
bootstrap over masks (stratified by kept count, the surrogate refitted on every resample) and
the ensemble spread give the noise; the bias is estimated by cross-fitting (the estimate minus
the regression-adjusted one) and its absolute value added to the half-width, with the uncovered
allowance; the noise of that bias estimate (the regression-adjusted standard error) joins the noise.

Windows (optional). With per-window losses, scores are recomputed on windows resampled with
replacement (`window_resampled_scores`); the estimator is re-evaluated on them with its fitted
surrogates fixed (regression adjustment is linear in the scores), and that spread is added
(independent source). The estimand is then the game on the text the windows were drawn from.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy.stats import norm

from engine import shapley
from engine.errors import EstimationError
from engine.jsonable import jsonable
from engine.resampling import LEVEL, stratified_resample, window_counts

ESTIMANDS = {
    "shapley": "Shapley value of the real game (all coalition sizes, Shapley weights)",
    "strata": "restricted-strata semivalue of the real game (the paper's estimand: coalitions near the sampling strata)",
    "banzhaf": "Banzhaf value of the real game (every coalition equally weighted)",
    "sampled-strata": "restricted-strata semivalue on the sampled kept counts of the real game (the paper's "
                      "coalitions whose two masks, layer kept and layer dropped, both have a sampled kept count)",
}
FitFn = Callable[..., shapley.ValueFn]  # fit(masks, scores) or fit(masks, scores, sample_weight) -> value function


def estimand_of(weighting: shapley.Weighting) -> str:
    """'shapley' | 'strata' | 'sampled-strata' | 'banzhaf' for a weighting (weighted Banzhaf has no interval
    estimand here)."""
    names = {"shapley": "shapley", "restricted_strata": "strata", "banzhaf": "banzhaf",
             "sampled_strata": "sampled-strata"}
    if weighting.kind not in names:
        raise EstimationError(f"no interval estimand for the {weighting.name} weighting")
    return names[weighting.kind]


def _z(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise EstimationError(f"interval level must be between 0 and 1, got {level}")
    return float(norm.ppf(0.5 + level / 2))


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class Intervals:
    """Per-layer estimate and interval for one estimator and its estimand.

    values, ci_low, ci_high, se, bias_allowance: float[L]. ci = values -/+ (z(level) * se +
    bias_allowance). se: noise standard error (masks, ensemble, windows: see details['se']).
    """

    values: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    level: float
    estimand: str  # key of ESTIMANDS
    estimator: str  # "regression-adjusted" | "paper" | "exact" | "banzhaf" | ...
    se: np.ndarray
    bias_allowance: np.ndarray
    details: dict = field(default_factory=dict)

    def covers(self, truth) -> np.ndarray:
        """bool[L]: truth inside [ci_low, ci_high]."""
        t = np.asarray(truth, dtype=float)
        return (self.ci_low <= t) & (t <= self.ci_high)

    def to_dict(self) -> dict:
        return jsonable({
            "values": self.values, "ci_low": self.ci_low, "ci_high": self.ci_high, "level": self.level,
            "estimand": self.estimand, "estimand_text": ESTIMANDS[self.estimand], "estimator": self.estimator,
            "se": self.se, "bias_allowance": self.bias_allowance, "details": self.details,
        })


def _intervals(values, se, allowance, level, estimand, estimator, details) -> Intervals:
    half = _z(level) * se + allowance  # (L,)
    return Intervals(values, values - half, values + half, float(level), estimand, estimator, se, allowance, details)

# ---------------------------------------------------------------- per kept count


def _binom(L: int) -> np.ndarray:
    return np.array([math.comb(L, j) for j in range(L + 1)], dtype=np.float64)  # (L+1,)


def size_weight_mass(weighting: shapley.Weighting, L: int) -> np.ndarray:
    """float[L+1]: total |q_i| over the masks of each kept count j (the same for every layer i):
    how much of the estimand each kept count carries."""
    w = np.concatenate([[0.0], weighting.vector(L), [0.0]])  # w[s + 1] = w(s)
    j = np.arange(L + 1)
    c_in = np.array([math.comb(L - 1, k - 1) if k >= 1 else 0 for k in j], dtype=np.float64)
    c_out = np.array([math.comb(L - 1, k) if k <= L - 1 else 0 for k in j], dtype=np.float64)
    return c_in * w[j] + c_out * w[j + 1]


MC_PER_SIZE = 8192  # masks per kept count when L > EXACT_MAX_L


def semivalue_by_size(f: shapley.ValueFn, L: int, weighting: shapley.Weighting,
                      chunk: int = shapley.DEFAULT_CHUNK, n_mc: int = MC_PER_SIZE, seed: int = 0) -> np.ndarray:
    """C[j, i] = sum over masks m with |m| = j of q_i(m) f(m), float[L+1, L]; C.sum(0) is the
    semivalue of f. Exact enumeration for L <= 22 (and for any kept count with at most n_mc masks);
    otherwise Monte Carlo with n_mc uniform masks of that count and f's mean there as control variate
    (sum over |m| = j of q_i(m) is known in closed form), so only f's spread within a count adds noise."""
    w = weighting.vector(L)
    if L > shapley.EXACT_MAX_L:
        return _semivalue_by_size_mc(f, L, weighting, w, n_mc, seed)
    out = np.zeros((L + 1, L))
    total = 1 << L
    for a in range(0, total, chunk):
        m = shapley._masks_from_codes(np.arange(a, min(a + chunk, total), dtype=np.int64), L)  # (c, L)
        v = np.asarray(f(m), dtype=np.float64)  # (c,)
        np.add.at(out, m.sum(axis=1), shapley.signed_weights(m, w) * v[:, None])
    return out


def _semivalue_by_size_mc(f, L: int, weighting, w: np.ndarray, n_mc: int, seed: int) -> np.ndarray:
    mass = size_weight_mass(weighting, L)
    N = _binom(L)
    wv = np.concatenate([[0.0], w, [0.0]])  # wv[s + 1] = w(s)
    rng = np.random.default_rng([seed, 6])
    out = np.zeros((L + 1, L))
    for j in np.flatnonzero(mass):
        # sum over |m| = j of q_i(m): C(L-1, j-1) w(j-1) - C(L-1, j) w(j), the same for every i
        q_total = (math.comb(L - 1, j - 1) * wv[j] if j >= 1 else 0.0) - (math.comb(L - 1, j) * wv[j + 1] if j < L else 0.0)
        if N[j] <= n_mc:  # few masks: enumerate them
            m = np.array([np.isin(np.arange(L), c) for c in itertools.combinations(range(L), int(j))], dtype=bool)
            out[j] = shapley.signed_weights(m, w).T @ np.asarray(f(m), dtype=np.float64)
            continue
        m = shapley._random_masks_of_sizes(np.full(n_mc, j), L, rng)  # (n_mc, L) uniform within the count
        v = np.asarray(f(m), dtype=np.float64)
        c = v.mean()
        out[j] = N[j] * (shapley.signed_weights(m, w) * (v - c)[:, None]).mean(axis=0) + c * q_total
    return out


def folds_by_size(masks: np.ndarray, k: int, seed: int) -> np.ndarray:
    """int[n] fold of each mask: a seeded shuffle within each kept count, dealt round-robin, so every
    kept count with at least k masks is in every fold."""
    sizes = np.asarray(masks, dtype=bool).sum(axis=1)
    rng = np.random.default_rng(seed)
    out = np.empty(len(sizes), dtype=np.int64)
    offset = 0
    for j in np.unique(sizes):
        idx = rng.permutation(np.flatnonzero(sizes == j))
        out[idx] = (np.arange(len(idx)) + offset) % k  # offset: small kept counts do not all start at fold 0
        offset += len(idx)
    return out


def _with_full_mask(masks, scores, full_score):
    masks = np.asarray(masks, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    if masks.ndim != 2 or len(masks) != len(scores):
        raise EstimationError(f"masks must be bool[n, L] with one score each; got {masks.shape} and {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise EstimationError("scores contain NaN/inf: map non-finite perplexities to score 0 first (evaluate.scores)")
    if full_score is not None and not masks.all(axis=1).any():
        masks = np.vstack([masks, np.ones((1, masks.shape[1]), dtype=bool)])
        scores = np.append(scores, float(full_score))
    return masks, scores

# ---------------------------------------------------------------- regression-adjusted (default)


@dataclass(frozen=True)
class _CrossFit:
    """Fitted state of a cross-fitted regression adjustment: enough to recompute it for new scores."""

    masks: np.ndarray  # bool (n, L), full mask included
    sizes: np.ndarray  # int (n,)
    folds: np.ndarray  # int (n,)
    q: np.ndarray  # float (n, L): signed weights
    pred: np.ndarray  # float (n,): g_{fold(m)}(m), out-of-fold prediction
    C: np.ndarray  # float (K, L+1, L): per fold, per kept count surrogate parts
    N: np.ndarray  # float (L+1,)
    n_j: np.ndarray  # int (L+1,)
    exhausted: np.ndarray  # bool (L+1,): every mask of that kept count evaluated
    needed: np.ndarray  # bool (L+1,): kept counts the estimand weights
    mass: np.ndarray  # float (L+1,)

    def parts(self, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(phi float[L], per-kept-count estimate P float[L+1, L], correction D float[L+1, L])."""
        K, L = self.C.shape[0], self.masks.shape[1]
        t = self.q * (scores - self.pred)[:, None]  # (n, L) residual terms
        P = self.C.mean(axis=0)  # uncovered kept counts: the surrogate alone
        D = np.zeros((L + 1, L))
        for j in np.flatnonzero(self.n_j):
            sel = self.sizes == j
            if self.exhausted[j]:
                P[j] = (self.q[sel] * scores[sel][:, None]).sum(axis=0)  # exact: every mask known
                continue
            est = np.zeros(L)
            for k in range(K):
                in_k = sel & (self.folds == k)
                n_jk = int(in_k.sum())
                if n_jk:
                    corr = self.N[j] / n_jk * t[in_k].sum(axis=0)
                    est += n_jk / self.n_j[j] * (self.C[k, j] + corr)
                    D[j] += n_jk / self.n_j[j] * corr
            P[j] = est
        return P.sum(axis=0), P, D

    def variance(self, scores: np.ndarray) -> np.ndarray:
        """Stratified-sampling variance of the correction, float[L]. Finite population corrected per fold:
        each fold's surrogate is corrected from that fold's ~m/K masks alone, so the correction is
        1 - m / (K N_j), not 1 - m / N_j (which claimed almost no noise for a kept count with nearly every
        mask drawn, e.g. 51 of the 66 masks keeping 10 of 12 layers, while the K fits still differ)."""
        L = self.masks.shape[1]
        K = self.C.shape[0]
        t = self.q * (scores - self.pred)[:, None]
        var = np.zeros(L)
        for j in np.flatnonzero(self.n_j):
            if self.exhausted[j]:
                continue
            sel = self.sizes == j
            m = int(sel.sum())
            if m >= 2:
                var += self.N[j] ** 2 * (1 - m / (K * self.N[j])) * t[sel].var(axis=0, ddof=1) / m
            else:  # one mask: no spread to measure; its own squared term (conservative)
                var += (self.N[j] * t[sel][0]) ** 2
        return var


def _fit_call(fit: FitFn, X, y, weight):
    """fit(X, y), or fit(X, y, weight) when rows carry sample weights."""
    return fit(X, y) if weight is None else fit(X, y, weight)


def _cross_fit(masks, scores, fit: FitFn, weighting, folds: int, seed: int, train_only=None,
               weight=None) -> _CrossFit:
    """The cross-fit over the sample rows (not `train_only`); train_only rows (bool[n]) train every
    fold's surrogate but are never in a fold's correction. weight float[n]: sample weights for fit."""
    n, L = masks.shape
    sample = np.ones(n, dtype=bool) if train_only is None else ~np.asarray(train_only, dtype=bool)
    rows = np.flatnonzero(sample)  # (s,): index of each sample row
    Xs = masks[rows]  # (s, L)
    sizes = Xs.sum(axis=1)
    N = _binom(L)
    n_j = np.bincount(sizes, minlength=L + 1)
    exhausted = n_j == N
    assign = folds_by_size(Xs, folds, seed)
    # exhausted kept counts do not need out-of-fold predictions; they still train every fold's surrogate
    fit_rows = ~exhausted[sizes]
    if 0 < fit_rows.sum() < 2 * folds:
        raise EstimationError(f"cross-fitting with {folds} folds needs at least {2 * folds} sampled masks")
    C = np.zeros((folds, L + 1, L))
    pred = np.zeros(len(rows))
    tests, trains = [], []
    for k in range(folds if fit_rows.any() else 0):  # every mask evaluated: nothing to fit
        test = (assign == k) & fit_rows  # (s,)
        train = np.ones(n, dtype=bool)
        train[rows[test]] = False
        tests.append(test)
        trains.append(np.flatnonzero(train))
    if hasattr(fit, "on_rows") and trains:  # surrogate.SingleFit: every fold's fit at once (batched MLPs)
        fitted = fit.on_rows(masks, scores, trains, weight)
    else:
        fitted = [_fit_call(fit, masks[t], scores[t], None if weight is None else weight[t]) for t in trains]
    for k, (test, g) in enumerate(zip(tests, fitted)):
        C[k] = semivalue_by_size(g, L, weighting)
        if test.any():
            pred[test] = np.asarray(g(Xs[test]), dtype=np.float64)
    mass = size_weight_mass(weighting, L)
    return _CrossFit(Xs, sizes, assign, shapley.signed_weights(Xs, weighting.vector(L)), pred, C, N, n_j,
                     exhausted, mass > 0, mass)


def _uncovered_allowance(cf: _CrossFit, D: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Bias allowance float[L] for kept counts the estimand weights but no mask was drawn from: the
    largest |correction| of the nearest covered (sampled, not exhausted) kept counts, scaled by weight mass."""
    L = cf.masks.shape[1]
    uncovered = [j for j in range(L + 1) if cf.needed[j] and cf.n_j[j] == 0]
    informative = [j for j in range(L + 1) if cf.n_j[j] > 0 and not cf.exhausted[j] and cf.mass[j] > 0]
    allowance = np.zeros(L)
    if not informative:
        return allowance, uncovered
    for j in uncovered:
        dist = min(abs(j - c) for c in informative)
        nearest = [c for c in informative if abs(j - c) == dist]
        allowance += np.max([np.abs(D[c]) * cf.mass[j] / cf.mass[c] for c in nearest], axis=0)  # (L,)
    return allowance, uncovered



def regression_adjusted(
    masks: np.ndarray,
    scores: np.ndarray,
    fit: FitFn,
    weighting: shapley.Weighting = shapley.SHAPLEY,
    level: float = LEVEL,
    folds: int = 5,
    seed: int = 0,
    full_score: float | None = 1.0,
    allowance: bool = True,
    n_boot: int = 200,
    window_scores: np.ndarray | None = None,
    train_only: np.ndarray | None = None,
    sample_weight: np.ndarray | None = None,
) -> Intervals:
    """Cross-fitted, post-stratified regression-adjusted semivalue with its interval (module docstring).

    train_only bool[n] (None: no such rows): rows that train the surrogates but are left out of the
    correction term, e.g. the masks an active sampling round chose (engine.active). The
    post-stratified correction assumes the masks of each kept count are uniform draws of that
    count, which only the design-drawn rows are; rows chosen where the ensemble disagreed are not,
    so they improve the surrogate (every fold's fit sees them) but do not enter the Monte Carlo
    correction. sample_weight float[n]: weights of the surrogate fits (fit(masks, scores, weights)),
    e.g. engine.fidelity.fit_weights for partially evaluated rows.

    masks bool[n, L], scores float[n]: the evaluated masks. fit(masks, scores) -> value function
    (a fitted surrogate). full_score: the full mask's known score (1.0; None = not known).
    allowance: add the bias allowance for uncovered kept counts. n_boot: bootstrap resamples over
    masks of the residual terms (surrogates fixed; reported in details, 0 = skip).
    window_scores float[B, n]: the same masks' scores recomputed on B window resamples
    (`window_resampled_scores`); their spread is added to the noise.
    """
    n_in = len(np.asarray(scores))
    X, y = _with_full_mask(masks, scores, full_score)
    L = X.shape[1]
    extra = np.zeros(len(y), dtype=bool)  # train-only rows; the appended full mask is a sample row
    if train_only is not None:
        extra[:n_in] = np.asarray(train_only, dtype=bool)
    weight = None
    if sample_weight is not None:
        weight = np.ones(len(y))
        weight[:n_in] = np.asarray(sample_weight, dtype=np.float64)
    cf = _cross_fit(X, y, fit, weighting, folds, seed, extra, weight)
    in_sample = ~extra  # (n,)
    y_all, y = y, y[in_sample]  # the correction reads the sample rows only
    phi, P, D = cf.parts(y)
    var_masks = cf.variance(y)  # (L,)
    details: dict = {
        "method": "cross-fitted regression adjustment, post-stratified by kept count",
        "n_masks": int(n_in), "n_folds": int(folds), "n_train_only": int(extra.sum()),
        "sampled_kept_counts": {int(j): int(cf.n_j[j]) for j in np.flatnonzero(cf.n_j)},
        "exhausted_kept_counts": [int(j) for j in np.flatnonzero(cf.exhausted & (cf.n_j > 0))],
        "surrogate_part": cf.C.mean(axis=0).sum(axis=0),
        "correction": phi - cf.C.mean(axis=0).sum(axis=0),
    }
    se_parts = {"masks": np.sqrt(var_masks)}
    if n_boot:
        rng = np.random.default_rng([seed, 1])
        boots = np.empty((n_boot, L))
        for b in range(n_boot):
            idx = stratified_resample(cf.sizes, rng, set(np.flatnonzero(cf.exhausted).tolist()))
            sub = _CrossFit(cf.masks[idx], cf.sizes[idx], cf.folds[idx], cf.q[idx], cf.pred[idx], cf.C, cf.N,
                            cf.n_j, cf.exhausted, cf.needed, cf.mass)
            boots[b] = sub.parts(y[idx])[0]
        details["se_masks_bootstrap"] = boots.std(axis=0, ddof=1)
    var = var_masks.copy()
    if window_scores is not None:
        ws = np.asarray(window_scores, dtype=np.float64)
        if ws.ndim != 2 or ws.shape[1] != n_in:
            raise EstimationError(f"window_scores must be float[B, {n_in}], got {ws.shape}")
        if len(y_all) > n_in:  # the appended full mask: score 1 on every window resample
            ws = np.hstack([ws, np.full((len(ws), 1), y_all[-1])])
        ws = ws[:, in_sample]
        wb = np.stack([cf.parts(row)[0] for row in ws])  # (B, L)
        se_parts["windows"] = wb.std(axis=0, ddof=1)
        var += se_parts["windows"] ** 2
        details["window_resamples"] = int(len(ws))
    allow, uncovered = _uncovered_allowance(cf, D) if allowance else (np.zeros(L), [])
    total_mass = cf.mass.sum()
    details.update({
        "uncovered_kept_counts": uncovered,
        "uncovered_weight_fraction": float(cf.mass[[j for j in range(L + 1) if cf.needed[j] and cf.n_j[j] == 0]].sum()
                                           / total_mass),
        "allowance_rule": "largest |correction| at the nearest sampled kept counts, scaled by the estimand's weight"
        if uncovered and allowance else None,
        "se": se_parts,
    })
    return _intervals(phi, np.sqrt(var), allow, level, estimand_of(weighting), "regression-adjusted", details)


# ---------------------------------------------------------------- estimators on the surrogate


def bootstrap_semivalues(masks: np.ndarray, scores: np.ndarray, fit: FitFn, weightings: dict, n_boot: int = 20,
                         seed: int = 0, full_score: float | None = 1.0) -> dict[str, np.ndarray]:
    """Bootstrap over masks with the surrogate refitted: {name: float[n_boot, L]} semivalues of
    the refitted surrogate for each weighting (one fit per resample serves every weighting).
    Resamples are drawn with replacement within each kept count; fully evaluated kept counts stay."""
    X, y = _with_full_mask(masks, scores, full_score)
    L = X.shape[1]
    if n_boot < 2:
        raise EstimationError("the bootstrap over masks needs n_boot >= 2")
    rng = np.random.default_rng([seed, 2])
    sizes = X.sum(axis=1)
    exhausted = set(np.flatnonzero(np.bincount(sizes, minlength=L + 1) == _binom(L)).tolist())
    out = {name: np.empty((n_boot, L)) for name in weightings}
    for b in range(n_boot):
        idx = stratified_resample(sizes, rng, exhausted)
        g = fit(X[idx], y[idx])
        for name, w in weightings.items():
            out[name][b] = semivalue_by_size(g, L, w).sum(axis=0)
    return out


def _reference_se(reference: Intervals) -> dict:
    """The reference's noise as reported components: the bias estimate's sampling noise and, when the
    reference was re-evaluated on window resamples, the window part (the estimate and its reference
    move together with the windows, so that is the estimate's own window noise)."""
    parts = reference.details.get("se", {})
    if "windows" not in parts:
        return {"bias_estimate": reference.se}
    return {"bias_estimate": parts["masks"], "windows": parts["windows"]}


def surrogate_interval(
    masks: np.ndarray,
    scores: np.ndarray,
    fit: FitFn,
    weighting: shapley.Weighting,
    estimate: np.ndarray | None = None,
    members: np.ndarray | None = None,
    estimator: str = "surrogate",
    level: float = LEVEL,
    n_boot: int = 20,
    seed: int = 0,
    reference: Intervals | None = None,
    folds: int = 5,
    full_score: float | None = 1.0,
    boots: np.ndarray | None = None,
) -> Intervals:
    """Interval for a semivalue computed on the surrogate alone (the paper's estimator, exact
    Shapley or Banzhaf on the surrogate).

    estimate float[L]: the estimator's value (default: the semivalue of fit(masks, scores)).
    members float[k, L]: the same estimate per ensemble member (its spread / sqrt(k) is one noise
    component). n_boot: bootstrap resamples over masks, stratified by kept count, each with the
    surrogate refitted (fit is called with the resample) -> the sampling-noise component.
    reference: the regression-adjusted Intervals of the same estimand on the same masks (computed
    here if None); estimate - reference.values is the estimated bias, added to the half-width
    with the reference's allowance for uncovered kept counts. boots float[B, L]: bootstrap
    semivalues already computed (`bootstrap_semivalues`), instead of refitting here. A reference
    computed with `window_scores` carries the window noise into the interval (details['se']['windows']).
    """
    X, y = _with_full_mask(masks, scores, full_score)
    L = X.shape[1]
    if estimate is None:
        estimate = shapley.semivalue(fit(X, y), L, weighting).values
    estimate = np.asarray(estimate, dtype=np.float64)
    if boots is None:
        boots = bootstrap_semivalues(X, y, fit, {"w": weighting}, n_boot, seed, None)["w"]
    se_boot = boots.std(axis=0, ddof=1)
    se_ens = np.zeros(L)
    if members is not None and len(members) > 1:
        se_ens = np.asarray(members).std(axis=0, ddof=1) / math.sqrt(len(members))
    if reference is None:
        reference = regression_adjusted(X, y, fit, weighting, level, folds, seed, None, n_boot=0)
    if reference.estimand != estimand_of(weighting):
        raise EstimationError(f"reference targets {reference.estimand}, not {estimand_of(weighting)}")
    bias = estimate - reference.values
    se = np.sqrt(se_boot**2 + se_ens**2 + reference.se**2)  # the bias estimate carries the reference's noise
    details = {
        "method": "bootstrap over masks (stratified by kept count, surrogate refitted) + ensemble spread; "
                  "bias estimated by cross-fitted regression adjustment",
        "n_boot": int(len(boots)),
        "se": {"masks": se_boot, "ensemble": se_ens, **_reference_se(reference)},
        "bias_estimate": bias,
        "uncovered_kept_counts": reference.details.get("uncovered_kept_counts", []),
        "uncovered_weight_fraction": reference.details.get("uncovered_weight_fraction"),
    }
    return _intervals(estimate, se, np.abs(bias) + reference.bias_allowance, level, estimand_of(weighting),
                      estimator, details)


# ---------------------------------------------------------------- windows


def window_resampled_scores(window_nll: np.ndarray, window_tokens: np.ndarray, full_nll: np.ndarray,
                            full_tokens: np.ndarray, n_boot: int = 100, seed: int = 0) -> np.ndarray:
    """Scores of the same masks on `n_boot` resamples of the windows (with replacement), float[B, n].

    window_nll float[n, W], window_tokens int[n, W]: per-window losses of the evaluated masks;
    full_nll / full_tokens float[W]: the full model's. score_b = ppl_full_b / ppl_b on resample b;
    non-finite perplexity -> 0, as in evaluate.scores."""
    nll = np.asarray(window_nll, dtype=np.float64)
    tok = np.asarray(window_tokens, dtype=np.float64)
    if nll.ndim != 2 or nll.shape != tok.shape or nll.shape[1] != len(full_nll):
        raise EstimationError(f"per-window losses must be [n, W] with W = {len(full_nll)}; got {nll.shape}, {tok.shape}")
    rng = np.random.default_rng([seed, 3])
    W = nll.shape[1]
    counts = window_counts(rng, W, n_boot)  # (B, W)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        log_ppl = (counts @ nll.T) / (counts @ tok.T)  # (B, n) mean NLL per token
        log_full = (counts @ np.asarray(full_nll, float)) / (counts @ np.asarray(full_tokens, float))  # (B,)
        s = np.exp(log_full[:, None] - log_ppl)
    return np.where(np.isfinite(s), s, 0.0)
