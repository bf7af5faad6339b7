"""Fidelity of surrogate interaction maps against the exact interactions of the real demo game.

    .venv/bin/python -m bench.interactions [--ground-truth bench/data/ground_truth_demo.npz]
        [--masks 128 256 1024] [--surrogates mlp ridge-pairwise gbt log-pairwise mlp+log-pairwise]
        [--schemes stratified size-uniform paired mixed] [--seeds 0 1 2] [--ensemble 5] [--index sii]
        [--fit-on all|train] [--folds 5] [--level 0.9] [--bias-check]
        [--cost-layers 22 32 40 80] [--cost-samples 2000] [--threads 1] [--json]

The truth: the exact index (default SII) of the real game, from all 2^16 masks of the demo model in
the ground truth (`python -m bench.ground_truth`), computed with `engine.interactions`.
For each (masks, surrogate, scheme, seed): the masks that `engine.sampling.sample_masks` draws for
that scheme (stratified = the paper's strata; size-uniform; paired = size-uniform with complements;
mixed = half stratified, half paired, duplicates dropped), their real scores looked up in the table
(no model call), a surrogate ensemble of `--ensemble` members fitted either on every mask
(`--fit-on all`, the default, what `pipeline.interactions` uses) or the way the pipeline's fit step does
(`--fit-on train`: `surrogate.fit_with_diagnostics`, 20% held out for diagnostics), and the exact index
of the ensemble. Reported per row, as the mean over seeds:
Spearman over all pairs, Spearman over the 15 strongest true pairs (by |value|), Pearson over all
pairs, the share of the index's weight on kept counts the scheme never samples, `coverage`: the share
of pairs whose exact value lies inside the `--level` interval that `engine interactions` reports
(`engine.interaction_intervals.jackknife_interval` over `--folds` groups of the masks, through
`method.interaction_interval`; `coverage_top15` over the 15 strongest true pairs; 0 folds: not
computed), the share within 2 stderr of the ensemble spread alone (`coverage_ensemble`; with
--bias-check also the cross-fitted residual check's interval, `engine.interaction_intervals.residual_check`),
and fit seconds.

Cost: interactions of a 5-member ensemble of the paper's MLP at each of `--cost-layers` (exact up to
22 layers, Monte Carlo with `--cost-samples` base masks above) (random weights; the time does not depend on them), with the median
standard error of the pair values relative to their median magnitude.

With --json the last stdout line is one JSON object: `rows` (masks, surrogate, scheme,
spearman_all, spearman_top15, pearson, their std over seeds, unsampled_weight_fraction,
mean_stderr, coverage, coverage_top15, median_halfwidth, coverage_ensemble, coverage_bias_check, fit_seconds,
fit_on, folds, level), `truth_top` (the strongest true pairs), `cost`.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
from scipy.stats import pearsonr, spearmanr

from bench import ground_truth as gtm
from bench.common import emit, run_script
from engine.config import INTERACTION_SURROGATE, MethodSpec, SamplingSpec, SurrogateSpec
from engine.interaction_intervals import residual_check, restricted_index, restricted_weights
from engine.interactions import interaction_index
from engine.method import Samples, interaction_interval
from engine.sampling import mask_probability, sample_masks, size_distribution
from engine.surrogate import Ensemble, fit_with_diagnostics, make_surrogate

SCHEMES = {
    "stratified": SamplingSpec(),
    "size-uniform": SamplingSpec(scheme="size-uniform"),
    "paired": SamplingSpec(scheme="size-uniform", paired=True),
}
TOP = 15
TOP_GAMES = 10  # the strongest pairs the per-game coverage is also reported on


def design_probability(scheme: str, masks: np.ndarray, L: int) -> np.ndarray:
    """float[n]: chance that one draw of the scheme is each mask (mixed: the 50/50 mixture)."""
    if scheme == "mixed":
        return 0.5 * design_probability("stratified", masks, L) + 0.5 * design_probability("paired", masks, L)
    return mask_probability(SCHEMES[scheme], L, masks)


def design_masks(scheme: str, n: int, seed: int, L: int) -> tuple[np.ndarray, np.ndarray]:
    """(masks bool[<=n, L], kept counts the design can produce) for a scheme name of SCHEMES or 'mixed'."""
    if scheme == "mixed":
        parts = [design_masks("stratified", n // 2, seed, L), design_masks("paired", n - n // 2, seed, L)]
        both = np.concatenate([parts[0][0], parts[1][0]])  # (n, L)
        _, first = np.unique(both, axis=0, return_index=True)
        return both[np.sort(first)], np.union1d(parts[0][1], parts[1][1])
    sampling = replace(SCHEMES[scheme], n_masks=n, seed=seed)
    return sample_masks(sampling, L), np.flatnonzero(size_distribution(sampling, L) > 0)


def truth_matrix(gt: gtm.GroundTruth, index: str) -> np.ndarray:
    """Exact index of the real game (every mask in the table), float[L, L]."""
    return interaction_index(gt.value_function(), gt.n_layers, index).matrix


def agreement(est: np.ndarray, truth: np.ndarray, top: int = TOP) -> dict:
    """Spearman over all pairs, over the `top` strongest true pairs, Pearson over all pairs."""
    iu = np.triu_indices(truth.shape[0], 1)
    e, t = est[iu], truth[iu]
    strongest = np.argsort(-np.abs(t), kind="stable")[:top]
    return {
        "spearman_all": float(spearmanr(e, t).statistic),
        "spearman_top15": float(spearmanr(e[strongest], t[strongest]).statistic),
        "pearson": float(pearsonr(e, t).statistic),
    }


def interval_coverage(r, truth: np.ndarray, top: int = TOP) -> dict:
    """Share of all pairs / of the `top` (and TOP_GAMES) strongest true pairs inside r.details['interval'],
    median half-width."""
    iu = np.triu_indices(truth.shape[0], 1)
    iv = r.details["interval"]
    t = truth[iu]
    inside = (np.asarray(iv["low"])[iu] <= t) & (t <= np.asarray(iv["high"])[iu])  # (P,)
    strongest = np.argsort(-np.abs(t), kind="stable")
    return {"coverage": float(inside.mean()), "coverage_top15": float(inside[strongest[:top]].mean()),
            "coverage_top10": float(inside[strongest[:TOP_GAMES]].mean()),
            "median_halfwidth": float(np.median((np.asarray(iv["high"]) - np.asarray(iv["low"]))[iu] / 2))}


def estimand_truth(gt, r, index: str, full: np.ndarray) -> np.ndarray:
    """The exact value of what `r` estimates on the real game: the index on the sampled kept counts when
    r.details says it is restricted (method.interaction_interval), else the full index `full`."""
    if not r.details.get("restricted"):
        return full
    return restricted_index(gt.value_function(), restricted_weights(index, gt.n_layers, r.details["known_kept_counts"]))


def one_row(gt, truth, n, kind, scheme, seed, ensemble, index, fit_on: str = "all", bias_check: bool = False,
            folds: int = 5, level: float = 0.9) -> dict:
    L = gt.n_layers
    masks, sizes = design_masks(scheme, n, seed, L)  # (n, L)
    y = gt.value_function()(masks)  # real scores from the table
    spec = SurrogateSpec(kind=kind, ensemble=ensemble, seed=seed)
    t0 = time.perf_counter()
    if fit_on == "train":
        fitted = fit_with_diagnostics(masks, y, spec, gt.ppl_full)
        ens, part = fitted.ensemble, np.asarray(fitted.report.split.train)
    else:
        ens, part = Ensemble(spec).fit(masks, y), np.arange(len(y))
    fit_s = time.perf_counter() - t0
    r = interaction_index(ens.value_functions(), L, index, sampled_sizes=sizes)
    iu = np.triu_indices(L, 1)
    out = {**agreement(r.matrix, truth), "fit_seconds": fit_s,
           "unsampled_weight_fraction": r.details["unsampled_weight_fraction"],
           "mean_stderr": float(np.mean(r.stderr[iu])),
           "coverage_ensemble": float(np.mean(np.abs(r.matrix - truth)[iu] <= 2 * r.stderr[iu]))}
    if folds:
        samples = Samples(masks[part], y[part], gt.ppl_full / np.maximum(y[part], 1e-12), y[part] == 0, gt.ppl_full,
                          SCHEMES.get(scheme, SamplingSpec()))
        ri = interaction_interval(samples, spec, r, index, None, seed, folds, level, ens.value_functions())
        target = estimand_truth(gt, ri, index, truth)
        out.update(interval_coverage(ri, target))
        out["restricted"] = float(bool(ri.details.get("restricted")))
        if ri.details.get("restricted"):  # how the reported (restricted, regression-adjusted) map ranks its truth
            out.update({f"{k}_reported": v for k, v in agreement(ri.matrix, target).items()})
    if bias_check:
        single = replace(spec, ensemble=1)
        chk = residual_check(masks, y, design_probability(scheme, masks, L),
                             lambda X, v: make_surrogate(single).fit(X, v).predict, index, 5, seed)
        out["coverage_bias_check"] = float(np.mean(np.abs(chk["corrected"] - truth)[iu] <= 2 * chk["stderr"][iu]))
        out["median_bias_check_stderr"] = float(np.median(chk["stderr"][iu]))
    return out


def game_summary(path, seeds, index: str = "sii", level: float = 0.9, folds: int = 5, ensemble: int = 5,
                 n_masks: int | None = None, surrogate: str = INTERACTION_SURROGATE, scheme: str = "stratified") -> dict:
    """Coverage of what `engine interactions` reports with its defaults (the run's default design and
    mask count, the map's surrogate, a `folds`-fold interval) on one game, over `seeds`: the share of
    all pairs and of the TOP_GAMES strongest true pairs (of the reported estimand) inside the interval."""
    gt = gtm.load(path)
    truth = truth_matrix(gt, index)
    n = n_masks or SamplingSpec().n_masks
    per = [one_row(gt, truth, n, surrogate, scheme, s, ensemble, index, "all", False, folds, level) for s in seeds]
    mean = lambda k: float(np.mean([p[k] for p in per]))
    out = {"name": gtm.game_name(path), "ground_truth": str(path), "n_layers": gt.n_layers, "masks": n,
           "surrogate": surrogate, "scheme": scheme, "seeds": list(seeds), "index": index, "level": level,
           "coverage": mean("coverage"), "coverage_top10": mean("coverage_top10"),
           "coverage_top15": mean("coverage_top15"), "median_halfwidth": mean("median_halfwidth"),
           "coverage_by_seed": [p["coverage"] for p in per], "coverage_top10_by_seed": [p["coverage_top10"] for p in per],
           "restricted": bool(per[0]["restricted"]), "unsampled_weight_fraction": mean("unsampled_weight_fraction"),
           "spearman_all_surrogate_sii": mean("spearman_all"), "spearman_top15_surrogate_sii": mean("spearman_top15")}
    if out["restricted"]:
        out.update({"spearman_all": mean("spearman_all_reported"), "spearman_top15": mean("spearman_top15_reported")})
    else:
        out.update({"spearman_all": out["spearman_all_surrogate_sii"], "spearman_top15": out["spearman_top15_surrogate_sii"]})
    return out


def cost(layers, n_samples: int, ensemble: int = 5, index: str = "sii") -> list[dict]:
    from bench.shapley_step import random_surrogate

    out = []
    for L in layers:
        members = [random_surrogate(L, seed=s) for s in range(ensemble)]
        t0 = time.perf_counter()
        r = interaction_index(members, L, index, n_samples=None if L <= 22 else n_samples, seed=0)  # exact up to 22
        secs = time.perf_counter() - t0
        iu = np.triu_indices(L, 1)
        out.append({"L": L, "n_samples": None if L <= 22 else n_samples, "members": ensemble, "seconds": secs,
                    "method": r.method,
                    "evaluations": r.n_evaluations,
                    "median_mc_stderr": float(np.median(r.details["monte_carlo_stderr"][iu])),
                    "median_abs_value": float(np.median(np.abs(r.matrix[iu])))})
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.interactions", description=__doc__.split("\n")[0])
    ap.add_argument("--ground-truth", default=None, help="the game of the grid (default: the demo's)")
    ap.add_argument("--games", nargs="*", default=None,
                    help="games for the per-game coverage of the defaults (default: every bench/data/ground_truth_*.npz)")
    ap.add_argument("--game-seeds", type=int, default=10, help="seeds 0..N-1 per game (0: no per-game part)")
    ap.add_argument("--game-masks", type=int, default=None, help="masks per seed in the per-game part (default: the run's)")
    ap.add_argument("--masks", type=int, nargs="*", default=[128, 256, 1024])
    ap.add_argument("--surrogates", nargs="+", default=["mlp", "ridge-pairwise", "gbt", "log-pairwise", "mlp+log-pairwise"])
    ap.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=[*SCHEMES, "mixed"])
    ap.add_argument("--fit-on", default="all", choices=["all", "train"])
    ap.add_argument("--folds", type=int, default=5, help="jackknife groups of the reported interval (0: no interval)")
    ap.add_argument("--level", type=float, default=MethodSpec().level)
    ap.add_argument("--bias-check", action="store_true",
                    help="also the coverage of the exact values by the cross-fitted residual check's 2-stderr intervals")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ensemble", type=int, default=5)
    ap.add_argument("--index", default="sii", choices=["sii", "stii", "fsii", "banzhaf"])
    ap.add_argument("--cost-layers", type=int, nargs="*", default=[22, 32, 40, 80])
    ap.add_argument("--cost-samples", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)

    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(a.threads)
    with threadpool_limits(a.threads):
        games = []
        for path in (gtm.bundled_games() if a.games is None else a.games) if a.game_seeds else []:
            games.append(game_summary(path, range(a.game_seeds), a.index, a.level, a.folds or 5, a.ensemble,
                                      a.game_masks))
            if not a.json:
                g = games[-1]
                print(f"game {g['name']}: coverage {g['coverage']:.3f} (10 strongest {g['coverage_top10']:.3f})",
                      flush=True)
        gt = gtm.load(a.ground_truth or gtm.DEFAULT_OUT)
        truth = truth_matrix(gt, a.index)
        iu = np.triu_indices(gt.n_layers, 1)
        order = np.argsort(-np.abs(truth[iu]), kind="stable")[:TOP]
        truth_top = [{"i": int(iu[0][r]), "j": int(iu[1][r]), "value": float(truth[iu][r])} for r in order]
        rows = []
        lines = [f"exact {a.index.upper()} of the real game ({gt.n_layers} layers): strongest pairs "
                 + ", ".join(f"({p['i']},{p['j']}) {p['value']:+.3f}" for p in truth_top[:5]),
                 "", f"| masks | surrogate | scheme | Spearman all | Spearman top 15 | Pearson | unsampled weight | "
                 f"{a.level:.0%} coverage (top 15) | median half-width | 2-se coverage: ensemble | bias check | fit s |",
                 "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for n in a.masks:
            for kind in a.surrogates:
                for scheme in a.schemes:
                    per = [one_row(gt, truth, n, kind, scheme, s, a.ensemble, a.index, a.fit_on, a.bias_check,
                                   a.folds, a.level) for s in a.seeds]
                    row = {"masks": n, "surrogate": kind, "scheme": scheme, "seeds": list(a.seeds),
                           "ensemble": a.ensemble, "index": a.index, "fit_on": a.fit_on, "folds": a.folds,
                           "level": a.level}
                    for key in per[0]:
                        vals = np.array([p[key] for p in per])
                        row[key] = float(vals.mean())
                        if key in ("spearman_all", "spearman_top15", "pearson"):
                            row[f"{key}_std"] = float(vals.std())
                    rows.append(row)
                    lines.append(f"| {n} | {kind} | {scheme} | {row['spearman_all']:.3f} ± {row['spearman_all_std']:.3f}"
                                 f" | {row['spearman_top15']:.3f} ± {row['spearman_top15_std']:.3f}"
                                 f" | {row['pearson']:.3f} | {row['unsampled_weight_fraction']:.2f}"
                                 f" | {row.get('coverage', float('nan')):.2f} ({row.get('coverage_top15', float('nan')):.2f})"
                                 f" | {row.get('median_halfwidth', float('nan')):.4f}"
                                 f" | {row['coverage_ensemble']:.2f} | {row.get('coverage_bias_check', float('nan')):.2f}"
                                 f" | {row['fit_seconds']:.1f} |")
                    print(lines[-1], flush=True) if not a.json else None
        costs = cost(a.cost_layers, a.cost_samples, index=a.index) if a.cost_layers else []
        if costs:
            lines += ["", f"{a.index.upper()} cost (5-member MLP ensemble; Monte Carlo: {a.cost_samples} base masks):"]
            lines += [f"  L={c['L']}: {c['seconds']:.1f} s, {c['method']}, {c['evaluations']:,} evaluations, median pair "
                      f"stderr {c['median_mc_stderr']:.2g} (median |value| {c['median_abs_value']:.2g})" for c in costs]
    result = {"index": a.index, "fit_on": a.fit_on, "truth_top": truth_top, "rows": rows, "cost": costs}
    if games:
        result["games"] = games
        result["min_coverage"] = min(g["coverage"] for g in games)
        result["min_coverage_top10"] = min(g["coverage_top10"] for g in games)
        lines += ["", f"Per game, the defaults of `engine interactions` ({games[0]['masks']} {games[0]['scheme']} masks, "
                  f"{games[0]['surrogate']}, {a.level:.0%} interval), {a.game_seeds} seeds:"]
        lines += [f"  {g['name']:12s} L={g['n_layers']}: coverage {g['coverage']:.3f}, 10 strongest {g['coverage_top10']:.3f}; "
                  f"Spearman {g['spearman_all']:.3f} / top 15 {g['spearman_top15']:.3f}; "
                  f"{'restricted to the sampled kept counts' if g['restricted'] else 'full index'}" for g in games]
        lines.append(f"  minimum over games: {result['min_coverage']:.3f} (10 strongest {result['min_coverage_top10']:.3f})")
    return emit(lines, result, a.json)


if __name__ == "__main__":
    run_script(main)
