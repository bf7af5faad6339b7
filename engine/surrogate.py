"""Surrogate models of the score s(m) = PPL_full / PPL(m), with held-out fit diagnostics.

Inputs are numpy arrays: masks bool[n, L] (True = layer kept) and scores float[n]. Every
surrogate follows the `Surrogate` protocol: ``fit(masks, scores) -> self`` and
``predict(masks) -> float[n]`` (vectorised, chunked; safe on 2^20 masks).

Kinds (`SurrogateSpec.kind`):
- ``mlp``: the paper's network Linear(L, 2L) - CELU - Linear(2L, 1) - Sigmoid, MSE loss.
  Presets: ``adam`` (default; full-batch Adam, lr 0.01, up to 3000 steps, early stopping on a
  validation slice of the training data, best weights restored: converges at any budget) and
  ``paper`` (the reference schedule: SGD momentum 0.9, lr 0.008, StepLR(100, x0.1), 300 epochs,
  shuffled minibatches of 300, no validation).
- ``ridge-pairwise``: RidgeCV on the mask and all pairwise products (second-order game).
- ``gbt``: scikit-learn HistGradientBoostingRegressor.
- ``log-pairwise``: exp of a second-order game: RidgeCV on the mask and all pairwise products of
  log(score), each mask weighted by score^2 (so the fit approximates least squares on the score).
- ``mlp+log-pairwise``: the mean of the MLP (adam) and the log-pairwise model. On the demo game it
  ranks the pairwise Shapley interactions best at 256 stratified masks (bench/README.md), so
  `engine interactions` uses it by default (`INTERACTION_SURROGATE`).

`Ensemble` fits k members (MLP and mlp+log-pairwise: different init and validation split; others:
bootstrap resamples) for error bars. `split` holds out a stratified (by kept count) test part;
`diagnose`, `fit_with_diagnostics`, `learning_curve` and `compare` report R², Spearman and MAE
in score space and in perplexity space (predicted PPL = ppl_full / max(score, SCORE_FLOOR)),
overall and per kept count. Everything is seeded and deterministic.

Where the code lives: the protocol and input checks in engine/surrogate_base.py, the MLP and its batched
fit in engine/surrogate_mlp.py, ridge-pairwise, log-pairwise and gbt in engine/surrogate_sklearn.py; this
module holds the registry, mlp+log-pairwise, ensembles, fits on row sets and the diagnostics, and
re-exports the kinds' classes (callers import them from here).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
from scipy.stats import spearmanr

from engine.config import INTERACTION_SURROGATE, MIN_MASKS, SurrogateSpec  # noqa: F401 (re-exported)
from engine.errors import EstimationError
from engine.jsonable import jsonable
from engine.registry import Registry
from engine.surrogate_base import (PREDICT_CHUNK, SCORE_FLOOR, Surrogate, ValueFunction,  # noqa: F401 (re-exported)
                                   check_weight, check_xy)
from engine.surrogate_mlp import PRESETS, MLPSurrogate, fit_mlps_batched  # noqa: F401 (re-exported)
from engine.surrogate_sklearn import (LOG_FLOOR, GBTSurrogate, LogPairwiseSurrogate,  # noqa: F401 (re-exported)
                                      RidgePairwiseSurrogate)

# Ensembles, learning curves, work curves and cross-fits fit their adam MLPs as one batched network
# (fit_mlps_batched), and the comparison and the work curve's last point reuse the ensemble's first member;
# False: one after another, each fitted anew (the code before issue 23, which bench/fit_speed.py times against).
BATCHED_FITS = True


# ---------------------------------------------------------------- the mean of two kinds


class HybridSurrogate(ValueFunction):
    """The mean of the paper's MLP (preset adam, `seed`) and a LogPairwiseSurrogate, both fitted on
    the same masks: the MLP's errors and the log-pairwise model's differ, and at 256 stratified masks
    their mean ranked the pairwise interactions of the demo game better than either (bench/README.md,
    Interactions). `parts()` gives both (their disagreement is the map's bias allowance)."""

    def __init__(self, seed: int = 0, **mlp_options):
        self.mlp = MLPSurrogate(preset="adam", seed=seed, **mlp_options)
        self.log_pairwise = LogPairwiseSurrogate(seed=seed)
        self.seed = seed

    def fit(self, masks, scores, sample_weight=None) -> "HybridSurrogate":
        self.mlp.fit(masks, scores, sample_weight=sample_weight)
        self.log_pairwise.fit(masks, scores, sample_weight=sample_weight)
        return self

    def parts(self) -> tuple[ValueFunction, ValueFunction]:
        """(the MLP, the log-pairwise model): the two value functions whose mean this is."""
        return self.mlp, self.log_pairwise

    def _is_fitted(self) -> bool:
        return self.mlp._is_fitted() and self.log_pairwise._is_fitted()

    def _predict_chunk(self, X: np.ndarray) -> np.ndarray:
        return 0.5 * (self.mlp._predict_chunk(X) + self.log_pairwise._predict_chunk(X))  # (c,)


@dataclass(frozen=True)
class SurrogateKind:
    """One registered surrogate: `make(seed, preset, **options)` returns an unfitted Surrogate."""

    name: str
    label: str  # short, for selectboxes and tables
    help: str
    make: Callable[..., Surrogate]
    presets: tuple[str, ...] = ()  # training presets (SurrogateSpec.preset); () = preset ignored
    bootstrap: bool = True  # ensemble members fitted on bootstrap resamples (False: all masks, seeds differ)


# The only list of surrogate kinds: the CLI's --surrogate choices, the app's selectbox and
# `compare` read it. Adding a kind is one entry here (a class with fit/predict) plus its test.
SURROGATES: Registry[SurrogateKind] = Registry("surrogate kind", {
    k.name: k for k in (
        SurrogateKind("mlp", "the paper's MLP", "Linear(L,2L)-CELU-Linear(2L,1)-Sigmoid; preset adam (full-batch, "
                      "early stopping) or paper (the reference SGD schedule)",
                      lambda seed, preset, **o: MLPSurrogate(preset=preset, seed=seed, **o), PRESETS, bootstrap=False),
        SurrogateKind("ridge-pairwise", "ridge, pairwise", "RidgeCV on the mask and all pairwise products "
                      "(the best second-order game)", lambda seed, preset, **o: RidgePairwiseSurrogate(seed=seed, **o)),
        SurrogateKind("gbt", "gradient-boosted trees", "scikit-learn HistGradientBoostingRegressor on the mask bits",
                      lambda seed, preset, **o: GBTSurrogate(seed=seed, **o)),
        SurrogateKind("log-pairwise", "exp of pairwise", "exp of a second-order game fitted by ridge on log(score), "
                      "weighted by score^2", lambda seed, preset, **o: LogPairwiseSurrogate(seed=seed, **o)),
        SurrogateKind("mlp+log-pairwise", "MLP + exp of pairwise", "mean of the MLP (adam) and the log-pairwise "
                      "model; the default of engine interactions",
                      lambda seed, preset, **o: HybridSurrogate(seed=seed, **o), bootstrap=False),
    )
}, error=EstimationError)
KINDS = tuple(SURROGATES)


def variants() -> tuple[str, ...]:
    """Every kind with each of its presets ('mlp:adam', 'mlp:paper', 'ridge-pairwise', 'gbt')."""
    return tuple(f"{k.name}:{p}" for k in SURROGATES.values() for p in k.presets) + tuple(
        k.name for k in SURROGATES.values() if not k.presets)


def variant_label(variant: str) -> str:
    name, _, preset = variant.partition(":")
    label = SURROGATES[name].label if name in SURROGATES else name
    return f"{label} ({preset})" if preset else label


def make_surrogate(spec: SurrogateSpec = SurrogateSpec(), seed: int | None = None, **options) -> Surrogate:
    """An unfitted surrogate of spec.kind (and spec.preset for mlp); `options` go to its constructor."""
    return SURROGATES.lookup(spec.kind).make(seed=spec.seed if seed is None else seed, preset=spec.preset, **options)


def fit_on_rows(spec: SurrogateSpec, X: np.ndarray, y: np.ndarray, rows: Sequence[np.ndarray],
                sample_weight: np.ndarray | None = None, seeds: Sequence[int] | None = None, **options) -> list:
    """One surrogate of `spec` (seed spec.seed) fitted on X[r] for each row set r: the adam MLPs (alone or
    inside mlp+log-pairwise) as one batched network (`fit_mlps_batched`), any other kind one after another.
    The same fitted functions as `make_surrogate(spec).fit(X[r], y[r], w[r])` for each r (within seed noise)."""
    seeds = [spec.seed] * len(rows) if seeds is None else list(seeds)  # one seed per row set (default spec.seed)
    models = [make_surrogate(spec, seed=seed, **options) for seed in seeds]
    w = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if BATCHED_FITS and spec.kind in ("mlp", "mlp+log-pairwise") and spec.preset == "adam" and len(rows) > 1:
        fit_mlps_batched([m if isinstance(m, MLPSurrogate) else m.mlp for m in models], X, y, rows, w)
        for m, r in zip(models, rows):
            if isinstance(m, HybridSurrogate):
                m.log_pairwise.fit(X[r], y[r], sample_weight=None if w is None else w[r])
        return models
    return [m.fit(X[r], y[r], sample_weight=None if w is None else w[r]) for m, r in zip(models, rows)]


class SingleFit:
    """`fit(X, y[, sample_weight]) -> value function` of one surrogate of `spec` (what estimators and intervals
    refit with), plus `on_rows(X, y, rows, sample_weight) -> [value function]`: one fit per row set, the adam
    MLPs batched (`fit_on_rows`; cross-fits and jackknife folds use it)."""

    def __init__(self, spec: SurrogateSpec, **options):
        self.spec, self.options = spec, options

    def __call__(self, X, y, sample_weight=None):
        return make_surrogate(self.spec, **self.options).fit(X, y, sample_weight=sample_weight).predict

    def on_rows(self, X, y, rows, sample_weight=None) -> list:
        return [m.predict for m in fit_on_rows(self.spec, X, y, rows, sample_weight, **self.options)]


# ---------------------------------------------------------------- ensembles


class Ensemble(ValueFunction):
    """k fitted surrogates. Members of kinds with ``bootstrap=False`` (mlp, mlp+log-pairwise) differ in
    seed (init and validation slice); other kinds are fitted on bootstrap resamples. predict = mean
    of members."""

    def __init__(self, spec: SurrogateSpec = SurrogateSpec(), k: int | None = None, batched: bool | None = None,
                 **options):
        self.spec = spec
        self.batched = BATCHED_FITS if batched is None else batched  # adam MLP members trained as one network
        self.k = spec.ensemble if k is None else k
        if self.k < 1:
            raise EstimationError("an ensemble needs at least one member")
        self.options = options
        self.members: list[Surrogate] = []

    def fit(self, masks, scores, sample_weight=None) -> "Ensemble":
        """Fit every member; sample_weight float[n] (None: all 1) goes to each member's fit (bootstrap
        members get the weights of the rows they drew)."""
        X, y = check_xy(masks, scores)
        w = check_weight(sample_weight, len(y))
        self.members = []
        if self.batched and self.k > 1 and self.spec.kind in ("mlp", "mlp+log-pairwise") and self.spec.preset == "adam":
            members = [make_surrogate(self.spec, seed=self.spec.seed + j, **self.options) for j in range(self.k)]
            mlps = [m if isinstance(m, MLPSurrogate) else m.mlp for m in members]
            fit_mlps_batched(mlps, X, y, sample_weight=w)  # one batched network for every member's MLP
            for m in members:
                if isinstance(m, HybridSurrogate):
                    m.log_pairwise.fit(X, y, sample_weight=w)
            self.members = members
            return self
        for j in range(self.k):
            seed = self.spec.seed + j
            member = make_surrogate(self.spec, seed=seed, **self.options)
            if not SURROGATES[self.spec.kind].bootstrap:
                member.fit(X, y, sample_weight=w)
            else:
                idx = np.random.default_rng(seed).integers(0, len(y), len(y)) if self.k > 1 else np.arange(len(y))
                member.fit(X[idx], y[idx], sample_weight=None if w is None else w[idx])
            self.members.append(member)
        return self

    def predict_all(self, masks) -> np.ndarray:
        """float[k, n]: every member's prediction."""
        if not self.members:
            raise EstimationError("ensemble is not fitted yet: call fit(masks, scores) first")
        return np.stack([m.predict(masks) for m in self.members])

    def predict(self, masks) -> np.ndarray:
        return self.predict_all(masks).mean(axis=0)

    def value_functions(self) -> list:
        """Each fitted member (a callable value function), for the estimators (engine.estimators, shapley.ensemble_mean)."""
        return list(self.members)


# ---------------------------------------------------------------- split and diagnostics


@dataclass(frozen=True)
class Split:
    """Indices into the masks: train / test (held out). stratified: by kept-layer count."""

    train: np.ndarray
    test: np.ndarray
    stratified: bool
    note: str = ""

    def to_dict(self) -> dict:
        return {"n_train": len(self.train), "n_test": len(self.test), "stratified": self.stratified, "note": self.note}


def split(masks, scores, holdout: float = 0.2, seed: int = 0, testable=None) -> Split:
    """Hold out ~`holdout` of each kept-count stratum (at least one mask from every stratum with
    two or more; strata with a single mask stay in training). Falls back to an unstratified
    random split (with a note) when stratifying leaves either side empty.

    testable bool[n] (None: every row): only these rows may be held out, ~`holdout` of them per
    stratum; the others always train (partially evaluated rows: their scores are estimates, so
    held-out metrics are computed on completely evaluated rows only)."""
    X, y = check_xy(masks, scores)
    ok = np.ones(len(y), dtype=bool) if testable is None else np.asarray(testable, dtype=bool).reshape(-1)
    if not 0.0 < holdout < 1.0:
        raise EstimationError(f"holdout must be a fraction between 0 and 1, got {holdout}")
    rng = np.random.default_rng(seed)
    n = len(y)
    counts = X.sum(axis=1)
    train, test, singles = [], [], []
    for k in np.unique(counts):
        idx = rng.permutation(np.flatnonzero(counts == k))
        if len(idx) < 2:
            singles.append(int(k))
            train.append(idx)
            continue
        n_ok = int(ok[idx].sum())
        idx = np.concatenate([idx[ok[idx]], idx[~ok[idx]]])  # testable rows first, shuffled order kept
        n_test = min(max(int(round(n_ok * holdout)), 1), len(idx) - 1, n_ok)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    train_i = np.sort(np.concatenate(train)) if train else np.array([], int)
    test_i = np.sort(np.concatenate(test)) if test else np.array([], int)
    note = f"kept counts {singles} have a single mask and stay in training" if singles else ""
    if len(test_i) == 0 or len(train_i) < MIN_MASKS // 2:
        order = rng.permutation(n)
        order = np.concatenate([order[ok[order]], order[~ok[order]]])
        n_test = min(max(int(round(int(ok.sum()) * holdout)), 1), n - 1, int(ok.sum()))
        return Split(np.sort(order[n_test:]), np.sort(order[:n_test]), False,
                     "no kept-count stratum could be split: unstratified random split")
    return Split(train_i, test_i, True, note)


@dataclass(frozen=True)
class Metrics:
    """Fit quality on n masks. *_ppl: in perplexity (ppl_full / max(score, SCORE_FLOOR));
    mape_ppl: mean |predicted - true| / true perplexity. NaN where undefined (n < 2 or constant)."""

    n: int
    r2: float
    spearman: float
    mae: float
    mae_ppl: float
    mape_ppl: float

    def to_dict(self) -> dict:
        return jsonable(self.__dict__)


def metrics(y_true, y_pred, ppl_full: float = 1.0) -> Metrics:
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    n = len(y)
    if n == 0:
        return Metrics(0, math.nan, math.nan, math.nan, math.nan, math.nan)
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum((y - p) ** 2)) / ss_tot if n >= 2 and ss_tot > 0 else math.nan
    rho = float(spearmanr(y, p).statistic) if n >= 2 and np.ptp(y) > 0 and np.ptp(p) > 0 else math.nan
    ppl_t = ppl_full / np.maximum(y, SCORE_FLOOR)
    ppl_p = ppl_full / np.maximum(p, SCORE_FLOOR)
    return Metrics(n, r2, rho, float(np.mean(np.abs(y - p))), float(np.mean(np.abs(ppl_t - ppl_p))),
                   float(np.mean(np.abs(ppl_t - ppl_p) / ppl_t)))


