"""Stage 2 on an opened run: fit, contributions, decide, measure, interactions and near-optimal
candidates (engine.method's pure functions on the run's samples), each stored as a spec-keyed artifact.
Every stage takes an opened run (`open_run`, at the edge: the CLI, the pages, a bench)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from engine import atomic
from engine.config import INTERACTION_FOLDS, INTERACTION_SURROGATE, DataSpec, MethodSpec, stable_hash
from engine.errors import WorkbenchError
from engine.pipeline.run import OpenRun
from engine.pipeline.artifacts import _interaction_key, _put, _seen, artifact_name, candidates_name, interactions_name, stored
from engine.pipeline.progress import StepProgress
from engine.pipeline.collect import samples
from engine.pipeline.results import _contributions_json, _fit_json


_FITS: dict[tuple, object] = {}  # (run_id, n_masks[, windows evaluated], surrogate hash) -> method.Fit; a few


_FITS_MAX = 4


def _fit_key(run: OpenRun, method: MethodSpec, s) -> tuple:
    """The `_FITS` key of `method`'s fit on the run's samples `s`."""
    return (run.run_id, *_seen(s).values(), stable_hash(method.key("fit")))


def _fit(run: OpenRun, method: MethodSpec, curve: bool = False, compare: bool = False,
         progress: "StepProgress | None" = None):
    """The fitted surrogate for `method.surrogate` on the run's current samples (fitting is seeded
    and deterministic, so a refit gives the same ensemble). Writes the fit artifact when it adds
    something (first fit, new masks, a learning curve or comparison not stored yet)."""
    from engine import method as method_lib
    from engine.surrogate import variants

    s = samples(run)
    key = _fit_key(run, method, s)
    f = _FITS.get(key)
    have = f.summary if f is not None else {}
    if f is None or (curve and "learning_curve" not in have) or (compare and "comparison" not in have):
        f = method_lib.fit(s, method.surrogate, curve=curve or "learning_curve" in have,
                           compare_kinds=variants() if compare or "comparison" in have else (),
                           progress=None if progress is None else progress.at)
        _FITS.pop(key, None)
        _FITS[key] = f
        while len(_FITS) > _FITS_MAX:
            _FITS.pop(next(iter(_FITS)))
    old = stored(run, "fit", method)
    if old is None or old["stale"] or set(f.summary) - set(old):
        _put(run, "fit", method, s, _fit_json(run, f))
    return f


def fit(run: OpenRun, method: MethodSpec = MethodSpec(), compare: bool = False, progress: bool = False,
        json_mode: bool = False) -> dict:
    """Fit the surrogate on the run's samples: held-out R², Spearman, MAE, per stratum, learning curve
    (and a comparison of every registered surrogate when `compare`); `progress`: StepProgress lines."""
    t = time.monotonic()
    f = _fit(run, method, curve=True, compare=compare, progress=StepProgress("fit", progress, json_mode))
    out = _fit_json(run, f)
    out.pop("heldout")
    return {**out, "seconds": round(time.monotonic() - t, 3)}


def _contributions(run: OpenRun, method: MethodSpec, progress: "StepProgress | None" = None):
    """(Fit, Contributions) for `method`; the contributions artifact is written."""
    from engine import method as method_lib

    f = _fit(run, method, progress=progress)
    if progress is not None:
        progress.at(0, 1, f"estimating the contributions ({method.estimator})")
    c = method_lib.contributions(f.samples, f, method)
    if progress is not None:
        progress.at(1, 1, f"estimated the contributions ({method.estimator})")
    _put(run, "contributions", method, f.samples, _contributions_json(run, f, c, method.estimator))
    return f, c


def contributions(run: OpenRun, method: MethodSpec = MethodSpec(), progress: bool = False,
                  json_mode: bool = False) -> dict:
    """Per-layer contributions (one per layer, in layer order) with error bars and the ranking."""
    t = time.monotonic()
    f, c = _contributions(run, method, StepProgress("shapley", progress, json_mode))
    art = stored(run, "contributions", method)
    return {**{k: v for k, v in art.items() if k not in ("stage", "stale")}, "seconds": round(time.monotonic() - t, 3)}


def _measure_fn(run: OpenRun, data: DataSpec | None = None):
    """Real perplexities of keep-masks on the run's windows (or on `data`'s windows)."""
    from engine.data import make_windows
    from engine.evaluate import MaskEvaluator

    windows = run.windows if data is None else make_windows(run.lm.tokenizer, data)
    return MaskEvaluator(run.lm, windows).perplexities


MIN_VAL_WINDOWS = 2  # fewer validation windows than this: no bootstrap over them, the calibration windows decide


# Baselines whose sets join the decision's candidates (computed on the calibration windows when the run has none
# stored; one forward, or L one-layer masks for ppl). Any other stored baseline (sleb, taylor) joins as well.
CANDIDATE_BASELINES = ("block-influence", "angular", "ppl")


def _baseline_removed(result: dict, k: int) -> tuple[int, ...] | None:
    """The set a stored baseline result (BaselineResult.to_json) removes for k, or None where it has none
    (SLEB beyond the rounds it ran)."""
    order, details = result.get("order") or [], result.get("details") or {}
    if not 0 < k < len(order):
        return None
    blocks = details.get("blocks")
    if blocks is not None:
        return tuple(range(blocks[k - 1]["start"], blocks[k - 1]["start"] + k)) if k <= len(blocks) else None
    if details.get("k_max") is not None and k > int(details["k_max"]):
        return None
    return tuple(sorted(int(i) for i in order[:k]))


def baseline_candidates(run: OpenRun, ks) -> tuple[dict, int]:
    """({k: {removed set: "baseline:<name>[+baseline:<other>]"}}, set-window evaluations spent): the sets of
    every baseline stored in the run and of CANDIDATE_BASELINES (computed on the calibration windows and
    stored as ``baseline:<name>`` when missing, as `engine baseline` stores them)."""
    from engine.baselines import run_baseline

    spent = 0
    stored_names = [n.split(":", 1)[1] for n in run.store.artifact_names() if n.startswith("baseline:")]
    results = {}
    for name in dict.fromkeys((*CANDIDATE_BASELINES, *stored_names)):
        r = run.store.get_artifact(f"baseline:{name}")
        if r is None:
            r = run_baseline(name, run.lm, run.windows).to_json()
            run.store.put_artifact(f"baseline:{name}", r)
            if name == "ppl":
                spent += run.n_layers * int(run.windows.input_ids.shape[0])
        results[name] = r
    out: dict[int, dict] = {}
    for k in ks:
        for name, r in results.items():
            s = _baseline_removed(r, k)
            if s is not None:
                have = out.setdefault(k, {}).get(s)
                out[k][s] = f"{have}+baseline:{name}" if have else f"baseline:{name}"
    return out, spent


def decision_windows(run: OpenRun, method: MethodSpec):
    """(ids int[W, T], n_val): the race's pool in its order, the `n_val` validation windows of the calibration
    text (method.val_windows, none when fewer than MIN_VAL_WINDOWS are free), then the calibration windows,
    each shuffled (seed method.mc_seed)."""
    import torch

    from engine.data import validation_windows

    val = validation_windows(run.lm.tokenizer, run.spec.data, method.val_windows, at_most=True)
    n_val = int(val.input_ids.shape[0])
    if n_val < MIN_VAL_WINDOWS:
        n_val = 0
    rng = np.random.default_rng([method.mc_seed, 23])
    cal = run.windows.input_ids
    parts = [val.input_ids[rng.permutation(n_val)]] if n_val else []
    return torch.cat(parts + [cal[rng.permutation(cal.shape[0])]]), n_val  # (W, T)


def _decision_pool(run: OpenRun, method: MethodSpec, progress: StepProgress | None):
    """The race's window pool (racing.WindowPool) over `decision_windows`; one MaskEvaluator per window range
    the race asks for. Returns (pool, calibration columns, validation columns, words for `tied_on`)."""
    from engine import racing
    from engine.evaluate import MaskEvaluator

    ids, n_val = decision_windows(run, method)
    evaluators: dict[tuple[int, int], object] = {}

    def measure(masks, start, stop):
        if (start, stop) not in evaluators:
            evaluators[start, stop] = MaskEvaluator(run.lm, ids[start:stop])
        ev = evaluators[start, stop]
        before = ev.layer_calls
        nll = np.full((masks.shape[0], stop - start), np.nan)
        tok = np.zeros((masks.shape[0], stop - start), dtype=np.int64)
        for i, _, v, t, _ in ev.iter_window_losses(masks):
            nll[i], tok[i] = v, t
            if progress is not None:
                progress.tick()
        pool.layer_calls += ev.layer_calls - before
        return nll, tok

    W = int(ids.shape[0])
    n_cal = W - n_val
    on = (f"{W} windows: {n_val} validation windows of the calibration text + the {n_cal} calibration windows"
          if n_val else f"the {n_cal} calibration windows (the surrogate was fitted on them)"
          + (f"; the text has too few windows outside them to validate on" if method.val_windows else ""))
    pool = racing.WindowPool(run.n_layers, W, measure)
    return pool, list(range(n_val, W)), list(range(n_val)), on


def _decide(run: OpenRun, method: MethodSpec, ks, eval_data: tuple[str, ...] = (), fc=None,
            progress: StepProgress | None = None):
    """Decide for each k in `ks` by racing the candidates (rank-and-cut, the surrogate's beam, the baselines'
    sets, the swap neighbours) on paired windows (`_decision_pool`: the validation windows of the calibration
    text, then the calibration windows; engine/racing.py): the chosen set is the best over all of them among
    the sets that finished, its ties are listed, and the chosen sets are measured on the held-out splits.
    Returns (Fit, Contributions, Decisions, {"evaluations", "baseline_evaluations", "budget_hit"})."""
    from engine import decision as decision_lib
    from engine import method as method_lib

    f, c = fc or _contributions(run, method)  # fc: (Fit, Contributions) the caller has just computed
    t0 = time.monotonic()
    ks = method_lib.check_ks(ks, run.n_layers)
    splits = method_lib.eval_splits_for(run.spec.data, tuple(eval_data))
    measures = {name: _measure_fn(run, dataclasses.replace(run.spec.data, source=name)) for name in splits}
    extra, spent = ({}, 0)
    if method.decision == "verified" and not method.no_baseline_candidates:
        extra, spent = baseline_candidates(run, ks)
    pool, cal_cols, val_cols, on = _decision_pool(run, method, progress)

    def report(event):
        if progress is not None:
            progress.begin(event["sets"], f"{event['stage']}, look {event['look']}/{event['looks']}: measuring "
                                          f"{event['sets']} candidate sets on {event['windows']} windows")

    ds = method_lib.decide(f, c, ks, None, None, method, pool=pool, calibration_cols=cal_cols,
                           validation_cols=val_cols, extra=extra, on=on, progress=report)
    if measures:
        ds = dataclasses.replace(ds, splits=decision_lib.measure_splits(ds.items, run.n_layers, measures))
    cost = {"evaluations": int(pool.evaluations), "baseline_evaluations": spent,
            "budget": method.decide_budget, "budget_hit": any(d.budget_hit for d in ds.items),
            "seconds": round(time.monotonic() - t0, 3)}  # baselines, race and held-out splits
    _put(run, "decisions", method, f.samples, {"run_id": run.run_id, "ks": [d.k for d in ds.items],
                                                 "splits_measured": list(splits), "cost": cost, **ds.to_dict()})
    return f, c, ds, cost


def default_remove(method: MethodSpec, n_layers: int) -> int:
    """The number of layers to remove: the spec's, else a quarter of the layers (at least one)."""
    return method.remove if method.remove is not None else max(1, n_layers // 4)


def decide(run: OpenRun, method: MethodSpec = MethodSpec(), eval_data: tuple[str, ...] = (), ks=None) -> dict:
    """Decide which layers to remove for k = remove (and --ks, or 1..remove with --all-k), or for the given
    `ks` only; stored as the decisions artifact."""
    _decide(run, method, method.decide_ks(run.n_layers) if ks is None else sorted(set(ks)), eval_data)
    return stored(run, "decisions", method)


def measure(run: OpenRun, masks) -> list[float]:
    """Real calibration perplexities of keep-masks bool[n, L] (the app's what-if "Measure")."""
    return [float(x) for x in _measure_fn(run)(np.atleast_2d(np.asarray(masks, dtype=bool)))]


def heldout_predictions(run: OpenRun, method: MethodSpec) -> dict | None:
    """The stored fit's held-out masks with true and predicted scores (None when no fit is stored)."""
    art = stored(run, "fit", method)
    if not art or "heldout" not in art:
        return None
    from engine.surrogate import SCORE_FLOOR
    from engine.uncertainty import metric_intervals

    rows = np.array(art["heldout"]["rows"], dtype=int)
    table = run.store.table()
    masks, true, predicted = table.masks[rows], table.score[rows], np.array(art["heldout"]["predicted"])
    out = {"masks": masks, "true": true, "predicted": predicted, "ppl_full": float(run.store.meta()["ppl_full"])}
    if len(rows) >= 3:  # the one held-out R² the pages show, with its interval over the held-out masks
        m = metric_intervals(true, predicted, strata=masks.sum(axis=1), level=method.level)["r2"]
        out["r2_interval"] = {"value": m.value, "low": m.ci_low, "high": m.ci_high, "level": m.level, "n": m.n}
    with np.errstate(divide="ignore", invalid="ignore"):  # perplexity ratio predicted / measured per held-out mask
        factor = np.maximum(true, SCORE_FLOOR) / np.maximum(predicted, SCORE_FLOOR)
    if len(rows):
        worst = int(np.argmax(np.abs(np.log(factor))))
        out["worst"] = {"factor": float(factor[worst]), "removed": np.flatnonzero(~masks[worst]).tolist()}
    return out


def predict_ppl(run: OpenRun, method: MethodSpec, masks) -> list[float]:
    """Surrogate-predicted perplexities of keep-masks bool[n, L] (the what-if editor)."""
    from engine.surrogate import SCORE_FLOOR

    f = _fit(run, method)
    score = f.predict(np.atleast_2d(np.asarray(masks, dtype=bool)))
    return [float(f.samples.ppl_full / max(x, SCORE_FLOOR)) for x in score]


def estimand(estimator: str, design) -> str:
    """What `estimator` estimates on a run sampled with `design` (see engine.estimators)."""
    from engine.estimators import estimand as of

    return of(estimator, design)


def interactions(run: OpenRun, method: MethodSpec = MethodSpec(), index: str = "sii", fit_on: str = "all",
                 csv_path=None, bias_check: bool = False, surrogate: str = INTERACTION_SURROGATE,
                 folds: int = INTERACTION_FOLDS, progress: bool = False, json_mode: bool = False) -> dict:
    """Pairwise interaction index of every layer pair on a surrogate of the run (engine.interactions):
    `matrix`, `stderr`, `pairs` (strongest first), `diagonal` (what the diagonal holds), stored as an
    artifact; `csv_path` also writes the pairs and the diagonal as CSV (i, j, kind, value, stderr), after the
    artifact is stored; the caller checks it first (`atomic.check_output_file`: the CLI, before opening the run).
    `surrogate`: the kind fitted for the map (default mlp+log-pairwise, the most faithful on the demo
    game; ``same`` = the run's `method.surrogate`), with the rest of `method.surrogate`'s settings.
    `folds` > 0: stderr and `details.interval` (level `method.level`) from a `folds`-group jackknife over
    the masks (method.interaction_interval; `folds` extra fits); 0: ensemble spread and Monte Carlo only.
    `bias_check` adds `bias_check` (method.interaction_bias_check: an unbiased, cross-fitted estimate
    from the real evaluations with its stderr, and `outside`: pairs whose value lies outside its
    2-stderr interval), which accounts for the surrogate's bias where the design covers the sizes.
    `progress`: one StepProgress line per step (fits, the index, the jackknife, the bias check)."""
    from engine import method as method_lib

    t = time.monotonic()
    key = _interaction_key(method, index, fit_on, surrogate, folds)
    sspec = method_lib.interaction_spec(method.surrogate, surrogate)
    bar = StepProgress("interactions", progress, json_mode)
    n_steps = 2 + bool(folds) + bool(bias_check)
    bar.at(0, n_steps, f"fitting the {sspec.kind} surrogate ({sspec.ensemble} members)")
    f = _fit(run, method) if fit_on == "train" else None  # the fit step's split; "all" needs no fit step
    s = f.samples if f is not None else samples(run)
    members = method_lib.interaction_members(s, sspec, fit_on, f)
    bar.at(1, n_steps, f"the {index} index of every layer pair")
    r = method_lib.interactions(s, members, index, method.budget, method.mc_seed)
    if folds:
        bar.at(2, n_steps, f"its interval: {folds} jackknife refits")
        part = s if fit_on == "all" else s.subset(f.fitted.report.split.train)
        r = method_lib.interaction_interval(part, sspec, r, index, method.budget, method.mc_seed, folds, method.level,
                                            members)
    result = {"run_id": run.run_id, "n_layers": run.n_layers, "fit_on": fit_on, "surrogate": sspec.kind,
              "folds": folds, **r.to_dict()}
    if bias_check:
        bar.at(n_steps - 1, n_steps, "the bias check on the real evaluations")
        chk = method_lib.interaction_bias_check(s, sspec, index, method.mc_seed)
        iu = np.triu_indices(run.n_layers, 1)
        outside = np.abs(r.matrix - chk["corrected"])[iu] > 2 * chk["stderr"][iu]
        result["bias_check"] = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in chk.items()}
        result["bias_check"]["outside"] = int(outside.sum())
    bar.at(n_steps, n_steps, "interactions done")
    art = {"stage": "interactions", "spec": key, **_seen(s), **result}
    run.store.put_artifact(interactions_name(method, index, fit_on, surrogate, folds), art)
    out = {**result, "n_masks": int(s.n), "seconds": round(time.monotonic() - t, 3)}
    if csv_path is not None:
        out["csv"] = str(write_interactions_csv(out, csv_path))
    return out


