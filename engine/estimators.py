"""The registry of contribution estimators: one entry per estimator, the only place that lists them.

Contract (in the style of shapiq's approximators): an estimator takes an `EstimationInput` (the
fitted surrogate ensemble as value functions, the run's evaluated samples and design, a budget
and a seed) and returns a `shapley.Contributions`. `budget` has one meaning for every estimator:
value-function evaluations per surrogate member (the paper's 80,000 masks with all L flips are
80,000 x (L + 1)); exact estimators ignore it and say so. Each entry declares its label, help,
the estimand it targets (Shapley value, restricted-strata semivalue or Banzhaf value) and its
default budget. The CLI's --estimator choices, the app's selectboxes and the benchmarks read
`ESTIMATORS`; adding an estimator is one `register(...)` call here plus its test.

This module imports nothing heavy at the top (the CLI builds its parser from it without loading
torch); the estimators import engine.shapley when they run.
"""

from __future__ import annotations

import numpy as np

from dataclasses import dataclass
from typing import Callable, Sequence

from engine.errors import EstimationError
from engine.registry import Registry
from engine.shapley import EXACT_MAX_L  # numpy only: the registry still imports nothing heavy

SHAPLEY_VALUE = "Shapley value"
STRATA_SEMIVALUE = "restricted-strata semivalue"
SAMPLED_STRATA_SEMIVALUE = "restricted-strata semivalue on the sampled kept counts"
BANZHAF_VALUE = "Banzhaf value"
PAPER_MASKS = 80_000  # the reference code's Monte Carlo masks (each with all L flips)
PERMUTATIONS = 2_000


@dataclass(frozen=True)
class EstimationInput:
    """What an estimator may use. `members`: the fitted ensemble's value functions f(bool[n, L]) -> float[n];
    `samples`: the run's evaluated masks (method.Samples, with its sampling design); `fit_one(X, y[, w])`:
    a freshly fitted single surrogate's value function (for cross-fitting)."""

    members: Sequence[Callable]
    samples: object
    n_layers: int
    budget: int
    seed: int
    fit_one: Callable
    level: float = 0.9  # interval level (estimators that make their own interval: regression-adjusted)
    window_scores: object = None  # float[B, n]: the samples' scores on B window resamples, or None (no window part)


@dataclass(frozen=True)
class Estimator:
    name: str
    label: str  # short, for selectboxes and legends
    help: str  # one sentence: what it computes and how
    estimand: str  # SHAPLEY_VALUE | STRATA_SEMIVALUE | BANZHAF_VALUE (SAMPLED_STRATA_SEMIVALUE: see `estimand`)
    run: Callable[[EstimationInput], object]
    default_budget: Callable[[int], int | None]  # L -> evaluations per surrogate (None: exact, no budget)
    max_layers: int | None = None  # exact enumeration limit
    uses_real_evaluations: bool = False  # True: corrects the surrogate with the evaluated masks

    def budget_for(self, L: int, budget: int | None) -> int | None:
        return self.default_budget(L) if budget is None else int(budget)


ESTIMATORS: Registry[Estimator] = Registry("estimator", error=EstimationError)


def register(estimator: Estimator) -> Estimator:
    return ESTIMATORS.register(estimator.name, estimator)


def get(name: str) -> Estimator:
    return ESTIMATORS.lookup(name)


def strata_of(design, L: int) -> tuple[int, ...]:
    """Kept counts the paper's estimator averages over: the run's strata (stratified runs), else the paper's."""
    from engine.config import SamplingSpec
    from engine.sampling import resolve_strata

    return resolve_strata(design if design.scheme == "stratified" else SamplingSpec(), L)


# ---------------------------------------------------------------- the estimators