@dataclass(frozen=True)
class Diagnostics:
    """Metrics overall and per kept-layer count (stratum)."""

    overall: Metrics
    per_stratum: dict  # kept count (int) -> Metrics

    def to_dict(self) -> dict:
        return {"overall": self.overall.to_dict(), "per_stratum": {str(k): m.to_dict() for k, m in self.per_stratum.items()}}


def diagnose(masks, y_true, y_pred, ppl_full: float = 1.0) -> Diagnostics:
    counts = np.asarray(masks, dtype=bool).sum(axis=1)
    y_true, y_pred = np.asarray(y_true, float), np.asarray(y_pred, float)
    per = {int(k): metrics(y_true[counts == k], y_pred[counts == k], ppl_full) for k in np.unique(counts)}
    return Diagnostics(metrics(y_true, y_pred, ppl_full), per)


@dataclass(frozen=True)
class FitReport:
    """Held-out diagnostics of an ensemble fitted on the training part of a split."""

    spec: SurrogateSpec
    split: Split
    test: Diagnostics
    train: Metrics
    fit_seconds: float
    member_history: tuple = ()

    def to_dict(self) -> dict:
        return {
            "spec": dict(self.spec.__dict__),
            "split": self.split.to_dict(),
            "test": self.test.to_dict(),
            "train": self.train.to_dict(),
            "fit_seconds": self.fit_seconds,
            "member_history": jsonable(list(self.member_history)),
        }