def write_interactions_csv(result: dict, path) -> Path:
    """Rows i, j, kind (pair | diagonal), value, stderr: every pair (strongest first), then the diagonal."""
    import csv

    path = Path(path)
    with atomic.open_atomic(path, "w", newline="") as fh:  # temp file beside + rename; errors name the path
        w = csv.writer(fh)
        w.writerow(["i", "j", "kind", "value", "stderr"])
        for p in result["pairs"]:
            w.writerow([p["i"], p["j"], "pair", p["value"], p["stderr"]])
        for i, row in enumerate(result["matrix"]):
            w.writerow([i, i, "diagonal", row[i], result["stderr"][i][i]])
    return path


def candidates(run: OpenRun, method: MethodSpec = MethodSpec(), top: int = 10, progress: bool = False,
               json_mode: bool = False) -> dict:
    """The near-optimal sets explorer for k = 1..remove (default L/4): the `top` best removal sets per k
    by surrogate prediction with ensemble intervals, the measured perplexity of those the run has
    measured (sampled masks and the stored decision's candidates), layer frequencies and
    interchangeable pairs; stored as the ``candidates:<hash>`` artifact."""
    from engine import method as method_lib

    t = time.monotonic()
    f = _fit(run, method)
    # Real calibration perplexities are facts of the run, whatever settings decided them: every stored
    # decision's measured sets count (a decision for another k or rule measured sets this k has too).
    every = [run.store.get_artifact(n) for n in run.store.artifact_names() if n.startswith("decisions:")]
    measured = method_lib.measured_sets(f.samples, {"decisions": [d for a in every if a for d in a.get("decisions", [])]})
    ks = list(range(1, default_remove(method, run.n_layers) + 1))
    bar = StepProgress("candidates", progress, json_mode)
    items = []
    for i, k in enumerate(ks):  # one k at a time, so the progress says which
        bar.at(i, len(ks), f"searching the {top} best removal sets of {k} layers")
        items += method_lib.near_optimal(f.samples, f, [k], top, measured)
    bar.at(len(ks), len(ks), f"searched k = 1..{ks[-1]}")
    result = {"run_id": run.run_id, "n_layers": run.n_layers, "ppl_full": f.samples.ppl_full, "top": int(top),
              "ks": [n.k for n in items], "candidates": [n.to_dict() for n in items]}
    run.store.put_artifact(candidates_name(method, top), {"stage": "candidates", **_seen(f.samples), **result})
    return {**result, "n_masks": int(f.samples.n), "seconds": round(time.monotonic() - t, 3)}


