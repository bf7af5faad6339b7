"""Stage 2 of the method as pure functions over `(Samples, specs)`: no store, no files, no model.

* ``fit(samples, surrogate_spec)``               -> Fit (ensemble, held-out diagnostics, curve, comparison)
* ``contributions(samples, fit, method_spec)``   -> shapley.Contributions (the estimator from the registry
  makes the estimate and its interval; window resamples and surrogate-only intervals live in engine.estimators)
* ``decide(fit, contributions, ks, measure, ...)`` -> Decisions (rank-and-cut or verified search per k)

`measure` (real perplexities of keep-masks) is passed in, so the same code runs on a loaded
model (engine.pipeline), on a ground-truth lookup table (bench/compare.py) or on a synthetic
game (tests). Storing results, timing and progress belong to engine.pipeline, the one orchestrator.

Scores: s(m) = ppl_full / ppl(m) in [0, ~1]; a mask whose perplexity was NaN/inf has score 0
(stored with its flag), so it stays aligned with its mask and counts as "the model broke".
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from engine import decision as decision_lib
from engine import estimators, shapley
from engine.config import (DEMO_DATA, INTERACTION_SURROGATE, MIN_MASKS, DataSpec, MethodSpec, SamplingSpec,
                           SurrogateSpec)
from engine.errors import EstimationError, WorkbenchError
from engine import surrogate
from engine.evaluate import scores
from engine.surrogate import (SURROGATES, Ensemble, FittedSurrogate, MLPSurrogate, SingleFit, compare,
                              fit_with_curve, fit_with_diagnostics, make_surrogate, split)

# Held-out splits measured next to the calibration split when the run uses the bundled text.
DEMO_EVAL_SPLITS = ("demo-test", "demo-ood")
ValueFn = Callable[[np.ndarray], np.ndarray]


# ---------------------------------------------------------------- samples


@dataclass(frozen=True)
class Samples:
    """Evaluated masks and what every stage-2 step reads: one record, whatever produced it
    (a run store, a ground-truth table, a synthetic game)."""

    masks: np.ndarray  # bool (n, L), True = layer kept
    scores: np.ndarray  # float (n,): ppl_full / ppl, 0 where non-finite
    ppl: np.ndarray  # float (n,), NaN/inf kept
    nonfinite: np.ndarray  # bool (n,)
    ppl_full: float
    design: SamplingSpec  # how the masks were drawn (strata, scheme): estimators need it
    window_nll: np.ndarray | None = None  # float (n, W) summed NLL per calibration window, when stored
    window_tokens: np.ndarray | None = None  # int (n, W) tokens per window, when stored
    # Multi-fidelity and active sampling (all optional: None = every row complete, drawn by the design).
    # For a partial row `scores` is its estimated full-fidelity score (fidelity.estimate_full) and
    # `ppl` the stored perplexity over its evaluated windows.
    se: np.ndarray | None = None  # float (n,): standard error of scores (0 for complete rows)
    weights: np.ndarray | None = None  # float (n,): surrogate fit weights (fidelity.fit_weights; 1 = complete)
    complete: np.ndarray | None = None  # bool (n,): evaluated on every calibration window
    round: np.ndarray | None = None  # int (n,): sampling round of each row
    source: np.ndarray | None = None  # str (n,): "design" | "active" (engine.active)
    full_window_nll: np.ndarray | None = None  # float (W,) the full model's summed NLL per window, when stored
    full_window_tokens: np.ndarray | None = None  # int (W,)

    @property
    def n(self) -> int:
        return len(self.scores)

    @property
    def n_layers(self) -> int:
        return int(self.masks.shape[1])

    @property
    def design_rows(self) -> np.ndarray:
        """bool (n,): rows drawn by the sampling design (all of them unless an active round chose some)."""
        return np.ones(self.n, dtype=bool) if self.source is None else np.asarray(self.source) == "design"

    @property
    def testable(self) -> np.ndarray | None:
        """bool (n,) rows whose score is exact (held-out metrics use only these), or None = all."""
        return self.complete

    @classmethod
    def from_perplexities(cls, masks, ppl, ppl_full: float, design: SamplingSpec) -> "Samples":
        """Scores and non-finite flags from perplexities (the same rule as the evaluator's)."""
        ppl = np.asarray(ppl, dtype=float)  # (n,)
        score, nonfinite = scores(ppl, ppl_full)
        return cls(np.asarray(masks, dtype=bool), score, ppl, nonfinite, float(ppl_full), design)

    def with_partial_rows(self, full_nll, full_tokens) -> "Samples":
        """Multi-fidelity: rows whose per-window losses miss some windows get their estimated
        full-fidelity score (`fidelity.estimate_full`), `se`, surrogate fit `weights` and `complete`;
        complete rows keep their score. Unchanged when every row is complete (or no row has windows).
        The one rule for a run store (engine.pipeline.samples) and a replay (bench/adaptive.py)."""
        from engine import fidelity

        if self.window_tokens is None:
            return self
        est = fidelity.estimate_full(self.window_nll, self.window_tokens, full_nll, full_tokens)
        if est.complete.all():
            return self
        return dataclasses.replace(self, scores=np.where(est.complete, self.scores, est.score), se=est.se,
                                   weights=fidelity.fit_weights(est.se), complete=est.complete)

    def subset(self, rows) -> "Samples":
        """The same record restricted to `rows` (indices or a bool[n] selector), in that order: every
        per-row array (those that are None stay None)."""
        per_row = ("masks", "scores", "ppl", "nonfinite", "window_nll", "window_tokens", "se", "weights", "complete",
                   "round", "source")
        return dataclasses.replace(self, **{k: None if getattr(self, k) is None else np.asarray(getattr(self, k))[rows]
                                            for k in per_row})

    def require(self, min_masks: int = MIN_MASKS) -> "Samples":
        if self.n < min_masks:
            raise EstimationError(
                f"the run has {self.n} evaluated masks; at least {min_masks} are needed. "
                "Run `python -m engine sample --masks N` (same model/data/sampling options) first.")
        return self


# ---------------------------------------------------------------- fit


@dataclass(frozen=True)
class Fit:
    fitted: FittedSurrogate
    samples: Samples
    summary: dict  # JSON-able: n_masks, report, and learning_curve / comparison when computed

    @property
    def members(self) -> list:
        return self.fitted.ensemble.value_functions()

    def first_member_fit(self):
        """(its training rows, the ensemble's first member) where that member is the plain fit a curve point
        of spec with ensemble = 1 on those rows would make (adam MLP kinds, batched fits: same seed, rows,
        order and weights; bootstrap kinds' members are resamples), else None: `work_curve` reuses it."""
        spec = self.fitted.report.spec
        if not (surrogate.BATCHED_FITS and spec.preset == "adam" and spec.kind in ("mlp", "mlp+log-pairwise")):
            return None
        return np.asarray(self.fitted.report.split.train), self.members[0]

    def predict(self, masks) -> np.ndarray:
        return self.fitted.ensemble.predict(masks)

    @property
    def headline(self) -> dict:
        """Held-out R², Spearman and MAE in score and perplexity space (the numbers users ask for first)."""
        test = self.fitted.report.test.overall
        return {k: getattr(test, k) for k in ("r2", "spearman", "mae", "mae_ppl", "mape_ppl")}


def fit(samples: Samples, spec: SurrogateSpec = SurrogateSpec(), curve: bool = True,
        compare_kinds: tuple[str, ...] = (), progress: Callable[[int, int, str], None] | None = None) -> Fit:
    """Fit the surrogate ensemble with a stratified held-out split; learning curve and comparison optional.
    `progress(done, total, words)` is told before each step (the ensemble, the curve, each compared kind)."""
    s = samples.require()
    total = 1 + int(curve) + len(compare_kinds)
    say = progress or (lambda done, total, words: None)
    say(0, total, f"fitting {spec.ensemble} {spec.kind} members")
    rows = {"sample_weight": s.weights, "testable": s.testable}  # partial rows: weighted, never held out
    n_train = len(split(s.masks, s.scores, spec.holdout, spec.seed, s.testable).train)
    lc = None
    if curve and n_train >= 16:  # the ensemble and the learning curve: one batched fit (adam MLP kinds)
        sizes = sorted({int(x) for x in np.geomspace(8, n_train, num=6).round()})
        fitted, lc = fit_with_curve(s.masks, s.scores, spec, sizes, ppl_full=s.ppl_full, **rows)
    else:
        fitted = fit_with_diagnostics(s.masks, s.scores, spec, ppl_full=s.ppl_full, **rows)
    summary = {"n_masks": s.n, "report": fitted.report.to_dict()}
    if s.complete is not None:
        summary["n_complete"] = int(np.count_nonzero(s.complete))
    if lc is not None:
        say(1, total, f"fitted the ensemble and a learning curve of {len(lc.sizes)} fits")
        summary["learning_curve"] = lc.to_dict()
    member = fitted.ensemble.members[0]
    first_mlp = (member if isinstance(member, MLPSurrogate) else getattr(member, "mlp", None)) \
        if spec.preset == "adam" and spec.kind in ("mlp", "mlp+log-pairwise") and surrogate.BATCHED_FITS else None
    if compare_kinds:
        rows_out = []
        for i, kind in enumerate(compare_kinds):  # one kind at a time, so the progress says which
            say(1 + int(curve) + i, total, f"comparing surrogate kinds: {kind}")
            part = compare(s.masks, s.scores, (kind,), spec, ppl_full=s.ppl_full, adam_mlp=first_mlp, **rows).to_dict()
            rows_out += part["rows"]
        summary["comparison"] = {**part, "rows": rows_out}
    say(total, total, "fitted")
    return Fit(fitted, s, summary)


def committee(samples: Samples, spec: SurrogateSpec = SurrogateSpec()) -> Callable[[np.ndarray], np.ndarray]:
    """The member predictions an active round plans with (engine.active.plan_round's member_predict):
    an Ensemble of `spec` fitted on every row (weighted by samples.weights), masks bool[N, L] ->
    float[M, N]. Rows are put in mask order first, so the fit (seeded) does not depend on the order
    they were stored in: a resumed run plans the same masks as an uninterrupted one."""
    s = samples.require()
    order = np.lexsort(s.masks.T[::-1])  # rows sorted by mask bits, layer 0 first
    w = None if s.weights is None else s.weights[order]
    ensemble = Ensemble(spec).fit(s.masks[order], s.scores[order], sample_weight=w)
    return ensemble.predict_all


# ---------------------------------------------------------------- contributions


def contributions(samples: Samples, f: Fit, spec: MethodSpec = MethodSpec()) -> shapley.Contributions:
    """Per-layer contributions by `spec.estimator`, looked up once in the registry (engine.estimators);
    the estimator builds its input (budget, Monte Carlo seed, level and window resamples from the spec),
    makes its point estimate and its interval. This function assembles the record: details gain
    `efficiency` (sum of values against f(all) - f(none): Shapley values close the gap, semivalues need
    not), `budget`, `estimand` and, for surrogate-only estimators with `spec.boot`, `interval`.

    Moved: the window resamples (was `method.window_scores`) are `estimators.window_scores`; the
    surrogate-only interval (was `method.contribution_interval`) is `estimators.Estimator.interval`."""
    L = samples.n_layers
    est = estimators.get(spec.estimator)
    fit_one = SingleFit(dataclasses.replace(f.fitted.report.spec, ensemble=1))  # refits; cross-fits batched
    x = est.input(samples, f.members, fit_one, spec)
    result = est.run(x)
    eff = shapley.efficiency_check(result.values, f.predict, L)
    details = {**result.details, "efficiency": eff.to_dict(), "budget": est.budget_for(L, spec.budget),
               "estimand": est.estimand_on(samples.design, L)}
    interval = est.interval(x, result)
    if interval is not None:
        details["interval"] = interval.to_dict()
    return dataclasses.replace(result, details=details)


# ---------------------------------------------------------------- decision


@dataclass(frozen=True)
class Decisions:
    items: tuple  # decision_lib.Decision, one per k
    splits: dict  # split name -> decision_lib.SplitPerplexities (held-out splits)
    contributions: shapley.Contributions

    def for_k(self, k: int):
        for d in self.items:
            if d.k == k:
                return d
        raise WorkbenchError(f"no decision for k={k}; decided for k in {[d.k for d in self.items]}.")

    def to_dict(self) -> dict:
        return {
            "decisions": [d.to_dict() for d in self.items],
            "splits": {name: sp.to_dict() for name, sp in self.splits.items()},
            "estimator": self.contributions.estimator,
        }


def eval_splits_for(data: DataSpec, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Held-out splits to measure: the bundled ones when calibrating on the bundled text, plus `extra`."""
    base = DEMO_EVAL_SPLITS if data.source in DEMO_DATA else ()
    return tuple(dict.fromkeys((*base, *extra)))


def with_ties(ds: Decisions, window_losses: Callable, spec: MethodSpec, on: str, choose: bool) -> Decisions:
    """Compare each k's measured candidates on the windows `window_losses(bool[n, L]) -> (nll float[n, W],
    tokens int[n, W])` evaluates (one call for all k): paired bootstrap intervals over those windows
    (uncertainty.compare_candidates, level spec.level) and the candidates tied with the chosen set.
    choose=True: the chosen set becomes the best one on those windows (validation windows the surrogate
    was not fitted on); otherwise the decision's own choice stays and only its ties are listed."""
    from engine import uncertainty

    items = list(ds.items)
    if not items:
        return ds
    L = len(items[0].kept)
    sets = [[c.removed for c in d.candidates] for d in items]
    flat = [s for ss in sets for s in ss]
    nll, tokens = window_losses(np.stack([decision_lib.removal_mask(s, L) for s in flat]))  # (n, W)
    out, a = [], 0
    for d, ss in zip(items, sets):
        idx = slice(a, a + len(ss))
        a += len(ss)
        cmp = uncertainty.compare_candidates(ss, nll[idx], tokens[idx], spec.level, seed=spec.mc_seed,
                                             chosen=None if choose else ss.index(d.removed))
        if choose and cmp.chosen != d.removed:
            c = d.candidates[ss.index(cmp.chosen)]
            d = dataclasses.replace(d, removed=c.removed, kept=tuple(bool(b) for b in decision_lib.removal_mask(
                c.removed, L)), method="validated: best on validation windows", ppl_predicted=c.ppl_predicted,
                ppl_measured=c.ppl_measured)
        out.append(dataclasses.replace(d, tied=cmp.tied, tie_level=cmp.level, tied_on=on,
                                       validation_ppl=cmp.ppl[ss.index(cmp.chosen)]))
    return dataclasses.replace(ds, items=tuple(out))


def check_ks(ks, L: int) -> list[int]:
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1 or ks[-1] >= L:
        raise WorkbenchError(f"the number of layers to remove must be in 1..{L - 1} for this {L}-layer model; "
                             f"got {ks[-1] if ks else 'nothing'}.")
    return ks


def decide(f: Fit, contribs: shapley.Contributions, ks, measure: ValueFn | None,
           eval_measures: Mapping[str, ValueFn] | None = None, spec: MethodSpec = MethodSpec(), pool=None,
           calibration_cols=(), validation_cols=(), extra: Mapping | None = None, on: str = "",
           progress: Callable[[dict], None] | None = None) -> Decisions:
    """Rank-and-cut (spec.decision == 'rank-and-cut') or verified surrogate search for each k, and the
    chosen sets measured on each held-out split (`eval_measures`).

    With `pool` (a racing.WindowPool over validation + calibration windows, `calibration_cols` /
    `validation_cols` its columns): `decision.race_decide` (racing rule spec.race_first / race_alpha /
    race_finalists, budget spec.decide_budget, candidates `extra` {k: {set: source}} joining
    rank-and-cut and the beam). Without: `decision.decide` with `measure` (calibration perplexities of
    bool[n, L] masks), every candidate measured on every calibration window."""
    from engine import racing

    L = f.samples.n_layers
    ks = check_ks(ks, L)
    n_verify = spec.n_verify if spec.decision == "verified" else 0
    if pool is not None:
        rule = racing.RaceRule(first=spec.race_first, alpha=spec.race_alpha, finalists=spec.race_finalists)
        items = decision_lib.race_decide(f.predict, contribs.values, L, ks, pool, f.samples.ppl_full, calibration_cols,
                                         validation_cols, n_verify=n_verify, swap_rounds=spec.swaps,
                                         n_keep=spec.n_compare, extra=extra, rule=rule, budget=spec.decide_budget,
                                         level=spec.level, seed=spec.mc_seed, on=on, progress=progress)
    else:
        items = decision_lib.decide(f.predict, contribs.values, L, ks, measure, f.samples.ppl_full, n_verify=n_verify,
                                    swap_rounds=spec.swaps, n_keep=spec.n_compare)
    splits = decision_lib.measure_splits(items, L, eval_measures) if eval_measures else {}
    return Decisions(tuple(items), splits, contribs)


# ---------------------------------------------------------------- interactions and near-optimal sets

FIT_ON = ("all", "train")
SAME = "same"  # interaction surrogate: the run's own --surrogate


def interaction_spec(spec: SurrogateSpec, surrogate: str = INTERACTION_SURROGATE) -> SurrogateSpec:
    """The surrogate spec an interaction map is fitted with: `spec` for ``same``, else `spec` with kind
    `surrogate` (default mlp+log-pairwise: it ranked the demo game's pairs best, see bench/README.md)."""
    if surrogate == SAME:
        return spec
    if surrogate not in SURROGATES:
        raise WorkbenchError(f"unknown interaction surrogate {surrogate!r}; choose {SAME} or one of "
                             f"{', '.join(SURROGATES)}.")
    return dataclasses.replace(spec, kind=surrogate)


def interaction_members(samples: Samples, spec: SurrogateSpec, fit_on: str = "all", f: Fit | None = None) -> list:
    """Value functions the interaction map is computed on: an ensemble of `spec` fitted on every mask
    (``all``, the default) or on the fit step's training part (``train``: `f`'s split; its own members
    when `f` was fitted with `spec`)."""
    s = samples.require()
    if fit_on == "all":  # partially evaluated rows weighted as in the fit step (samples.weights)
        return Ensemble(spec).fit(s.masks, s.scores, sample_weight=s.weights).value_functions()
    if fit_on != "train":
        raise WorkbenchError(f"fit_on must be one of {', '.join(FIT_ON)}; got {fit_on!r}.")
    if f is None:
        raise WorkbenchError("fit_on='train' needs the fit step's result (its held-out split).")
    if f.fitted.report.spec == spec:
        return f.members
    t = s.subset(np.asarray(f.fitted.report.split.train))
    return Ensemble(spec).fit(t.masks, t.scores, sample_weight=t.weights).value_functions()


def interaction_interval(samples: Samples, spec: SurrogateSpec, estimate, index: str = "sii",
                         budget: int | None = None, seed: int = 0, folds: int = 5, level: float = 0.9,
                         members=None):
    """`estimate` (from `interactions`, on the ensemble `members` fitted on `samples`) with stderr and a
    `level` interval that include the sampling of the masks.

    When the run's kept counts leave some of the index's weight unsampled (the paper's strata) and three
    or more consecutive kept counts were sampled, the estimand becomes the index on the sampled kept
    counts (`interactions.restricted_weights`, named in details['estimand'] and the record's name),
    estimated by cross-fitted regression adjustment (`interactions.regression_adjusted_index`, `folds`
    fits; unbiased, no extrapolation); the surrogate's full index stays in details['surrogate_index'].
    Otherwise (every weighted count sampled, or no three consecutive ones, L > 22, or a Monte Carlo
    `budget`): `interactions.jackknife_interval` over `folds` groups of the masks, each refitted as one
    member of `spec` (the seed noise of the MLP kinds separated from the jackknife), plus, for members made
    of two parts (mlp+log-pairwise), half the disagreement of the parts' indices as a bias allowance; its
    details['estimand'] says when the index is extrapolated (weight on kept counts never sampled)."""
    from engine import interaction_intervals as inter

    s = samples.require()
    single = dataclasses.replace(spec, ensemble=1)
    L = s.n_layers
    n_samples = None if budget is None else max(2, int(budget) // (1 + L + L * (L - 1) // 2))

    def fit_one(X, y, w=None):
        return make_surrogate(single, seed=spec.seed + 1000).fit(X, y, sample_weight=w)

    rows = estimators.real_rows(s)
    design = s.masks if rows["train_only"] is None else s.masks[~rows["train_only"]]
    known = sorted(set(np.unique(design.sum(axis=1)).tolist()) | {L})
    unsampled = float(estimate.details.get("unsampled_weight_fraction") or 0.0)
    if (unsampled > 0 and n_samples is None and L <= inter.EXACT_MAX_L
            and inter.restricted_weights(index, L, known) is not None):
        r = inter.regression_adjusted_index(s.masks, s.scores, fit_one, index, known, folds, seed, level,
                                            **rows)
        details = {**r.details, "surrogate_index": estimate.matrix, "surrogate_index_stderr": estimate.stderr,
                   "n_members": estimate.details.get("n_members"), "size_weight": estimate.details.get("size_weight")}
        return dataclasses.replace(r, details=details, n_evaluations=r.n_evaluations + estimate.n_evaluations)
    bias = inter.parts_disagreement(members, L, index, n_samples, seed) if members else None
    return inter.jackknife_interval(s.masks, s.scores, fit_one, estimate, index, folds, seed,
                                    seed_noise=not SURROGATES[spec.kind].bootstrap, n_samples=n_samples,
                                    mc_seed=seed, level=level, bias=bias, sample_weight=s.weights)


def interactions(samples: Samples, members, index: str = "sii", budget: int | None = None, seed: int = 0):
    """Pairwise `index` of the surrogate ensemble `members` (engine.interactions): exact for L <= 22
    unless a `budget` (value-function evaluations per member) is given, Monte Carlo otherwise
    (budget // (1 + L + L(L-1)/2) base masks; default interactions.DEFAULT_SAMPLES). The kept counts
    of the samples give details['unsampled_weight_fraction']."""
    from engine import interactions as inter

    L = samples.n_layers
    per_base = 1 + L + L * (L - 1) // 2
    n_samples = None if budget is None else max(2, int(budget) // per_base)
    sizes = np.unique(samples.masks.sum(axis=1))
    return inter.interaction_index(list(members), L, index, n_samples=n_samples, seed=seed, sampled_sizes=sizes)


def measured_sets(samples: Samples, decisions: Mapping | None = None) -> dict[tuple[int, ...], float]:
    """{removed layers: real calibration perplexity} from the completely evaluated masks and, when given, the
    candidates of a stored decisions artifact (its `decisions[*].candidates[*]`)."""
    out = {}
    complete = np.ones(samples.n, dtype=bool) if samples.complete is None else samples.complete
    for m, p in zip(samples.masks[complete], samples.ppl[complete]):  # partial rows: ppl of some windows only
        out[tuple(int(i) for i in np.flatnonzero(~m))] = float(p)
    for d in (decisions or {}).get("decisions", []):
        for c in d.get("candidates", []):
            if c.get("ppl_measured") is not None and math.isfinite(float(c["ppl_measured"])):  # raced sets that
                out[tuple(int(i) for i in c["removed"])] = float(c["ppl_measured"])  # left early: NaN (never measured)
    return out


def near_optimal(samples: Samples, f: Fit, ks, top: int = 10, measured: Mapping | None = None) -> list:
    """`decision.near_optimal_sets` for each k on the fit's ensemble mean, with the members'
    spread as intervals and `measured` ({removed set: ppl}) attached."""
    ks = check_ks(ks, samples.n_layers)
    return [decision_lib.near_optimal_sets(f.predict, samples.n_layers, k, top, f.members, samples.ppl_full, measured)
            for k in ks]


def interaction_bias_check(samples: Samples, spec: SurrogateSpec, index: str = "sii", seed: int = 0,
                           folds: int = 5) -> dict:
    """`interactions.residual_check` on the run's real evaluations with single-member surrogates of
    `spec` (cross-fitted: `folds` extra fits). Unbiased where the design samples every kept count
    (size-uniform, paired); on stratified runs it corrects only the sampled counts."""
    from engine import interaction_intervals as inter
    from engine.sampling import mask_probability

    s = samples.require()
    single = dataclasses.replace(spec, ensemble=1)
    prob = mask_probability(s.design, s.n_layers, s.masks)  # (n,)
    keep = (prob > 0) & s.design_rows  # masks from another design, or chosen by an active round, cannot be reweighted

    def fit_one(X, y):
        return make_surrogate(single).fit(X, y).predict

    return inter.residual_check(s.masks[keep], s.scores[keep], prob[keep], fit_one, index, folds, seed)