@dataclass(frozen=True)
class FittedSurrogate:
    ensemble: Ensemble
    report: FitReport


def fit_with_diagnostics(masks, scores, spec: SurrogateSpec = SurrogateSpec(), ppl_full: float = 1.0,
                         sample_weight=None, testable=None, **options) -> FittedSurrogate:
    """Split (spec.holdout, spec.seed; only `testable` rows held out), fit an Ensemble of
    spec.ensemble members on the training part (weighted by `sample_weight`), and report held-out
    metrics. The returned ensemble is the one that was diagnosed."""
    X, y = check_xy(masks, scores)
    w = check_weight(sample_weight, len(y))
    sp = split(X, y, spec.holdout, spec.seed, testable)
    t0 = time.perf_counter()
    ens = Ensemble(spec, **options).fit(X[sp.train], y[sp.train], None if w is None else w[sp.train])
    secs = time.perf_counter() - t0
    report = FitReport(
        spec, sp, diagnose(X[sp.test], y[sp.test], ens.predict(X[sp.test]), ppl_full),
        metrics(y[sp.train], ens.predict(X[sp.train]), ppl_full), secs,
        tuple(getattr(m, "history", {}) for m in ens.members),
    )
    return FittedSurrogate(ens, report)


def fit_with_curve(masks, scores, spec: SurrogateSpec, sizes: Sequence[int], ppl_full: float = 1.0,
                   sample_weight=None, testable=None, **options) -> tuple[FittedSurrogate, "LearningCurve"]:
    """`fit_with_diagnostics(spec)` and `learning_curve(sizes, spec with ensemble=1)` on the same split, the
    ensemble's and the curve's adam MLPs trained as ONE batched network (`fit_on_rows`); other kinds, or
    BATCHED_FITS off, call the two functions. The same fitted functions either way (within seed noise)."""
    if not (BATCHED_FITS and spec.kind in ("mlp", "mlp+log-pairwise") and spec.preset == "adam"):
        fitted = fit_with_diagnostics(masks, scores, spec, ppl_full, sample_weight, testable, **options)
        one = replace(spec, ensemble=1)
        return fitted, learning_curve(masks, scores, sizes, one, ppl_full, sample_weight, testable, **options)
    X, y = check_xy(masks, scores)
    w = check_weight(sample_weight, len(y))
    sp = split(X, y, spec.holdout, spec.seed, testable)
    order = np.random.default_rng(spec.seed).permutation(sp.train)  # the learning curve's nested subsets
    kept = sorted({int(s) for s in sizes if MIN_MASKS <= int(s) <= len(order)})
    dropped = sorted({int(s) for s in sizes} - set(kept))
    if not kept:
        raise EstimationError(f"no size in {list(sizes)} fits: need {MIN_MASKS}..{len(order)} training masks")
    train = np.asarray(sp.train)
    k = spec.ensemble
    t0 = time.perf_counter()
    models = fit_on_rows(spec, X, y, [train] * k + [order[:s] for s in kept], w,
                         seeds=[spec.seed + j for j in range(k)] + [spec.seed] * len(kept), **options)
    secs = time.perf_counter() - t0
    ens = Ensemble(spec, **options)
    ens.members = models[:k]
    report = FitReport(
        spec, sp, diagnose(X[sp.test], y[sp.test], ens.predict(X[sp.test]), ppl_full),
        metrics(y[sp.train], ens.predict(X[sp.train]), ppl_full), secs,
        tuple(getattr(m, "history", {}) for m in ens.members),
    )
    curve = [metrics(y[sp.test], m.predict(X[sp.test]), ppl_full) for m in models[k:]]
    note = f"sizes {dropped} skipped (outside {MIN_MASKS}..{len(order)})" if dropped else ""
    return FittedSurrogate(ens, report), LearningCurve(tuple(kept), tuple(curve), len(sp.test), note)