def interaction_indices() -> dict[str, str]:
    """{index name: description} of the interaction indices (for the app's choices)."""
    from engine.interactions import INDICES

    return dict(INDICES)


def measure_pair(run: OpenRun, i: int, j: int) -> dict:
    """Real calibration perplexity of the full model, of removing i, j, and both; the measured
    interaction at the full model s(N) - s(N-i) - s(N-j) + s(N-ij) (scores s = ppl_full / ppl;
    positive = the two layers are worth more together). Appended to the ``pair_measurements``
    artifact (never to the samples: these masks are not part of the sampling design)."""
    L = run.n_layers
    i, j = int(i), int(j)
    if not (0 <= i < L and 0 <= j < L and i != j):
        raise WorkbenchError(f"choose two different layers between 0 and {L - 1}; got {i} and {j}.")
    masks = np.ones((4, L), dtype=bool)  # full, -i, -j, -ij
    masks[1, i] = masks[2, j] = masks[3, [i, j]] = False
    ppl = np.array(measure(run, masks))
    s = np.where(np.isfinite(ppl) & (ppl > 0), ppl[0] / ppl, 0.0)
    out = {"i": min(i, j), "j": max(i, j), "ppl_full": float(ppl[0]), "ppl_without_i": float(ppl[1]),
           "ppl_without_j": float(ppl[2]), "ppl_without_both": float(ppl[3]),
           "interaction_at_full": float(s[0] - s[1] - s[2] + s[3]), "n_masks": int(run.store.count())}
    past = [m for m in (run.store.get_artifact("pair_measurements") or {}).get("items", [])
            if (m["i"], m["j"]) != (out["i"], out["j"])]
    run.store.put_artifact("pair_measurements", {"items": [*past, out]})
    return out


