"""The registry of contribution estimators: one entry per estimator, the only place that lists them.

Contract (in the style of shapiq's approximators): an `Estimator` is one object that owns, for a
run sampled with a given design, everything the contributions step needs:

* its estimand (`estimand_on(design, L)`: Shapley value, restricted-strata semivalue or Banzhaf
  value; regression adjustment follows the design) and the weighting over kept counts that
  estimand is (`weighting(design, L)`, a shapley.Weighting);
* its input (`input(samples, members, fit_one, spec)` -> `EstimationInput`: budget, seed, level,
  window resamples (`window_scores`, moved here from engine.method), weighting);
* its point estimate (`run(EstimationInput)` -> shapley.Contributions);
* its interval (`interval(x, c)` -> contribution intervals, moved here from
  engine.method.contribution_interval; None when the estimate carries its own, regression-adjusted,
  or when no bootstrap is asked for).

`budget` has one meaning for every estimator: value-function evaluations per surrogate member (the
paper's 80,000 masks with all L flips are 80,000 x (L + 1)); exact estimators ignore it and say so.
engine.method looks the estimator up once (`get`) and asks it; the CLI's --estimator choices, the
app's selectboxes and the benchmarks read `ESTIMATORS`; adding an estimator is one `register(...)`
call here plus its test.

This module imports nothing heavy at the top (the CLI builds its parser from it without loading
torch or scipy); the estimators import engine.shapley's estimators and the interval code when they run.
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
    a freshly fitted single surrogate's value function (for cross-fitting). Built by `Estimator.input`."""

    members: Sequence[Callable]
    samples: object
    n_layers: int
    budget: int
    seed: int
    fit_one: Callable
    weighting: object  # shapley.Weighting of the estimand on this design (Estimator.weighting)
    level: float = 0.9  # interval level
    window_scores: object = None  # float[B, n]: the samples' scores on B window resamples, or None (no window part)
    n_boot: int = 0  # bootstrap refits over the masks for a surrogate-only estimate's interval (0: no interval)


@dataclass(frozen=True)
class Estimator:
    name: str
    label: str  # short, for selectboxes and legends
    help: str  # one sentence: what it computes and how
    estimand: str  # SHAPLEY_VALUE | STRATA_SEMIVALUE | BANZHAF_VALUE (on a given design: `estimand_on`)
    run: Callable[[EstimationInput], object]  # the point estimate: EstimationInput -> shapley.Contributions
    default_budget: Callable[[int], int | None]  # L -> evaluations per surrogate (None: exact, no budget)
    max_layers: int | None = None  # exact enumeration limit
    uses_real_evaluations: bool = False  # True: corrects the surrogate with the evaluated masks (own interval)

    def budget_for(self, L: int, budget: int | None) -> int | None:
        return self.default_budget(L) if budget is None else int(budget)

    def estimand_on(self, design, L: int | None = None) -> str:
        """What this estimator estimates on a run sampled with `design` (regression adjustment follows the
        design: on stratified runs the semivalue on the sampled kept counts, or, for an L whose strata hold
        no two adjacent kept counts, the paper's restricted-strata semivalue)."""
        if self.uses_real_evaluations and design.scheme == "stratified":
            if L is not None:
                from engine.shapley import has_adjacent_strata

                if not has_adjacent_strata(strata_of(design, L), L):
                    return STRATA_SEMIVALUE
            return SAMPLED_STRATA_SEMIVALUE
        return self.estimand

    def weighting(self, design, L: int):
        """The shapley.Weighting (over kept counts) whose semivalue this estimator targets on `design`."""
        from engine import shapley

        target = self.estimand_on(design, L)
        if target == SHAPLEY_VALUE:
            return shapley.SHAPLEY
        if target == BANZHAF_VALUE:
            return shapley.BANZHAF
        if target == SAMPLED_STRATA_SEMIVALUE:
            return shapley.sampled_strata(strata_of(design, L))
        return shapley.restricted_strata(strata_of(design, L))

    def input(self, samples, members, fit_one, spec) -> EstimationInput:
        """The EstimationInput for `samples` (method.Samples) and the ensemble `members` under `spec`
        (config.MethodSpec: budget, mc_seed, level, window_boot, boot); `fit_one` refits one surrogate."""
        L = int(samples.masks.shape[1])  # masks bool (n, L)
        return EstimationInput(members, samples, L, self.budget_for(L, spec.budget) or 0, spec.mc_seed, fit_one,
                               self.weighting(samples.design, L), spec.level,
                               window_scores(samples, spec.window_boot, spec.mc_seed), spec.boot)

    def interval(self, x: EstimationInput, c):
        """contribution_intervals.Intervals for a surrogate-only estimate `c` (paper, exact, permutation,
        banzhaf): `x.n_boot` bootstrap refits over the masks, the ensemble spread (c.details['members']) and
        the bias estimated by cross-fitted regression adjustment toward the same estimand. With
        `x.window_scores` the reference is re-evaluated on the window resamples and that spread joins the
        noise (the estimate and its reference move together with the windows, so it is the estimate's own
        window noise). None for an estimator that makes its own interval (regression-adjusted: in
        c.details['interval']) and when x.n_boot is 0."""
        if self.uses_real_evaluations or not x.n_boot:
            return None
        from engine import contribution_intervals as intervals

        s = x.samples
        reference = intervals.regression_adjusted(s.masks, s.scores, x.fit_one, x.weighting, x.level, seed=x.seed,
                                                  n_boot=0, **real_rows(s), window_scores=x.window_scores)
        members = c.details.get("members")
        return intervals.surrogate_interval(s.masks, s.scores, x.fit_one, x.weighting, c.values,
                                            None if members is None else np.asarray(members), self.name,
                                            x.level, x.n_boot, x.seed, reference)


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


