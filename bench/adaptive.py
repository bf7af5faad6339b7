"""Fewer real evaluations for the same answer? Multi-fidelity and active sampling replayed on the ground truth.

    .venv/bin/python -m bench.adaptive [--modes stratified paper multi-fidelity active both] [--seeds 5]
        [--grid 64 96 128 192 256 384 512 768 1024] [--ks 2 4 6 8] [--first-windows 1] [--complete 0.1]
        [--rounds 4] [--explore 0.5] [--processes 2] [--ground-truth bench/data/ground_truth_demo.npz] [--json]

Every mode samples the demo game the way `engine sample` would, with the per-window losses of all
65,536 masks of the demo model as the value function (`bench/ground_truth.py`), then runs the
pipeline's stage 2 unchanged (`engine.method`: fit, default estimator, verified decision; the
decision's measurements are lookups too, at full fidelity). Modes:

* stratified: today's default, the stratified design at full fidelity;
* paper: the paper's design (its strata, the reference surrogate schedule, the paper's estimator);
* multi-fidelity: every mask first on `--first-windows` of the 8 windows (its own,
  `engine.fidelity.first_windows`), then the rows that
  `engine.fidelity.plan_completion` picks completed until `--complete` of them are complete;
* active: `--rounds` rounds planned by `engine.active.plan_round` (`--explore` of each later
  round from the design, the rest where the surrogate ensemble disagrees most), full fidelity;
* both: active rounds with multi-fidelity evaluation.

Work is counted exactly as the engine's evaluator counts it (`engine.fidelity.count_work`:
(layer calls + leaves) x windows x tokens, each evaluation pass of a round one prefix-shared batch,
as `engine sample --single-pass` runs it), and includes the decision's measurements of masks that
are not already complete in the run.

For each mode and seed the grid of mask counts is walked upwards until the *target* holds
(stratified first; the other modes stop once their work passes the most work stratified needed
on any seed, since beyond it they cannot win):
Spearman >= 0.95 between the default estimator's contributions and the exact Shapley values of
the real game, and, at every k in --ks, the chosen set's calibration perplexity within 1% of the
optimum. Also reported per point: the error (relative L2) against the exact restricted-strata
semivalue. A mode that does not reach the target on the grid for some seed is "not reached" for
that seed (its mean work is then not defined and it cannot win). `work_ratio` (last JSON line) is
the mean work (over seeds) the best adaptive mode (multi-fidelity, active, both) needed, divided by
the mean work stratified full-fidelity sampling needed. Outputs: bench/results/adaptive.csv (every
point), bench/results/adaptive.png (quality against work, one curve per mode, mean over seeds).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench import ground_truth as gtm
from bench.common import emit, run_script
from engine import active, fidelity, method
from engine.config import MethodSpec, SamplingSpec, SurrogateSpec
from engine.decision import removal_mask
from engine.errors import WorkbenchError

RESULTS = Path(__file__).resolve().parent / "results"
ADAPTIVE_MODES = ("multi-fidelity", "active", "both")
SPEARMAN_TARGET = 0.95
PPL_TARGET = 1.01


@dataclass(frozen=True)
class Mode:
    """How a run samples and which stage-2 method it uses."""

    name: str
    first_windows: int = 0  # 0 = every window at once
    complete: float = 1.0  # share of rows completed when first_windows > 0
    rounds: int = 1
    explore: float = 0.5
    # No bootstrap refits (bench.uncertainty measures intervals), no swap search: its real evaluations
    # (about 230 sets per replay at k = 2, 4, 6, 8, more work than a 256-mask sample) would be much the same
    # for every mode and hide the differences in sampling work this benchmark is about.
    method: MethodSpec = MethodSpec(boot=0, swaps=0)


def modes(first_windows: int, complete: float, rounds: int, explore: float) -> dict[str, Mode]:
    mf = dict(first_windows=first_windows, complete=complete)
    act = dict(rounds=rounds, explore=explore)
    paper = MethodSpec(surrogate=SurrogateSpec(preset="paper"), estimator="paper", boot=0, swaps=0)
    return {"stratified": Mode("stratified"), "paper": Mode("paper", method=paper),
            "multi-fidelity": Mode("multi-fidelity", **mf), "active": Mode("active", **act),
            "both": Mode("both", **mf, **act)}


# ---------------------------------------------------------------- one replayed run


@dataclass
class Replay:
    """What a run of `mode` stored: masks with per-window losses (NaN/0 where not evaluated)."""

    masks: np.ndarray  # bool[n, L]
    nll: np.ndarray  # float[n, W]
    tokens: np.ndarray  # int[n, W]
    source: list  # str[n]
    work: int = 0

    def samples(self, gt: gtm.GroundTruth, design: SamplingSpec) -> method.Samples:
        """What `engine.pipeline.samples` builds from such a store: stored rows, then `with_partial_rows`."""
        score, nonfinite = fidelity.subset_scores(self.nll, self.tokens, gt.full_window_nll)  # as the store holds
        ppl = np.where(nonfinite, np.inf, gt.ppl_full / np.where(nonfinite, 1.0, score))
        s = method.Samples(self.masks, score, ppl, nonfinite, gt.ppl_full, design, self.nll, self.tokens,
                           source=np.array(self.source))
        return s.with_partial_rows(gt.full_window_nll, gt.window_tokens)


def _evaluate(gt: gtm.GroundTruth, rep: Replay, rows, windows) -> None:
    """Evaluate `rows` of the replay on `windows` (int[] per row): one prefix-shared batch per distinct
    window set, as engine.pipeline runs them, each counted as the evaluator counts its work."""
    T = int(gt.meta["seq_len"])
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, w in zip(rows, windows):
        if len(w):
            groups.setdefault(tuple(int(j) for j in w), []).append(int(i))
    for w, part in groups.items():
        cols = list(w)
        truth = gt.lookup_window_nll(rep.masks[part])  # (r, W)
        rep.nll[np.ix_(part, cols)] = truth[:, cols]
        rep.tokens[np.ix_(part, cols)] = gt.window_tokens[cols]
        rep.work += fidelity.count_work(rep.masks[part], len(cols), T)


def replay(gt: gtm.GroundTruth, mode: Mode, design: SamplingSpec) -> Replay:
    """Sample `design.n_masks` masks as `engine sample` does for `mode`, evaluating from the table."""
    from engine.sampling import masks_to_strings

    L, W = gt.n_layers, len(gt.window_tokens)
    rep = Replay(np.zeros((0, L), bool), np.zeros((0, W)), np.zeros((0, W), np.int64), [])
    used = 0
    for r, size in enumerate(active.round_sizes(design.n_masks, mode.rounds)):
        # the pipeline's committee (engine.pipeline._committee): default surrogate seeded by the sampling seed
        predict = None if r == 0 else method.committee(rep.samples(gt, design), SurrogateSpec(seed=design.seed))
        plan = active.plan_round(design, L, r, size, rep.masks, predict, mode.explore, used)
        used = plan.design_used
        start = len(rep.masks)
        rep.masks = np.concatenate([rep.masks, plan.masks])
        rep.nll = np.concatenate([rep.nll, np.full((len(plan.masks), W), np.nan)])
        rep.tokens = np.concatenate([rep.tokens, np.zeros((len(plan.masks), W), np.int64)])
        rep.source += list(plan.source)
        new = np.arange(start, len(rep.masks))
        _evaluate(gt, rep, new, fidelity.first_windows(masks_to_strings(rep.masks[new]), W, mode.first_windows,
                                                       design.seed))
        if 0 < mode.first_windows < W:
            est = fidelity.estimate_full(rep.nll, rep.tokens, gt.full_window_nll)
            rows = fidelity.plan_completion(est, rep.masks, mode.complete, seed=[design.seed, r])
            _evaluate(gt, rep, rows, [np.flatnonzero(~fidelity.evaluated(rep.tokens[i])) for i in rows])
    return rep


# ---------------------------------------------------------------- stage 2 and its quality


def point(gt: gtm.GroundTruth, mode: Mode, n: int, seed: int, ks) -> dict:
    """Replay `mode` with n masks and sampling seed `seed`; fit, estimate, decide; score against the truth."""
    from scipy.stats import spearmanr

    t0 = time.monotonic()
    design = SamplingSpec(n_masks=n, seed=seed)
    spec = dataclasses.replace(mode.method, surrogate=dataclasses.replace(mode.method.surrogate, seed=seed),
                               mc_seed=seed)
    rep = replay(gt, mode, design)
    s = rep.samples(gt, design)
    f = method.fit(s, spec.surrogate, curve=False)
    c = method.contributions(s, f, spec)
    measured: list[np.ndarray] = []

    def measure(masks):
        measured.append(np.asarray(masks, dtype=bool))
        return gt.lookup_ppl(masks)

    ds = method.decide(f, c, ks, measure, spec=spec)
    T, W = int(gt.meta["seq_len"]), len(gt.window_tokens)
    done = {m.tobytes() for m, ok in zip(rep.masks, fidelity.evaluated(rep.tokens).all(axis=1)) if ok}
    for batch in measured:
        new = np.array([m for m in batch if m.tobytes() not in done]).reshape(-1, gt.n_layers)
        rep.work += fidelity.count_work(new, W, T)
    exact_sh = np.array(gt.analysis["shapley"])
    exact_st = np.array(gt.analysis["strata_semivalue"])
    row = {"mode": mode.name, "n": n, "seed": seed, "work": int(rep.work),
           "complete": int(fidelity.evaluated(rep.tokens).all(axis=1).sum()),
           "active": int(sum(1 for x in rep.source if x == "active")),
           "spearman_shapley": float(spearmanr(c.values, exact_sh).statistic),
           "rel_l2_strata": float(np.linalg.norm(c.values - exact_st) / np.linalg.norm(exact_st))}
    for d in ds.items:
        ppl = float(gt.lookup_ppl(removal_mask(d.removed, gt.n_layers)[None])[0])
        row[f"ppl_ratio_k{d.k}"] = ppl / gt.optimum(d.k)[0][1]
    row["target"] = bool(row["spearman_shapley"] >= SPEARMAN_TARGET
                         and all(row[f"ppl_ratio_k{k}"] <= PPL_TARGET for k in ks))
    row["seconds"] = round(time.monotonic() - t0, 1)
    return row


def replay_work(gt: gtm.GroundTruth, mode: Mode, n: int, seed: int) -> int | None:
    """The sampling work of `mode` at n masks when it needs no fit (one round), else None."""
    if mode.rounds > 1:
        return None
    return replay(gt, mode, SamplingSpec(n_masks=n, seed=seed)).work


def walk(args) -> list[dict]:
    """One (mode, seed): grid points upwards until the target holds or the sampling work passes
    `cap` (the most work stratified sampling needed: beyond it the mode cannot win)."""
    import torch

    torch.set_num_threads(1)  # one process per core: the surrogate's small matrices gain nothing from threads
    path, mode, seed, grid, ks, cap = args
    gt = gtm.load(path)
    rows = []
    for n in grid:
        work = replay_work(gt, mode, n, seed)
        if cap is not None and work is not None and work > cap:
            break
        row = point(gt, mode, n, seed, ks)
        rows.append(row)
        print(f"adaptive {mode.name} seed={seed} n={n}: work {row['work']:.3g}, Spearman "
              f"{row['spearman_shapley']:.3f}, worst ppl ratio "
              f"{max(row[f'ppl_ratio_k{k}'] for k in ks):.4f}{' TARGET' if row['target'] else ''} "
              f"({row['seconds']} s)", file=sys.stderr, flush=True)
        if row["target"] or (cap is not None and row["work"] > cap):
            break
    return rows


def _walk_all(jobs: list, processes: int) -> list[dict]:
    if processes > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(processes) as pool:
            return [r for part in pool.map(walk, jobs) for r in part]
    return [r for job in jobs for r in walk(job)]


def summarise(rows: list[dict], names, seeds) -> dict:
    """Per mode: the work at which each seed first reached the target, and the mean over seeds."""
    out = {}
    for name in names:
        per_seed = {}
        for seed in seeds:
            hit = [r for r in rows if r["mode"] == name and r["seed"] == seed and r["target"]]
            per_seed[seed] = min((r["work"] for r in hit), default=None)
        reached = [w for w in per_seed.values() if w is not None]
        out[name] = {"work_by_seed": per_seed, "reached": len(reached), "seeds": len(seeds),
                     "mean_work": float(np.mean(reached)) if len(reached) == len(seeds) else None}
    return out


def plot(rows: list[dict], names, ks, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name in names:
        mine = [r for r in rows if r["mode"] == name]
        ns = sorted({r["n"] for r in mine})
        pts = [[r for r in mine if r["n"] == n] for n in ns]
        work = [np.mean([r["work"] for r in p]) for p in pts]
        axes[0].plot(work, [np.mean([r["spearman_shapley"] for r in p]) for p in pts], "o-", label=name)
        axes[1].plot(work, [np.mean([r["rel_l2_strata"] for r in p]) for p in pts], "o-", label=name)
        axes[2].plot(work, [np.mean([max(r[f"ppl_ratio_k{k}"] for k in ks) for r in p]) for p in pts], "o-",
                     label=name)
    axes[0].axhline(SPEARMAN_TARGET, color="grey", ls=":")
    axes[2].axhline(PPL_TARGET, color="grey", ls=":")
    for ax, title in zip(axes, ("Spearman with exact Shapley", "rel. L2 error vs strata semivalue",
                                f"worst chosen/optimal ppl over k={list(ks)}")):
        ax.set_xscale("log")
        ax.set_xlabel("real evaluation work (token-layer calls)")
        ax.set_title(title)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def run(a) -> dict:
    gt = gtm.load(a.ground_truth)
    if not gt.complete or not gt.has_windows:
        raise WorkbenchError("bench.adaptive needs a complete ground truth with per-window losses; rebuild it "
                             "with `python -m bench.ground_truth --workers 2`.")
    table = modes(a.first_windows, a.complete, a.rounds, a.explore)
    unknown = sorted(set(a.modes) - set(table))
    if unknown:
        raise WorkbenchError(f"unknown mode(s) {unknown}; choose from {', '.join(table)}.")
    seeds = list(range(a.seeds))
    t0 = time.monotonic()
    first = [m for m in a.modes if m == "stratified"]
    rows = _walk_all([(a.ground_truth, table[m], s, a.grid, tuple(a.ks), None) for m in first for s in seeds],
                     a.processes)
    done = summarise(rows, first, seeds).get("stratified", {}).get("work_by_seed", {})
    cap = max((w for w in done.values() if w is not None), default=None) if all(
        w is not None for w in done.values()) and done else None
    rest = [m for m in a.modes if m != "stratified"]
    rows += _walk_all([(a.ground_truth, table[m], s, a.grid, tuple(a.ks), cap) for m in rest for s in seeds],
                      a.processes)
    summary = summarise(rows, a.modes, seeds)
    base = summary.get("stratified", {}).get("mean_work")
    ratios = {m: (summary[m]["mean_work"] / base if base and summary[m]["mean_work"] else None)
              for m in a.modes if m in ADAPTIVE_MODES}
    best = min((m for m in ratios if ratios[m] is not None), key=lambda m: ratios[m], default=None)
    RESULTS.mkdir(exist_ok=True)
    import pandas as pd

    pd.DataFrame(rows).to_csv(RESULTS / "adaptive.csv", index=False)
    plot(rows, a.modes, a.ks, RESULTS / "adaptive.png")
    return {"bench": "adaptive", "work_ratio": ratios.get(best) if best else None, "best_mode": best,
            "work_cap": cap,
            "ratios": ratios, "summary": summary, "seeds": len(seeds), "grid": a.grid, "ks": a.ks,
            "first_windows": a.first_windows, "complete": a.complete, "rounds": a.rounds, "explore": a.explore,
            "windows": len(gt.window_tokens), "seq_len": int(gt.meta["seq_len"]),
            "seconds": round(time.monotonic() - t0, 1), "rows": rows}


def lines(r: dict) -> list[str]:
    out = [f"adaptive: {r['seeds']} seeds, grid {r['grid']}, target Spearman >= {SPEARMAN_TARGET} and chosen ppl "
           f"<= {PPL_TARGET} x optimum at k={r['ks']}; work in token-layer calls"]
    for name, s in r["summary"].items():
        work = f"{s['mean_work']:.4g}" if s["mean_work"] else "not reached"
        out.append(f"  {name:15s} reached {s['reached']}/{s['seeds']} seeds, mean work {work}"
                   + (f", ratio {r['ratios'][name]:.3f}" if r["ratios"].get(name) else ""))
    out.append(f"work_ratio {r['work_ratio']} (best adaptive mode: {r['best_mode']}); {r['seconds']} s")
    return out


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.adaptive", description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", nargs="+", default=["stratified", "paper", "multi-fidelity", "active", "both"])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--grid", type=int, nargs="+", default=[64, 96, 128, 192, 256, 384, 512, 768, 1024])
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4, 6, 8])
    p.add_argument("--first-windows", type=int, default=1)
    p.add_argument("--complete", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--explore", type=float, default=0.5)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--ground-truth", default=str(gtm.DEFAULT_OUT))
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse(argv)
    r = run(a)
    return emit(lines(r), r, a.json)


if __name__ == "__main__":
    run_script(main)
