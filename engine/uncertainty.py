"""Intervals on held-out data: how good the surrogate is, and which removal sets hold up on unseen text.

numpy + scipy (engine.surrogate for `work_curve`): no store, no model, no I/O. The contributions'
own intervals (regression adjustment, surrogate-only estimates, window resamples) are
engine.contribution_intervals'; the resampling both use is engine.resampling's.

* `metric_intervals`: held-out R² and Spearman of a fitted surrogate with percentile bootstrap
  intervals over the held-out masks (within kept counts when given).
* `compare_candidates`: ranks candidate removal sets by validation perplexity (windows not used
  to fit) and gives each one a paired bootstrap interval over windows of its perplexity ratio to
  the chosen set; candidates whose interval contains 1 are *tied* with it.
* `work_curve`: held-out quality of the surrogate against the real evaluation work spent on the
  rows it was fitted on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.stats import spearmanr

from engine.errors import EstimationError
from engine.jsonable import jsonable
from engine.resampling import LEVEL, stratified_resamples, window_counts


# ---------------------------------------------------------------- surrogate metrics


@dataclass(frozen=True)
class MetricInterval:
    name: str  # "r2" | "spearman"
    value: float
    ci_low: float
    ci_high: float
    level: float
    n: int  # held-out masks

    def to_dict(self) -> dict:
        return jsonable(self.__dict__)


def _r2(y, p):
    ss = np.sum((y - y.mean()) ** 2)
    return 1.0 - np.sum((y - p) ** 2) / ss if ss > 0 else math.nan


def _spearman(y, p):
    return float(spearmanr(y, p).statistic) if np.ptp(y) > 0 and np.ptp(p) > 0 else math.nan


def _r2_rows(y, p):
    """_r2 of each row of y, p float[B, n] -> float[B] (NaN where y is constant)."""
    ss = np.sum((y - y.mean(axis=1, keepdims=True)) ** 2, axis=1)  # (B,)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ss > 0, 1.0 - np.sum((y - p) ** 2, axis=1) / np.where(ss > 0, ss, 1.0), math.nan)


def _spearman_rows(y, p):
    """_spearman of each row of y, p float[B, n] -> float[B]: Pearson correlation of the average ranks
    (scipy.stats.spearmanr's definition), NaN where either row is constant."""
    from scipy.stats import rankdata

    ry, rp = rankdata(y, axis=1), rankdata(p, axis=1)  # (B, n)
    ry, rp = ry - ry.mean(axis=1, keepdims=True), rp - rp.mean(axis=1, keepdims=True)
    den = np.sqrt(np.sum(ry**2, axis=1) * np.sum(rp**2, axis=1))  # (B,)
    ok = (np.ptp(y, axis=1) > 0) & (np.ptp(p, axis=1) > 0) & (den > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ok, np.clip(np.sum(ry * rp, axis=1) / np.where(ok, den, 1.0), -1.0, 1.0), math.nan)


def metric_intervals(y_true, y_pred, strata=None, level: float = LEVEL, n_boot: int = 1000,
                     seed: int = 0) -> dict[str, MetricInterval]:
    """Held-out R² and Spearman with percentile bootstrap intervals over the held-out masks
    (resampled within `strata`, e.g. kept counts, when given). Estimand: the fitted surrogate's
    metric on the distribution the held-out masks were drawn from."""
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    if len(y) < 3 or len(y) != len(p):
        raise EstimationError("metric intervals need at least 3 held-out masks with one prediction each")
    groups = np.zeros(len(y), dtype=np.int64) if strata is None else np.asarray(strata)
    rng = np.random.default_rng([seed, 4])
    out = {}
    idx = stratified_resamples(groups, rng, n_boot)  # (n_boot, n)
    boots = {"r2": _r2_rows(y[idx], p[idx]), "spearman": _spearman_rows(y[idx], p[idx])}  # (n_boot,) each
    a = (1 - level) / 2
    for name, fn in (("r2", _r2), ("spearman", _spearman)):
        v = boots[name][np.isfinite(boots[name])]
        lo, hi = (np.quantile(v, [a, 1 - a]) if len(v) else (math.nan, math.nan))
        out[name] = MetricInterval(name, float(fn(y, p)), float(lo), float(hi), float(level), int(len(y)))
    return out


# ---------------------------------------------------------------- decisions


@dataclass(frozen=True)
class CandidateComparison:
    """Candidate removal sets compared on validation windows.

    chosen: the set with the lowest validation perplexity. ratio / ci_low / ci_high (aligned with
    candidates): validation perplexity over the chosen set's, with a paired bootstrap interval over
    windows. tied: the candidates (chosen excluded) whose interval contains 1.
    """

    candidates: tuple[tuple[int, ...], ...]
    ppl: tuple[float, ...]  # validation perplexity per candidate
    chosen: tuple[int, ...]
    ratio: tuple[float, ...]
    ci_low: tuple[float, ...]
    ci_high: tuple[float, ...]
    tied: tuple[tuple[int, ...], ...]
    level: float
    n_windows: int
    n_boot: int

    def to_dict(self) -> dict:
        d = jsonable(self.__dict__)
        d["rule"] = ("lowest validation perplexity; tied = paired bootstrap interval over validation windows of "
                     "the perplexity ratio to the chosen set contains 1")
        return d


def compare_candidates(candidates: Sequence[Sequence[int]], window_nll: np.ndarray, window_tokens: np.ndarray,
                       level: float = LEVEL, n_boot: int = 2000, seed: int = 0,
                       chosen: int | None = None) -> CandidateComparison:
    """Choose among removal sets by validation perplexity and list the ones tied with the choice.

    candidates: c removal sets; window_nll float[c, W] / window_tokens int[c, W]: each candidate's
    per-window losses on W validation windows (windows not used to fit or to search). Ties in the
    point value go to the earlier candidate. Non-finite losses make a candidate worst (never tied).
    chosen: index of a candidate chosen by another rule, to compare the others with (default: the best).
    """
    cands = tuple(tuple(int(i) for i in c) for c in candidates)
    nll = np.asarray(window_nll, dtype=np.float64)
    tok = np.asarray(window_tokens, dtype=np.float64)
    if nll.ndim != 2 or nll.shape != tok.shape or nll.shape[0] != len(cands) or len(cands) == 0:
        raise EstimationError(f"need per-window losses [c, W] for {len(cands)} candidates; got {nll.shape}")
    W = nll.shape[1]
    with np.errstate(over="ignore", invalid="ignore"):
        logp = nll.sum(axis=1) / tok.sum(axis=1)  # (c,) mean NLL per token
    key = np.where(np.isfinite(logp), logp, np.inf)
    best = int(np.argmin(key)) if chosen is None else int(chosen)  # first minimum: earlier candidate wins a tie
    rng = np.random.default_rng([seed, 5])
    counts = window_counts(rng, W, n_boot)  # (B, W)
    with np.errstate(over="ignore", invalid="ignore"):
        boot = (counts @ nll.T) / (counts @ tok.T)  # (B, c) resampled mean NLL per token, paired across candidates
        diff = boot - boot[:, [best]]  # (B, c) log perplexity ratio to the chosen set
    a = (1 - level) / 2
    ratio, lo, hi, tied = [], [], [], []
    for c in range(len(cands)):
        if not np.isfinite(key[c]):
            ratio.append(math.inf), lo.append(math.inf), hi.append(math.inf)
            continue
        ratio.append(float(np.exp(logp[c] - logp[best])))
        ql, qh = np.quantile(diff[:, c], [a, 1 - a])
        lo.append(float(np.exp(ql)))
        hi.append(float(np.exp(qh)))
        if c != best and lo[-1] <= 1.0 <= hi[-1]:
            tied.append(cands[c])
    with np.errstate(over="ignore"):
        ppl = tuple(float(x) for x in np.exp(logp))
    return CandidateComparison(cands, ppl, cands[best], tuple(ratio), tuple(lo), tuple(hi), tuple(tied),
                               float(level), int(W), int(n_boot))


# ---------------------------------------------------------------- quality against real evaluation work


def work_curve(masks, scores, work, spec, ppl_full: float = 1.0, sample_weight=None, testable=None,
               n_points: int = 5, level: float = LEVEL, n_boot: int = 500, seed: int = 0, reuse=None) -> dict:
    """Held-out quality of the surrogate against the real evaluation work spent on the rows it was
    fitted on, the rows taken in store order (the order the run evaluated them in).

    masks bool[n, L], scores float[n], work int[n] (token-layer calls spent on each row,
    engine.fidelity.work, a completion included in its row's), in store order; spec: the
    SurrogateSpec; sample_weight / testable as in `surrogate.fit_with_diagnostics`, whose held-out
    part (`surrogate.split` with spec.holdout, spec.seed) is the same for every point. Point i fits
    one surrogate (spec with ensemble = 1, like the learning curve) on the first n_i training rows
    in store order, n_i geometric from surrogate.MIN_MASKS to every training row, and scores it on
    the held-out rows: R² and Spearman with `metric_intervals` (bootstrap over the held-out masks,
    within kept counts when each has two or more, `level`), MAE, n.

    x of a point: ``work`` = the work of every row stored up to its last training row (held-out rows
    included: the run had spent that much when the row was stored); ``work_fitted`` = the work of
    the fitted rows alone. A row completed later (multi-fidelity) counts with its completion, as
    stored now. Returns a JSON-able dict: points, n_test, level, work_total, note.

    reuse: (rows, value function) already fitted with that spec (seed spec.seed, ensemble 1) on X[rows]
    (`method.Fit.first_member_fit`: the fit's first ensemble member, on every training row): the point
    whose training rows are exactly `rows` takes it instead of refitting."""
    from dataclasses import replace as _replace

    from engine import surrogate as sg

    X = np.asarray(masks, dtype=bool)  # (n, L)
    y = np.asarray(scores, dtype=np.float64).reshape(-1)  # (n,)
    cost = np.asarray(work, dtype=np.int64).reshape(-1)  # (n,)
    if len(cost) != len(y) or len(X) != len(y):
        raise EstimationError(f"work_curve needs one work count per mask; got {len(cost)} for {len(y)} masks")
    w = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64).reshape(-1)
    sp = sg.split(X, y, spec.holdout, spec.seed, testable)
    train = np.sort(sp.train)  # store order
    out = {"order": "store", "n_test": int(len(sp.test)), "level": float(level), "work_total": int(cost.sum()),
           "points": [], "note": ""}
    if cost.sum() <= 0:
        out["note"] = "no evaluation work is recorded for these rows (stored before work was counted)"
        return out
    if len(train) < sg.MIN_MASKS:
        out["note"] = f"{len(train)} training masks; at least {sg.MIN_MASKS} are needed for a point"
        return out
    sizes = sorted({int(s) for s in np.geomspace(sg.MIN_MASKS, len(train), num=max(1, n_points)).round()})
    one = _replace(spec, ensemble=1)
    strata = X[sp.test].sum(axis=1)  # (n_test,) kept counts: the bootstrap resamples within them, unless
    if np.unique(strata, return_counts=True)[1].min(initial=2) < 2:  # one holds a single mask (its interval
        strata = None  # would collapse to the point): then over all held-out masks
    cumulative = np.cumsum(cost)  # (n,) work of the store up to each row
    models = [None] * len(sizes)
    if reuse is not None:
        models = [reuse[1] if np.array_equal(train[:size], reuse[0]) else None for size in sizes]
    todo = [i for i, m in enumerate(models) if m is None]
    for i, m in zip(todo, sg.fit_on_rows(one, X, y, [train[:sizes[i]] for i in todo], w)):  # one batched fit
        models[i] = m  # for the MLP
    for size, model in zip(sizes, models):
        rows = train[:size]
        pred = model.predict(X[sp.test])  # (n_test,)
        m = sg.metrics(y[sp.test], pred, ppl_full)
        point = {"train_masks": int(size), "rows_stored": int(rows[-1] + 1), "work": int(cumulative[rows[-1]]),
                 "work_fitted": int(cost[rows].sum()), "n_test": int(m.n), "r2": m.r2, "spearman": m.spearman,
                 "mae": m.mae}
        try:
            ci = metric_intervals(y[sp.test], pred, strata, level=level, n_boot=n_boot, seed=seed)
            point.update({f"{k}_{b}": getattr(ci[k], f"ci_{b}") for k in ("r2", "spearman") for b in ("low", "high")})
        except EstimationError:  # fewer than 3 held-out masks: no interval, n says why
            point.update({f"{k}_{b}": math.nan for k in ("r2", "spearman") for b in ("low", "high")})
        out["points"].append(point)
    return jsonable(out)
