"""Do the intervals cover the truth? Coverage of engine.uncertainty's intervals on the demo ground truth.

    .venv/bin/python -m bench.uncertainty [--seeds 10] [--masks 256] [--level 0.9] [--boot 20]
        [--designs stratified size-uniform] [--ground-truth bench/data/ground_truth_demo.npz] [--json]

For each sampling design and each of `--seeds` independent sampling seeds, `--masks` masks are
drawn with `engine.sampling.sample_masks` and scored from the ground truth (all 2^16 masks of the
demo model evaluated: `bench/ground_truth.py`), so no model runs. Then, per seed:

* regression-adjusted (`contribution_intervals.regression_adjusted`, the default estimator): the estimand
  the design supports best (`DEFAULT_ESTIMAND`: the paper's restricted-strata semivalue on
  stratified masks, Shapley on size-uniform masks);
* paper: the restricted-strata semivalue of the surrogate ensemble (exact enumeration per member:
  the expectation of the 80,000-mask Monte Carlo estimator), interval from `surrogate_interval`;
* exact: Shapley values of the surrogate ensemble, interval from `surrogate_interval`;
* regression-adjusted for the other estimand too;
* the surrogate's held-out R² and Spearman (`uncertainty.metric_intervals`; a stratified 20%
  held-out split, ensemble fitted on the rest) against the fitted ensemble's exact R² / Spearman
  over the mask distribution the held-out masks come from (kept counts in the sample's
  proportions, uniform within a count; computed over every such mask from the ground truth).

Coverage = share of (layer, seed) pairs whose interval contains the exact value of the estimator's
estimand on the real game.

Decisions (`--part decisions`; needs the demo model): for each k, the `--near` best removal sets on
the calibration windows (from the ground truth) are the candidates; `uncertainty.compare_candidates`
chooses among them by perplexity on `--val-windows` validation windows of the calibration text that
do not overlap the calibration windows (per-window losses computed with the demo model, only for
those masks), and lists the candidates tied with the choice. Reported per k and held-out split
(demo-test, demo-ood; `--heldout-windows` windows each, 8 as in bench.compare): the chosen set's
held-out perplexity over the best held-out perplexity among the candidates, next to the same ratio
for the set that is best on calibration (today's rule) and whether the held-out best is among the ties. The last stdout line (with --json) is one JSON object: `coverage` (the
default estimator on the first design against its estimand), `coverage_by_estimator`,
`coverage_by_design`, `level`, `seeds`, `masks`, `metrics` and more.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import sys
import time
from pathlib import Path

import numpy as np

from bench import ground_truth as gtm
from bench.common import run_script
from engine import shapley
from engine import contribution_intervals as ci
from engine import uncertainty as unc
from engine.config import SamplingSpec, SurrogateSpec
from engine.sampling import default_strata, sample_masks
from engine.surrogate import Ensemble, make_surrogate, split

DEFAULT_ESTIMAND = {"stratified": "sampled-strata", "size-uniform": "shapley"}  # the product's (`default_estimand`)
ESTIMATORS = ("regression-adjusted", "paper", "exact", "regression-adjusted:other")


def default_estimand(scheme: str, L: int) -> str:
    """The estimand the product's default estimator (regression-adjusted) targets on `scheme` at L layers."""
    from engine import estimators

    return ci.estimand_of(estimators.weighting_for("regression-adjusted", SamplingSpec(scheme=scheme), L))