def window_scores(samples, n_boot: int, seed: int) -> np.ndarray | None:
    """float[n_boot, n]: the samples' scores on window resamples (contribution_intervals.window_resampled_scores,
    seeded by `seed`), or None when n_boot is 0 (MethodSpec.window_boot). EstimationError when the run
    lacks the per-window losses (a version-1 store's rows, or rows evaluated by Ray workers).
    (Was engine.method.window_scores.)"""
    if not n_boot:
        return None
    partial = samples.complete is not None and not np.all(samples.complete)
    if samples.window_nll is None or samples.full_window_nll is None or partial:
        raise EstimationError(
            "window resampling needs each mask's loss per calibration window, and this run does not have them for "
            "every mask (masks evaluated before store schema 2, by Ray workers, or on some windows only in a "
            "multi-fidelity run). Drop --window-boot, or sample "
            "into a new run (another --cache-dir) without --workers.")
    from engine import contribution_intervals as intervals

    return intervals.window_resampled_scores(samples.window_nll, samples.window_tokens, samples.full_window_nll,
                                               samples.full_window_tokens, n_boot, seed)


# ---------------------------------------------------------------- the estimators


def _paper(x: EstimationInput):
    from engine import shapley

    strata = strata_of(x.samples.design, x.n_layers)
    n_masks = max(2, x.budget // (x.n_layers + 1))
    return shapley.ensemble_mean([shapley.restricted_strata_semivalue(g, x.n_layers, strata, n_masks=n_masks,
                                                                      seed=x.seed) for g in x.members])


def _exact(x: EstimationInput):
    from engine import shapley

    return shapley.ensemble_mean([shapley.exact_shapley(g, x.n_layers) for g in x.members])


def _banzhaf(x: EstimationInput):
    from engine import shapley

    _check_exact(x.n_layers, "exact Banzhaf")
    return shapley.ensemble_mean([shapley.semivalue(g, x.n_layers, shapley.BANZHAF) for g in x.members])


def _permutation(x: EstimationInput):
    from engine import shapley

    n_perm = max(2, x.budget // (x.n_layers + 1))
    return shapley.ensemble_mean([shapley.permutation_shapley(g, x.n_layers, n_permutations=n_perm, seed=x.seed)
                                  for g in x.members])


def weighting_for(name: str, design, L: int):
    """The shapley.Weighting whose semivalue estimator `name` targets on a run sampled with `design`
    (`get(name).weighting`, for callers holding a name only)."""
    return get(name).weighting(design, L)


def _regression_adjusted(x: EstimationInput):
    """Shapley on size-uniform runs (fully covered); on stratified runs the restricted-strata semivalue
    on the sampled kept counts (shapley.sampled_strata: only the paper's coalitions whose two masks both
    have a sampled kept count), so every mask it weighs is one the correction sees and the interval needs
    no bias allowance. (The paper's own estimand also weighs the kept count below the lowest stratum,
    never sampled: there the surrogate extrapolates and no stated allowance held on held-out games,
    bench/README.md.) engine.contribution_intervals.regression_adjusted:
    post-stratified by kept count, fully evaluated kept counts summed exactly, its own interval.

    Runs with active rounds (engine.active) or partial rows (multi-fidelity): the surrogates are
    fitted on every row (partial rows with their fit weights, engine.fidelity.fit_weights), but only
    the complete design-drawn rows (source == "design", every window evaluated) enter the
    correction term (`real_rows`): its post-stratification assumes uniform draws within each kept
    count, which the actively chosen masks are not, and exact scores, which partial rows lack."""
    from engine import contribution_intervals as intervals, shapley

    s, L, weighting = x.samples, x.n_layers, x.weighting
    iv = intervals.regression_adjusted(s.masks, s.scores, x.fit_one, weighting, level=x.level, seed=x.seed,
                                       n_boot=0,  # the analytic variance; bench.uncertainty checks it
                                       **real_rows(s), window_scores=x.window_scores)
    folds = iv.details["n_folds"]
    per_fit = (1 << L) if L <= shapley.EXACT_MAX_L else intervals.MC_PER_SIZE * (L + 1)  # surrogate calls
    details = {**iv.details, "interval": iv.to_dict(),
               "stderr_is": "standard error of the cross-fitted correction (stratified by kept count)"}
    return shapley.Contributions(iv.values, iv.se, f"{weighting.name}, regression-adjusted (cross-fitted)",
                                 folds * per_fit, details)


MIN_CORRECTION_ROWS = 20  # complete design rows below which partial rows join the correction


def real_rows(samples) -> dict:
    """Keyword arguments of contribution_intervals.regression_adjusted for a Samples record: `train_only` (rows
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
    """What estimator `name` estimates on a run sampled with `design` (`get(name).estimand_on`, for
    callers holding a name only)."""
    return get(name).estimand_on(design, L)
