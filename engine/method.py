"""Stage 2 of the method as pipeline steps: surrogate fit, layer contributions, decision, export.

Each step works on an opened run (`pipeline.open_run`) and the samples in its store, returns
frozen records, and saves a JSON summary in the store's artifacts (names below) so the app
and later commands can show it without recomputing:

* ``fit(run, spec)``            -> Fit              artifact "fit"
* ``contributions(run, fit, estimator)`` -> Contributions  artifact "contributions:<estimator>"
* ``decide(run, fit, contribs, ks)``     -> Decisions      artifact "decisions"
* ``export(run, decisions, k, out)``     -> ExportResult   artifact "export"
* ``run(...)``: sample -> fit -> contributions -> decide -> export, resumable because sampling is.

Scores: s(m) = ppl_full / ppl(m) in [0, ~1]; a mask whose perplexity was NaN/inf has score 0
(stored with its flag), so it stays aligned with its mask and counts as "the model broke".

Estimators (ESTIMATORS) all run on the surrogate ensemble (error bars = spread over members),
except "regression-adjusted", which adds a cross-fitted Monte Carlo correction from the real
evaluations (error bars = its Monte Carlo standard error).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import numpy as np

from engine import decision as decision_lib
from engine import shapley
from engine.config import DEMO_DATA, DataSpec, SamplingSpec, SurrogateSpec
from engine.data import make_windows
from engine.errors import EstimationError, WorkbenchError
from engine.evaluate import MaskEvaluator
from engine.prune import ExportResult, prune_model
from engine.sampling import mask_probability, resolve_strata
from engine.surrogate import FittedSurrogate, compare, fit_with_diagnostics, learning_curve, make_surrogate

ESTIMATORS = {
    "paper": "restricted-strata semivalue (the paper's estimator, Monte Carlo on the surrogate)",
    "exact": "exact Shapley values on the surrogate (enumeration of all 2^L masks, L <= 22)",
    "permutation": "Shapley values on the surrogate by antithetic permutation sampling",
    "banzhaf": "exact Banzhaf values on the surrogate (L <= 22)",
    "regression-adjusted": "surrogate's exact value + cross-fitted Monte Carlo correction from real evaluations",
}
# Held-out splits measured next to the calibration split when the run uses the bundled text.
DEMO_EVAL_SPLITS = ("demo-test", "demo-ood")


# ---------------------------------------------------------------- samples


@dataclass(frozen=True)
class Samples:
    """The evaluated masks of a run as arrays (all rows, store order)."""

    masks: np.ndarray  # bool (n, L)
    scores: np.ndarray  # float (n,)
    ppl: np.ndarray  # float (n,), NaN/inf kept
    nonfinite: np.ndarray  # bool (n,)
    ppl_full: float


def load_samples(run, min_masks: int = 8) -> Samples:
    """Every evaluated mask of the run; EstimationError if there are too few to fit anything."""
    table = run.store.table()
    ppl_full = run.store.meta().get("ppl_full")
    n = len(table.rowid)
    if n < min_masks or ppl_full is None:
        raise EstimationError(
            f"the run has {n} evaluated masks; at least {min_masks} are needed. "
            "Run `python -m engine sample --masks N` (same model/data/sampling options) first."
        )
    return Samples(table.masks, table.score, table.ppl, table.nonfinite, float(ppl_full))


# ---------------------------------------------------------------- fit


@dataclass(frozen=True)
class Fit:
    fitted: FittedSurrogate
    samples: Samples
    summary: dict  # JSON-able: held-out metrics, per stratum, learning curve, comparison

    @property
    def members(self) -> list:
        return self.fitted.ensemble.value_functions()

    def predict(self, masks) -> np.ndarray:
        return self.fitted.ensemble.predict(masks)


def fit(run, spec: SurrogateSpec = SurrogateSpec(), curve: bool = True, compare_kinds: tuple[str, ...] = ()) -> Fit:
    """Fit the surrogate ensemble with a stratified held-out split; learning curve and comparison optional."""
    s = load_samples(run)
    fitted = fit_with_diagnostics(s.masks, s.scores, spec, ppl_full=s.ppl_full)
    summary = {"n_masks": int(len(s.scores)), "report": fitted.report.to_dict()}
    n_train = len(fitted.report.split.train)
    if curve and n_train >= 16:
        sizes = sorted({int(x) for x in np.geomspace(8, n_train, num=6).round()})
        lc_spec = dataclasses.replace(spec, ensemble=1)
        summary["learning_curve"] = learning_curve(s.masks, s.scores, sizes, lc_spec, ppl_full=s.ppl_full).to_dict()
    if compare_kinds:
        summary["comparison"] = compare(s.masks, s.scores, compare_kinds, spec, ppl_full=s.ppl_full).to_dict()
    run.store.put_artifact("fit", summary)
    return Fit(fitted, s, summary)


def fit_headline(f: Fit) -> dict:
    """Held-out R², Spearman and MAE in score and perplexity space (the numbers users ask for first)."""
    test = f.fitted.report.test.overall
    return {k: getattr(test, k) for k in ("r2", "spearman", "mae", "mae_ppl", "mape_ppl") if hasattr(test, k)}


# ---------------------------------------------------------------- contributions


def contributions(
    run,
    f: Fit,
    estimator: str = "paper",
    n_masks: int = 80_000,
    n_permutations: int = 2_000,
    seed: int = 0,
) -> shapley.Contributions:
    """Per-layer contributions with error bars; saved as artifact "contributions:<estimator>"."""
    L = run.n_layers
    sampling = run.spec.sampling
    if estimator == "paper":
        strata = resolve_strata(sampling, L) if sampling.scheme == "stratified" else resolve_strata(SamplingSpec(), L)
        result = shapley.with_ensemble(
            lambda g: shapley.restricted_strata_semivalue(g, L, strata, n_masks=n_masks, seed=seed), f.members
        )
    elif estimator == "exact":
        result = shapley.with_ensemble(lambda g: shapley.exact_shapley(g, L), f.members)
    elif estimator == "banzhaf":
        if L > shapley.EXACT_MAX_L:
            raise EstimationError(f"exact Banzhaf needs L <= {shapley.EXACT_MAX_L}; this model has {L} layers.")
        result = shapley.with_ensemble(lambda g: shapley.semivalue(g, L, shapley.BANZHAF), f.members)
    elif estimator == "permutation":
        result = shapley.with_ensemble(
            lambda g: shapley.permutation_shapley(g, L, n_permutations=n_permutations, seed=seed), f.members
        )
    elif estimator == "regression-adjusted":
        result = _regression_adjusted(run, f, seed)
    else:
        raise WorkbenchError(f"unknown estimator {estimator!r}; choose one of: {', '.join(ESTIMATORS)}.")
    # Efficiency holds for Shapley values (not for Banzhaf or the restricted-strata semivalue):
    # shown for all, so the gap itself tells how far a semivalue is from sharing out f(1) - f(0).
    eff = shapley.efficiency_check(result.values, f.predict, L)
    result = dataclasses.replace(result, details={**result.details, "efficiency": eff.to_dict()})
    run.store.put_artifact(f"contributions:{estimator}", {"key": estimator, **result.to_dict()})
    return result


def _regression_adjusted(run, f: Fit, seed: int) -> shapley.Contributions:
    """Target: Shapley on size-uniform runs (fully covered); the paper's restricted-strata
    semivalue on stratified runs, where the correction only sees the sampled strata (the
    uncovered share of the weight is reported in details['uncovered_weight_fraction'])."""
    sampling, L, s = run.spec.sampling, run.n_layers, f.samples
    if sampling.scheme == "size-uniform":
        weighting, sizes = shapley.SHAPLEY, range(L + 1)
    else:
        sizes = resolve_strata(sampling, L)
        weighting = shapley.restricted_strata(sizes)
    probabilities = mask_probability(sampling, L, s.masks)
    keep = probabilities > 0  # masks from an earlier, different design cannot be reweighted
    spec = f.fitted.report.spec

    def fit_fn(X, y):
        return make_surrogate(dataclasses.replace(spec, ensemble=1)).fit(X, y).predict

    return shapley.regression_adjusted(
        s.masks[keep], s.scores[keep], probabilities[keep], fit_fn, weighting=weighting,
        folds=5, seed=seed, sampled_sizes=sizes,
    )


def measure(run, masks) -> np.ndarray:
    """Real calibration perplexities of keep-masks bool[n, L] (the what-if "Measure" button)."""
    return MaskEvaluator(run.lm, run.windows).perplexities(np.atleast_2d(np.asarray(masks, dtype=bool)))


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


def decide(
    run, f: Fit, contribs: shapley.Contributions, ks, n_verify: int = 5, eval_splits: tuple[str, ...] = ()
) -> Decisions:
    """Rank-and-cut and verified surrogate search for each k; measured on calibration and held-out splits."""
    L = run.n_layers
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1 or ks[-1] >= L:
        raise WorkbenchError(f"the number of layers to remove must be in 1..{L - 1}; got {ks}.")
    evaluator = MaskEvaluator(run.lm, run.windows)
    items = decision_lib.decide(
        f.predict, contribs.values, L, ks, evaluator.perplexities, f.samples.ppl_full, n_verify=n_verify
    )
    measures = {}
    for name in eval_splits:
        spec = dataclasses.replace(run.spec.data, source=name)
        windows = make_windows(run.lm.tokenizer, spec)
        measures[name] = MaskEvaluator(run.lm, windows).perplexities
    splits = decision_lib.measure_splits(items, L, measures) if measures else {}
    out = Decisions(tuple(items), splits, contribs)
    run.store.put_artifact("decisions", out.to_dict())
    return out


# ---------------------------------------------------------------- export


def export(run, decisions: Decisions, k: int, out_dir, fit_summary: dict | None = None,
           overwrite: bool = False) -> ExportResult:
    """Delete the chosen layers, save a Hugging Face folder with manifest and card, verify it reloads."""
    d = decisions.for_k(k)
    perplexities = {"calibration": {"before": d.ppl_full, "after": d.ppl_measured}}
    for name, sp in decisions.splits.items():
        j = list(sp.ks).index(k) if k in sp.ks else None
        if j is not None:
            perplexities[name] = {"before": sp.ppl_full, "after": sp.ppl[j]}
    c = decisions.contributions
    extra = {
        "method": d.method,
        "estimator": c.estimator,
        "contributions": [float(x) for x in c.values],
        "contributions_stderr": None if c.stderr is None else [float(x) for x in c.stderr],
        "perplexities": perplexities,
        "ppl_predicted": d.ppl_predicted,
        "surrogate": (fit_summary or {}).get("report", {}).get("test", {}),
        "run_id": run.run_id,
        "data": run.spec.data.source,
        "data_hash": run.windows.data_hash,
        "seeds": {"sampling": run.spec.sampling.seed, "data": run.spec.data.seed},
        "n_masks_evaluated": int(run.store.count()),
    }
    result = prune_model(
        run.lm, d.removed, out_dir, manifest_extra=extra, overwrite=overwrite,
        verify_windows=run.windows.input_ids, expected_ppl=d.ppl_measured,
    )
    run.store.put_artifact("export", {"out": str(result.out_dir), "k": k, "removed": list(d.removed)})
    return result


# ---------------------------------------------------------------- the whole method


@dataclass(frozen=True)
class RunResult:
    run_id: str
    store: str
    n_masks: int
    evaluated: int
    r2: float
    spearman: float
    fit: dict = field(hash=False)
    estimator: str = ""
    contributions: tuple = ()
    contributions_stderr: tuple | None = None
    removed: tuple = ()
    method: str = ""
    ppl_full: float = math.nan
    ppl_predicted: float = math.nan
    ppl_measured: float = math.nan
    heldout: dict = field(default_factory=dict, hash=False)
    by_k: tuple = ()
    out: str | None = None
    verification: dict | None = field(default=None, hash=False)
    efficiency: dict | None = field(default=None, hash=False)
    seconds: float = 0.0
    stage_seconds: dict = field(default_factory=dict, hash=False)  # fit, contributions, decide, export

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def run_method(
    run,
    evaluated: int,
    surrogate: SurrogateSpec,
    estimator: str,
    remove: int,
    out_dir=None,
    overwrite: bool = False,
    eval_splits: tuple[str, ...] = (),
    t0: float | None = None,
) -> RunResult:
    """fit -> contributions -> decide (k = 1..remove) -> export (when out_dir is given).

    `evaluated` is what the caller's sampling step added (reported, not used)."""
    t0 = time.monotonic() if t0 is None else t0
    stages: dict[str, float] = {}

    def timed(name: str, fn):
        t = time.monotonic()
        out = fn()
        stages[name] = round(time.monotonic() - t, 3)
        return out

    f = timed("fit", lambda: fit(run, surrogate))
    c = timed("contributions", lambda: contributions(run, f, estimator, seed=surrogate.seed))
    ds = timed("decide", lambda: decide(run, f, c, range(1, remove + 1),
                                        eval_splits=eval_splits_for(run.spec.data, eval_splits)))
    d = ds.for_k(remove)
    exported = timed("export", lambda: export(run, ds, remove, out_dir, f.summary, overwrite)) if out_dir else None
    head = fit_headline(f)
    heldout = {}
    for name, sp in ds.splits.items():
        j = list(sp.ks).index(remove)
        heldout[name] = {"ppl_full": sp.ppl_full, "ppl_pruned": sp.ppl[j]}
    return RunResult(
        run_id=run.run_id,
        store=str(run.store.path),
        n_masks=int(len(f.samples.scores)),
        evaluated=int(evaluated),
        r2=float(head["r2"]),
        spearman=float(head["spearman"]),
        fit=head,
        estimator=c.estimator,
        contributions=tuple(float(x) for x in c.values),
        contributions_stderr=None if c.stderr is None else tuple(float(x) for x in c.stderr),
        removed=tuple(int(i) for i in d.removed),
        method=d.method,
        ppl_full=float(d.ppl_full),
        ppl_predicted=float(d.ppl_predicted),
        ppl_measured=float(d.ppl_measured),
        heldout=heldout,
        by_k=tuple(
            {"k": x.k, "removed": list(x.removed), "ppl_predicted": x.ppl_predicted, "ppl_measured": x.ppl_measured,
             "method": x.method, "heldout": {name: sp.ppl[list(sp.ks).index(x.k)] for name, sp in ds.splits.items()}}
            for x in ds.items
        ),
        out=None if exported is None else str(exported.out_dir),
        verification=None if exported is None or exported.verification is None
        else dataclasses.asdict(exported.verification),
        efficiency=c.details.get("efficiency"),
        seconds=round(time.monotonic() - t0, 3),
        stage_seconds=stages,
    )