def _weighted_ranks(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Mid-CDF ranks of x under weights w (sum 1): the population version of Spearman's ranks."""
    order = np.argsort(x, kind="stable")
    cw = np.cumsum(w[order])
    r = np.empty(len(x))
    r[order] = cw - w[order] / 2
    return r


def _weighted_corr(a, b, w) -> float:
    ma, mb = np.sum(w * a), np.sum(w * b)
    cov = np.sum(w * (a - ma) * (b - mb))
    return float(cov / math.sqrt(np.sum(w * (a - ma) ** 2) * np.sum(w * (b - mb) ** 2)))


def population_metrics(gt: gtm.GroundTruth, model, sizes: np.ndarray) -> dict:
    """The fitted model's exact R² and Spearman over every mask whose kept count occurs in `sizes`,
    each kept count weighted by its share of `sizes`, uniform within it."""
    L = gt.n_layers
    codes = np.arange(1 << L, dtype=np.int64)
    kept = gtm.popcount(codes)
    share = np.bincount(sizes, minlength=L + 1) / len(sizes)  # (L+1,)
    sel = share[kept] > 0
    masks = gtm.codes_to_masks(codes[sel], L)
    w = share[kept[sel]] / np.array([math.comb(L, int(k)) for k in kept[sel]])
    w = w / w.sum()
    y = gt.value_function()(masks)
    p = model.predict(masks)
    my = np.sum(w * y)
    r2 = 1.0 - np.sum(w * (y - p) ** 2) / np.sum(w * (y - my) ** 2)
    rho = _weighted_corr(_weighted_ranks(y, w), _weighted_ranks(p, w), w)
    return {"r2": float(r2), "spearman": rho}


def one_seed(gt: gtm.GroundTruth, scheme: str, seed: int, n_masks: int, level: float, n_boot: int,
             truth: dict, weightings: dict, surrogate: SurrogateSpec = SurrogateSpec(),
             estimators=ESTIMATORS, metrics: bool = True) -> dict:
    L = gt.n_layers
    f = gt.value_function()
    masks = sample_masks(SamplingSpec(scheme=scheme, n_masks=n_masks, seed=seed), L)  # (n, L)
    y = f(masks)
    counter = itertools.count(1000 * seed)

    def fit(X, t):  # a fresh seed per fit: the refits carry the optimiser's noise too
        return make_surrogate(surrogate, seed=next(counter)).fit(X, t)

    default = default_estimand(scheme, L)
    other = "shapley" if default != "shapley" else "strata"
    need_ra = ({default} | ({other} if "regression-adjusted:other" in estimators else set())
               | ({"strata", "shapley"} if {"paper", "exact"} & set(estimators) else set()))
    ra = {name: ci.regression_adjusted(masks, y, fit, weightings[name], level, seed=seed, n_boot=0)
          for name in weightings if name in need_ra}
    intervals = {"regression-adjusted": ra[default]}
    if "regression-adjusted:other" in estimators:
        intervals["regression-adjusted:other"] = ra[other]
    if {"paper", "exact"} & set(estimators):
        X, t = ci._with_full_mask(masks, y, 1.0)
        ens = Ensemble(dataclasses.replace(surrogate, seed=seed)).fit(X, t)  # the pipeline's ensemble, all masks
        members = {name: np.stack([ci.semivalue_by_size(g, L, weightings[name]).sum(axis=0)
                                   for g in ens.value_functions()]) for name in ("strata", "shapley")}  # (k, L)
        boots = ci.bootstrap_semivalues(masks, y, fit, {k: weightings[k] for k in ("strata", "shapley")}, n_boot, seed)
        for est, name in (("paper", "strata"), ("exact", "shapley")):
            intervals[est] = ci.surrogate_interval(masks, y, fit, weightings[name], members[name].mean(axis=0),
                                                    members[name], est, level, reference=ra[name], boots=boots[name])
    row = {"seed": seed, "scheme": scheme}
    for est in [e for e in ESTIMATORS if e in intervals]:
        iv = intervals[est]
        z = ci._z(level)
        row[est] = {
            "estimand": iv.estimand,
            "covered": iv.covers(truth[iv.estimand]).tolist(),
            "covered_noise_only": ((np.abs(iv.values - truth[iv.estimand]) <= z * iv.se)).tolist(),
            "half_width": ((iv.ci_high - iv.ci_low) / 2).tolist(),
            "error": (iv.values - truth[iv.estimand]).tolist(),
            "uncovered_weight_fraction": iv.details.get("uncovered_weight_fraction"),
        }
    if not metrics:
        return row
    # held-out metrics: the pipeline's split and ensemble
    sp = split(masks, y, 0.2, seed)
    model = Ensemble(dataclasses.replace(surrogate, seed=seed)).fit(masks[sp.train], y[sp.train])
    held = unc.metric_intervals(y[sp.test], model.predict(masks[sp.test]), masks[sp.test].sum(axis=1), level,
                                seed=seed)
    pop = population_metrics(gt, model, masks.sum(axis=1))
    row["metrics"] = {name: {**m.to_dict(), "truth": pop[name], "covered": bool(m.ci_low <= pop[name] <= m.ci_high)}
                      for name, m in held.items()}
    return row


def summarise(rows: list[dict], est: str) -> dict:
    cov = np.array([r[est]["covered"] for r in rows], dtype=bool)  # (seeds, L)
    noise = np.array([r[est]["covered_noise_only"] for r in rows], dtype=bool)
    hw = np.array([r[est]["half_width"] for r in rows])
    err = np.array([r[est]["error"] for r in rows])
    return {
        "estimand": rows[0][est]["estimand"],
        "coverage": float(cov.mean()),
        "pairs": int(cov.size),
        "coverage_noise_only": float(noise.mean()),
        "coverage_by_layer": cov.mean(axis=0).tolist(),
        "mean_half_width": float(hw.mean()),
        "rmse": float(np.sqrt(np.mean(err**2))),
        "mean_error": err.mean(axis=0).tolist(),  # per layer, over seeds: the estimator's bias on this game
        "uncovered_weight_fraction": rows[0][est]["uncovered_weight_fraction"],
    }


# ---------------------------------------------------------------- decisions on unseen text


def decisions(gt: gtm.GroundTruth, ks, near: int, val_windows: int, heldout_windows: int, level: float,
              splits=("demo-test", "demo-ood")) -> dict:
    import dataclasses

    from engine import decision as decision_lib
    from engine.config import DataSpec, ModelSpec
    from engine.data import make_windows, validation_windows
    from engine.evaluate import MaskEvaluator
    from engine.models import load_model

    t0 = time.monotonic()
    lm = load_model(ModelSpec(name=gt.meta["model"]))
    cal = DataSpec(source=gt.meta["data"], n_windows=gt.meta["n_windows"], seq_len=gt.meta["seq_len"],
                   seed=gt.meta.get("data_seed", 0))
    if make_windows(lm.tokenizer, cal).data_hash != gt.meta["data_hash"]:
        raise SystemExit("the ground truth was computed on other calibration windows")
    L = gt.n_layers
    cands = {k: [r for r, _ in gt.optimum(k, top=near)] for k in ks}  # best calibration sets, best first
    distinct = sorted({r for k in ks for r in cands[k]})
    masks = np.stack([decision_lib.removal_mask(r, L) for r in distinct])  # (c, L)
    val = validation_windows(lm.tokenizer, cal, val_windows)
    t = time.monotonic()
    ev = MaskEvaluator(lm, val)
    val_nll, val_tok = ev.window_losses(masks)  # (c, W)
    seconds = {"validation_losses": round(time.monotonic() - t, 1)}
    held = {}
    for name in splits:
        t = time.monotonic()
        e = MaskEvaluator(lm, make_windows(lm.tokenizer, dataclasses.replace(cal, source=name,
                                                                           n_windows=heldout_windows)))
        held[name] = dict(zip(distinct, e.perplexities(masks)))
        seconds[name] = round(time.monotonic() - t, 1)
    index = {r: i for i, r in enumerate(distinct)}
    rows = []
    for k in ks:
        rs = cands[k]
        idx = [index[r] for r in rs]
        cmp = unc.compare_candidates(rs, val_nll[idx], val_tok[idx], level=level)
        for name in splits:
            hp = {r: float(held[name][r]) for r in rs}
            best = min(rs, key=lambda r: hp[r])
            rows.append({
                "k": k, "split": name, "chosen": list(cmp.chosen), "ratio": hp[cmp.chosen] / hp[best],
                "calibration_best": list(rs[0]), "calibration_best_ratio": hp[rs[0]] / hp[best],
                "heldout_best": list(best), "heldout_best_tied": best == cmp.chosen or best in cmp.tied,
                "tied": [list(r) for r in cmp.tied], "n_candidates": len(rs),
                "heldout_range": [min(hp.values()), max(hp.values())],
            })
    seconds["total"] = round(time.monotonic() - t0, 1)
    return {"rows": rows, "validation_windows": val_windows, "heldout_windows": heldout_windows,
            "masks_evaluated": len(distinct), "near": near, "seconds": seconds,
            "rule": "lowest perplexity on validation windows of the calibration text (not the calibration windows)"}


def run(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    t0 = time.monotonic()
    paths = a.games or ([a.ground_truth] if a.ground_truth else gtm.bundled_games())
    result = {"level": a.level, "command": "python -m bench.uncertainty " + " ".join(a.argv)}
    if a.part in ("all", "decisions"):
        gt = gtm.load(paths[0])
        ks = a.ks or [max(1, round(gt.n_layers * f)) for f in (1 / 8, 1 / 4, 3 / 8, 1 / 2)]
        result["decisions"] = decisions(gt, ks, a.near, a.val_windows, a.heldout_windows, a.level, a.eval_data)
    if a.part in ("all", "coverage"):
        per_game = []
        for path in paths:
            r = coverage(a, gtm.load(path))
            r["name"], r["ground_truth"] = gtm.game_name(path), str(path)
            per_game.append(r)
        result.update(per_game[0])  # the first game's figures at the top level, as before
        del result["name"], result["ground_truth"]
        result["games"] = [game_row(r) for r in per_game]
        result["min_coverage"] = min(g["coverage"] for g in result["games"])
    result["seconds"] = round(time.monotonic() - t0, 1)
    return result


def game_row(r: dict) -> dict:
    """One game's line of `games`: the default estimator's coverage and its spread of errors."""
    d = r["details"][r["default"]["design"]]["estimators"]["regression-adjusted"]
    return {"name": r["name"], "ground_truth": r["ground_truth"], "n_layers": r["n_layers"],
            "coverage": r["coverage"], "estimand": d["estimand"], "pairs": d["pairs"],
            "coverage_noise_only": d["coverage_noise_only"], "coverage_by_layer": d["coverage_by_layer"],
            "mean_half_width": d["mean_half_width"], "rmse": d["rmse"], "mean_error": d["mean_error"],
            "uncovered_weight_fraction": d["uncovered_weight_fraction"],
            "coverage_by_estimator": r["coverage_by_estimator"], "seeds": r["seeds"], "masks": r["masks"]}


def truths(gt: gtm.GroundTruth, weightings: dict) -> dict:
    """{estimand: float[L]}: the exact value of each weighting's semivalue on the real game (every mask)."""
    f = gt.value_function()
    return {name: ci.semivalue_by_size(f, gt.n_layers, w).sum(axis=0) for name, w in weightings.items()}


def coverage(a, gt) -> dict:
    t0 = time.monotonic()
    if not gt.complete:
        raise SystemExit("the coverage study needs a complete ground truth (every mask); rebuild without --k-max")
    L = gt.n_layers
    strata = tuple(gt.analysis.get("strata") or default_strata(L))
    weightings = {"strata": shapley.restricted_strata(strata), "shapley": shapley.SHAPLEY}
    if shapley.has_adjacent_strata(strata, L):
        weightings["sampled-strata"] = shapley.sampled_strata(strata)
    truth = truths(gt, weightings)
    by_design, rows_all = {}, {}
    for scheme in a.designs:
        rows = []
        for seed in range(a.seeds):
            t = time.monotonic()
            rows.append(one_seed(gt, scheme, seed, a.masks, a.level, a.boot, truth, weightings,
                                 SurrogateSpec(kind=a.surrogate), a.estimators, not a.no_metrics))
            if not a.json:
                print(f"{gt.meta.get('model')} {scheme} seed {seed}: {time.monotonic() - t:.1f} s", file=sys.stderr,
                      flush=True)
        rows_all[scheme] = rows
        metrics = {}
        for name in (("r2", "spearman") if not a.no_metrics else ()):
            ms = [r["metrics"][name] for r in rows]
            metrics[name] = {"coverage": float(np.mean([m["covered"] for m in ms])), "n": len(ms),
                             "mean_value": float(np.mean([m["value"] for m in ms])),
                             "mean_interval": [float(np.mean([m["ci_low"] for m in ms])),
                                               float(np.mean([m["ci_high"] for m in ms]))],
                             "mean_truth": float(np.mean([m["truth"] for m in ms]))}
        by_design[scheme] = {"estimators": {est: summarise(rows, est) for est in ESTIMATORS if est in rows[0]},
                             "metrics": metrics, "default_estimand": default_estimand(scheme, L)}
    first = by_design[a.designs[0]]
    result = {
        "coverage": first["estimators"]["regression-adjusted"]["coverage"],
        "default": {"design": a.designs[0], "estimator": "regression-adjusted",
                    "estimand": first["estimators"]["regression-adjusted"]["estimand"]},
        "coverage_by_estimator": {est: s["coverage"] for est, s in first["estimators"].items()},
        "coverage_by_design": {d: {est: {"estimand": s["estimand"], "coverage": s["coverage"],
                                         "coverage_noise_only": s["coverage_noise_only"]}
                                   for est, s in v["estimators"].items()} for d, v in by_design.items()},
        "metrics": {d: v["metrics"] for d, v in by_design.items()},
        "level": a.level, "seeds": a.seeds, "masks": a.masks, "boot": a.boot, "target": 0.85, "n_layers": L,
        "details": by_design,
        "coverage_seconds": round(time.monotonic() - t0, 1),
    }
    return result


def lines(r: dict) -> list[str]:
    out = []
    if "decisions" in r:
        d = r["decisions"]
        out.append(f"Decisions: choose among the {d['near']} best calibration sets by perplexity on "
                   f"{d['validation_windows']} validation windows of the calibration text; held-out perplexity "
                   f"over the best candidate's on {d['heldout_windows']} held-out windows "
                   f"(losses of {d['masks_evaluated']} masks: {d['seconds']} s):")
        for row in d["rows"]:
            out.append(f"  k={row['k']} {row['split']:9s}: chosen {row['chosen']} ratio {row['ratio']:.4f} "
                       f"(best-on-calibration {row['calibration_best_ratio']:.4f}); {len(row['tied'])} tied; "
                       f"held-out best {row['heldout_best']} {'among' if row['heldout_best_tied'] else 'NOT among'} "
                       f"chosen + tied")
    if "coverage" not in r:
        return out
    out += [f"Coverage of {r['level']:.0%} intervals, {r['seeds']} seeds x {r['masks']} masks "
           f"(exact values of the demo game; target >= {r['target']:.0%} of (layer, seed) pairs):"]
    for design, ests in r["coverage_by_design"].items():
        for est, s in ests.items():
            d = r["details"][design]["estimators"][est]
            out.append(f"  {design:12s} {est:26s} vs {s['estimand']:8s}: {s['coverage']:.3f} "
                       f"(noise-only half-width: {s['coverage_noise_only']:.3f}; mean half-width "
                       f"{d['mean_half_width']:.4f}, RMSE {d['rmse']:.4f}, uncovered weight "
                       f"{d['uncovered_weight_fraction']:.2f})")
        for name, m in r["metrics"][design].items():
            out.append(f"  {design:12s} held-out {name:8s}: interval covers the fitted surrogate's exact value in "
                       f"{m['coverage']:.2f} of {m['n']} seeds (mean {m['mean_value']:.4f}, mean interval "
                       f"[{m['mean_interval'][0]:.4f}, {m['mean_interval'][1]:.4f}], truth {m['mean_truth']:.4f})")
    out.append(f"default ({r['default']['design']}, {r['default']['estimator']} vs {r['default']['estimand']}): "
               f"coverage {r['coverage']:.3f}; {r['coverage_seconds']} s")
    for g in r.get("games", []):
        out.append(f"  game {g['name']:12s} (L={g['n_layers']}): coverage {g['coverage']:.3f} of {g['pairs']} "
                   f"(layer, seed) pairs; noise-only {g['coverage_noise_only']:.3f}; mean half-width "
                   f"{g['mean_half_width']:.4f}; RMSE {g['rmse']:.4f}")
    if "min_coverage" in r:
        out.append(f"minimum over {len(r['games'])} games: {r['min_coverage']:.3f} (target >= {r['target']:.2f})")
    return out


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.uncertainty", description=__doc__.split("\n\n")[0])
    p.add_argument("--ground-truth", default=None, help="one game (default: every game in bench/data, --games)")
    p.add_argument("--games", nargs="+", default=None,
                   help="ground-truth files to measure coverage on (default: bench/data/ground_truth_*.npz, demo first)")
    p.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=list(ESTIMATORS),
                   help="which intervals to check (regression-adjusted, the default, always)")
    p.add_argument("--no-metrics", action="store_true", help="skip the held-out R²/Spearman check (faster)")
    p.add_argument("--seeds", type=int, default=10, help="independent sampling seeds 0..N-1")
    p.add_argument("--masks", type=int, default=256)
    p.add_argument("--level", type=float, default=ci.LEVEL)
    p.add_argument("--boot", type=int, default=20, help="bootstrap refits of the surrogate per seed")
    p.add_argument("--designs", nargs="+", default=["stratified", "size-uniform"],
                   choices=["stratified", "size-uniform"], help="the first one is the default in `coverage`")
    p.add_argument("--part", choices=["all", "coverage", "decisions"], default="all")
    p.add_argument("--ks", type=int, nargs="*", default=None, help="layers removed (decisions); default L/8..L/2")
    p.add_argument("--near", type=int, default=10, help="candidates: the best calibration sets per k")
    p.add_argument("--val-windows", type=int, default=64, help="validation windows of the calibration text")
    p.add_argument("--heldout-windows", type=int, default=8, help="windows per held-out split (8 = bench.compare)")
    p.add_argument("--eval-data", nargs="+", default=["demo-test", "demo-ood"], help="held-out splits (decisions)")
    p.add_argument("--surrogate", default="mlp", help="surrogate kind (default: the pipeline's MLP)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    return a


def main(argv=None) -> dict:
    from bench.common import emit

    a = parse(argv)
    r = run(a)
    return emit(lines(r), r, a.json)


if __name__ == "__main__":
    run_script(main)