@dataclass(frozen=True)
class LearningCurve:
    """Held-out metrics against the number of training masks (same test set for every size)."""

    sizes: tuple[int, ...]
    metrics: tuple[Metrics, ...]
    n_test: int
    note: str = ""

    def to_dict(self) -> dict:
        return {"sizes": list(self.sizes), "metrics": [m.to_dict() for m in self.metrics], "n_test": self.n_test,
                "note": self.note}


def learning_curve(masks, scores, sizes: Sequence[int], spec: SurrogateSpec = SurrogateSpec(),
                   ppl_full: float = 1.0, sample_weight=None, testable=None, **options) -> LearningCurve:
    """Fit one surrogate (seed spec.seed) on the first `size` masks of a seeded shuffle of the
    training part, for each size (nested subsets), and score it on the same held-out part
    (sample_weight / testable as in `fit_with_diagnostics`)."""
    X, y = check_xy(masks, scores)
    w = check_weight(sample_weight, len(y))
    sp = split(X, y, spec.holdout, spec.seed, testable)
    order = np.random.default_rng(spec.seed).permutation(sp.train)
    kept = sorted({int(s) for s in sizes if MIN_MASKS <= int(s) <= len(order)})
    dropped = sorted({int(s) for s in sizes} - set(kept))
    if not kept:
        raise EstimationError(f"no size in {list(sizes)} fits: need {MIN_MASKS}..{len(order)} training masks")
    models = fit_on_rows(spec, X, y, [order[:s] for s in kept], w, **options)  # one batched fit for the MLP
    out = [metrics(y[sp.test], model.predict(X[sp.test]), ppl_full) for model in models]
    note = f"sizes {dropped} skipped (outside {MIN_MASKS}..{len(order)})" if dropped else ""
    return LearningCurve(tuple(kept), tuple(out), len(sp.test), note)