def predicted_pair_at_full(run: OpenRun, method: MethodSpec, i: int, j: int) -> float:
    """The surrogate's f(N) - f(N-i) - f(N-j) + f(N-ij): the same quantity `measure_pair` measures, so
    the two can be compared directly (the map's index averages such terms over many coalitions)."""
    masks = np.ones((4, run.n_layers), dtype=bool)  # full, -i, -j, -ij
    masks[1, i] = masks[2, j] = masks[3, [i, j]] = False
    f = _fit(run, method).predict(masks)  # (4,) scores
    return float(f[0] - f[1] - f[2] + f[3])


def work_curve(run: OpenRun, method: MethodSpec = MethodSpec()) -> dict:
    """The run's quality-vs-work curve for `method.surrogate`: held-out R² and Spearman (intervals at
    `method.level`, n) of a surrogate fitted on the first training rows in store order, against the
    real evaluation work (token-layer calls) spent on them (`uncertainty.work_curve`, same held-out
    rows as the fit). Stored in the fit artifact under ``work_curve`` (when that artifact exists:
    `engine fit` writes it first), with the n_masks / n_windows_evaluated it saw."""
    from engine.uncertainty import work_curve as curve

    s = samples(run)
    work = run.store.table().work[:s.n]  # rows only ever append: the first s.n are the rows of s
    f = _FITS.get(_fit_key(run, method, s))  # the fit `engine fit` just made, when cached (never refitted here):
    same = f is not None and np.array_equal(f.samples.masks, s.masks) and np.array_equal(f.samples.scores, s.scores)
    result = {**curve(s.masks, s.scores, work, method.surrogate, ppl_full=s.ppl_full, sample_weight=s.weights,
                      testable=s.testable, level=method.level, seed=method.surrogate.seed,  # its first member is
                      reuse=f.first_member_fit() if same else None), **_seen(s)}  # the curve's last point
    name = artifact_name("fit", method)
    art = run.store.get_artifact(name)
    if art is not None:
        run.store.put_artifact(name, {**art, "work_curve": result})
    return result