def _paper(x: EstimationInput):
    from engine import shapley

    strata = strata_of(x.samples.design, x.n_layers)
    n_masks = max(2, x.budget // (x.n_layers + 1))
    return shapley.with_ensemble(
        lambda g: shapley.restricted_strata_semivalue(g, x.n_layers, strata, n_masks=n_masks, seed=x.seed), x.members)


def _exact(x: EstimationInput):
    from engine import shapley

    return shapley.with_ensemble(lambda g: shapley.exact_shapley(g, x.n_layers), x.members)


def _banzhaf(x: EstimationInput):
    from engine import shapley

    _check_exact(x.n_layers, "exact Banzhaf")
    return shapley.with_ensemble(lambda g: shapley.semivalue(g, x.n_layers, shapley.BANZHAF), x.members)


def _permutation(x: EstimationInput):
    from engine import shapley

    n_perm = max(2, x.budget // (x.n_layers + 1))
    return shapley.with_ensemble(
        lambda g: shapley.permutation_shapley(g, x.n_layers, n_permutations=n_perm, seed=x.seed), x.members)


def weighting_for(name: str, design, L: int):
    """The shapley.Weighting whose semivalue estimator `name` targets on a run sampled with `design`."""
    from engine import shapley

    target = estimand(name, design, L)
    if target == SHAPLEY_VALUE:
        return shapley.SHAPLEY
    if target == BANZHAF_VALUE:
        return shapley.BANZHAF
    if target == SAMPLED_STRATA_SEMIVALUE:
        return shapley.sampled_strata(strata_of(design, L))
    return shapley.restricted_strata(strata_of(design, L))


def _regression_adjusted(x: EstimationInput):
    """Shapley on size-uniform runs (fully covered); on stratified runs the restricted-strata semivalue
    on the sampled kept counts (shapley.sampled_strata: only the paper's coalitions whose two masks both
    have a sampled kept count), so every mask it weighs is one the correction sees and the interval needs
    no bias allowance. (The paper's own estimand also weighs the kept count below the lowest stratum,
    never sampled: there the surrogate extrapolates and no stated allowance held on held-out games,
    bench/README.md.) engine.uncertainty.regression_adjusted:
    post-stratified by kept count, fully evaluated kept counts summed exactly, its own interval.

    Runs with active rounds (engine.active) or partial rows (multi-fidelity): the surrogates are
    fitted on every row (partial rows with their fit weights, engine.fidelity.fit_weights), but only
    the complete design-drawn rows (source == "design", every window evaluated) enter the
    correction term (`real_rows`): its post-stratification assumes uniform draws within each kept
    count, which the actively chosen masks are not, and exact scores, which partial rows lack."""
    from engine import shapley, uncertainty

    s, L = x.samples, x.n_layers
    weighting = weighting_for("regression-adjusted", s.design, L)
    iv = uncertainty.regression_adjusted(s.masks, s.scores, x.fit_one, weighting, level=x.level, seed=x.seed,
                                         n_boot=0,  # the analytic variance; bench.uncertainty checks it
                                         **real_rows(s), window_scores=x.window_scores)
    folds = iv.details["n_folds"]
    per_fit = (1 << L) if L <= shapley.EXACT_MAX_L else uncertainty.MC_PER_SIZE * (L + 1)  # surrogate calls
    details = {**iv.details, "interval": iv.to_dict(),
               "stderr_is": "standard error of the cross-fitted correction (stratified by kept count)"}
    return shapley.Contributions(iv.values, iv.se, f"{weighting.name}, regression-adjusted (cross-fitted)",
                                 folds * per_fit, details)


MIN_CORRECTION_ROWS = 20  # complete design rows below which partial rows join the correction


def real_rows(samples) -> dict:
    """Keyword arguments of uncertainty.regression_adjusted for a Samples record: `train_only` (rows
    that train the surrogates but stay out of the correction: those an active round chose and the
    partially evaluated ones, whose scores are estimates; None when there are none) and
    `sample_weight` (the fit weights of partially evaluated rows; None when there are none). The
    correction then runs over the complete design rows, a uniform subsample of the design (completed
    rows are drawn at random within each kept count, engine.fidelity.to_complete)."""
    design = getattr(samples, "design_rows", None)
    real = None if design is None else design.copy()
    complete = getattr(samples, "complete", None)
    if complete is not None:
        exact = np.asarray(complete, dtype=bool) if real is None else real & np.asarray(complete, dtype=bool)
        # Too few complete design rows for a cross-fitted correction: correct with the estimated
        # scores of every design row instead (biased toward the first windows' game; the run needs
        # a larger --complete share or more masks for the unbiased correction).
        real = exact if exact.sum() >= MIN_CORRECTION_ROWS else real
    return {"train_only": None if real is None or real.all() else ~real,
            "sample_weight": getattr(samples, "weights", None)}


def _check_exact(L: int, what: str) -> None:
    from engine.errors import EstimationError
    from engine.shapley import EXACT_MAX_L

    if L > EXACT_MAX_L:
        raise EstimationError(f"{what} enumerates 2^L masks and needs L <= {EXACT_MAX_L}; this model has {L} "
                              "layers. Choose the paper or permutation estimator.")


register(Estimator(
    "paper", "restricted-strata semivalue (paper)",
    "the paper's estimator: mean of f(m with i kept) - f(m with i dropped) over masks m drawn from the "
    "sampling strata, on each surrogate (Monte Carlo)", STRATA_SEMIVALUE, _paper,
    default_budget=lambda L: PAPER_MASKS * (L + 1)))
register(Estimator(
    "exact", "exact Shapley", "exact Shapley values on each surrogate by enumerating all 2^L masks",
    SHAPLEY_VALUE, _exact, default_budget=lambda L: None, max_layers=EXACT_MAX_L))
register(Estimator(
    "permutation", "permutation Shapley", "Shapley values on each surrogate by antithetic permutation sampling "
    "(L + 1 evaluations per permutation)", SHAPLEY_VALUE, _permutation,
    default_budget=lambda L: PERMUTATIONS * (L + 1)))
register(Estimator(
    "banzhaf", "exact Banzhaf", "exact Banzhaf values on each surrogate (all 2^L masks)", BANZHAF_VALUE, _banzhaf,
    default_budget=lambda L: None, max_layers=EXACT_MAX_L))
register(Estimator(
    "regression-adjusted", "regression-adjusted",
    "the surrogate's exact value plus a cross-fitted Monte Carlo correction from the real evaluations "
    "(Witter, Liu & Musco 2025): unbiased for the Shapley value on size-uniform runs, for the "
    "restricted-strata semivalue on the sampled kept counts on stratified runs", SHAPLEY_VALUE, _regression_adjusted,
    default_budget=lambda L: None if L <= EXACT_MAX_L else PAPER_MASKS * (L + 1), uses_real_evaluations=True))


def estimand(name: str, design, L: int | None = None) -> str:
    """What `name` estimates on a run sampled with `design` (regression adjustment follows the design: on
    stratified runs the semivalue on the sampled kept counts, or, for an L whose strata hold no two adjacent
    kept counts, the paper's restricted-strata semivalue)."""
    e = get(name)
    if e.uses_real_evaluations and design.scheme == "stratified":
        if L is not None:
            from engine.shapley import has_adjacent_strata

            if not has_adjacent_strata(strata_of(design, L), L):
                return STRATA_SEMIVALUE
        return SAMPLED_STRATA_SEMIVALUE
    return e.estimand