def _parse_kind(kind: str, base: SurrogateSpec) -> SurrogateSpec:
    """'mlp', 'mlp:paper', 'ridge-pairwise', 'gbt' -> a spec."""
    name, _, preset = kind.partition(":")
    return replace(base, kind=name, preset=preset or base.preset)


@dataclass(frozen=True)
class Comparison:
    """One row per surrogate kind: held-out metrics on the same split."""

    rows: tuple[dict, ...]
    split: Split

    def to_dict(self) -> dict:
        return {"rows": jsonable(list(self.rows)), "split": self.split.to_dict()}


def compare(masks, scores, kinds: Sequence[str] | None = None,
            spec: SurrogateSpec = SurrogateSpec(), ppl_full: float = 1.0, sample_weight=None,
            testable=None, adam_mlp: "MLPSurrogate | None" = None) -> Comparison:
    """Fit each kind ('mlp:paper' picks a preset) once (seed spec.seed) on the same training part;
    held-out metrics and fit time per kind (sample_weight / testable as in `fit_with_diagnostics`).
    `adam_mlp`: an adam MLP already fitted with seed spec.seed on that training part (the ensemble's first
    member): mlp:adam is that fit and mlp+log-pairwise's MLP part too (`reused`; fit_seconds then count
    only what was fitted here)."""
    X, y = check_xy(masks, scores)
    w = check_weight(sample_weight, len(y))
    sp = split(X, y, spec.holdout, spec.seed, testable)
    rows = []
    for kind in variants() if kinds is None else kinds:
        s = _parse_kind(kind, spec)
        t0 = time.perf_counter()
        tw = None if w is None else w[sp.train]
        reused = adam_mlp is not None and s.kind in ("mlp", "mlp+log-pairwise") and s.preset == "adam"
        if reused and s.kind == "mlp":
            model = adam_mlp
        elif reused:
            model = make_surrogate(s)
            model.mlp = adam_mlp  # the same network: same seed, same rows
            model.log_pairwise.fit(X[sp.train], y[sp.train], sample_weight=tw)
        else:
            model = make_surrogate(s).fit(X[sp.train], y[sp.train], sample_weight=tw)
        secs = time.perf_counter() - t0
        m = metrics(y[sp.test], model.predict(X[sp.test]), ppl_full)
        rows.append({"kind": s.kind, "preset": s.preset if s.kind == "mlp" else None, **m.__dict__,
                     "fit_seconds": secs, **({"reused": "the ensemble's first member's MLP"} if reused else {})})
    return Comparison(tuple(rows), sp)
