"""Removal sets of every method against the optimum, and estimator fidelity against exact values.

    .venv/bin/python -m bench.compare [--quick] [--ground-truth bench/data/ground_truth_demo.npz]
        [--model demo] [--data demo] [--windows 8] [--seq-len 128] [--eval-data demo-test demo-ood]
        [--eval-windows 0] [--ks 2 4 6 8] [--n-masks 256] [--fidelity-n 64 128 256 512 1024]
        [--seeds 0 1 2] [--out bench/results] [--threads 1] [--json]

Needs the ground truth of the same model and calibration windows (`python -m bench.ground_truth`):
with it, evaluating a calibration mask is a table lookup, so the Shapley pipeline's sampling, its
decision verification, the perplexity baseline and SLEB cost no model call, and the fidelity
study costs only surrogate fits. The model runs only for the gradient/activation baselines and
for the held-out splits (one prefix-shared call per split with every chosen set). A held-out split
is measured on `--eval-windows` windows of its text (default 0: every window of seq_len it holds, 377
and 373 for demo-test and demo-ood): the near-optimal sets differ by 0-4%, and 8 x 128 tokens cannot
tell 1% apart (bench.validation_draws: even the set best on the rest of demo-test scores up to 3.9%
above the best on 8 of its windows).

1. Comparison, for each k: calibration and held-out perplexity of
   * the Shapley pipeline (`engine.method` stages: `SamplingSpec()` masks, `fit`, `contributions`)
     for every estimator in `ESTIMATORS`, both its rank-and-cut set and the set
     `decision.decide` picks (rank-and-cut + surrogate beam search, verified on calibration);
   * every baseline in `baselines.BASELINES`;
   * the optimum (lowest calibration perplexity over all C(L, k) sets, from the ground truth).
2. Fidelity, for each n and seed: Spearman and relative L2 error of the estimated values against
   the exact values of the real game (the exact restricted-strata semivalue for the paper's
   estimator and for regression-adjusted on stratified samples, which targets it; exact Shapley
   for the Shapley estimators), and precision of the chosen removal sets against the optimal ones.

Writes compare.md, compare.csv, fidelity.csv, compare.png and fidelity.png under --out; with
--json the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from bench import ground_truth as gtm
from engine import decision as decision_lib
from engine import method, shapley
from engine.baselines import BASELINES, run_baseline
from bench.common import run_script
from engine.config import DataSpec, MethodSpec, ModelSpec, SamplingSpec, SurrogateSpec
from engine.errors import WorkbenchError
from engine.estimators import (
    BANZHAF_VALUE, ESTIMATORS, PAPER_MASKS, SAMPLED_STRATA_SEMIVALUE, SHAPLEY_VALUE, STRATA_SEMIVALUE, estimand,
)
from engine.sampling import default_strata, sample_masks

RESULTS = Path(__file__).resolve().parent / "results"
FIDELITY_ESTIMATORS = ("paper", "exact", "permutation", "regression-adjusted")
# Which exact value each estimator estimates on a stratified run (the registry's estimand; the
# regression-adjusted estimator targets the restricted-strata semivalue there, not Shapley).
_TARGET_NAMES = {SHAPLEY_VALUE: "shapley", STRATA_SEMIVALUE: "strata", BANZHAF_VALUE: "banzhaf",
                 SAMPLED_STRATA_SEMIVALUE: "sampled-strata"}
TARGET = {name: _TARGET_NAMES[estimand(name, SamplingSpec())] for name in ESTIMATORS}


# ---------------------------------------------------------------- the real game as a lookup


class LookupEvaluator:
    """The two members of `MaskEvaluator` that the ppl and SLEB baselines use (`ppl_full`,
    `perplexities`), answered from the ground truth instead of running the model."""

    def __init__(self, gt: gtm.GroundTruth):
        self.gt = gt
        self.ppl_full = gt.ppl_full
        self.n_masks = 0

    def perplexities(self, masks) -> np.ndarray:
        masks = np.asarray(masks, dtype=bool)
        self.n_masks += len(masks)
        return self.gt.lookup_ppl(masks)


def lookup_samples(gt: gtm.GroundTruth, sampling: SamplingSpec) -> method.Samples:
    """`sample_masks(sampling, L)` with their ground-truth perplexities: what `pipeline.sample` would
    have stored, in sample order, as the record every stage-2 function takes."""
    masks = sample_masks(sampling, gt.n_layers)  # (n, L)
    return method.Samples.from_perplexities(masks, gt.lookup_ppl(masks), gt.ppl_full, sampling)


def method_spec(estimator: str, L: int, seed: int = 0, surrogate: SurrogateSpec = SurrogateSpec(),
                mc_masks: int = PAPER_MASKS, val_windows: int = 0) -> MethodSpec:
    """The pipeline's defaults, with `seed` for the surrogate and the Monte Carlo draws and the paper
    estimator's Monte Carlo masks set by `mc_masks` (each with all L flips)."""
    budget = mc_masks * (L + 1) if estimator == "paper" and mc_masks != PAPER_MASKS else None
    return MethodSpec(surrogate=dataclasses.replace(surrogate, seed=seed), estimator=estimator, budget=budget,
                      mc_seed=seed, boot=0,  # no bootstrap intervals here: bench.uncertainty measures them
                      val_windows=val_windows)


# ---------------------------------------------------------------- the Shapley pipeline


def pipeline_sets(samples: method.Samples, gt: gtm.GroundTruth, estimators, ks, seed: int = 0,
                  surrogate: SurrogateSpec = SurrogateSpec(), mc_masks: int = PAPER_MASKS,
                  windows: "WindowCheck | None" = None) -> tuple[dict, dict, dict]:
    """({(method name, k): removed set}, {estimator: Contributions}, {estimator: method.Decisions}) for
    every estimator: its rank-and-cut set and the set the decision keeps. The same method functions,
    with the same defaults, as engine.pipeline: candidates verified on calibration (lookup), then
    compared window by window with `windows` (method.with_ties, as pipeline._decide): chosen there
    when they are validation windows, only their ties listed when they are the calibration windows."""
    L = gt.n_layers
    f = method.fit(samples, dataclasses.replace(surrogate, seed=seed), curve=False)
    sets, contribs, decisions = {}, {}, {}
    for est in estimators:
        mspec = method_spec(est, L, seed, surrogate, mc_masks, windows.n if windows and windows.choose else 0)
        c = method.contributions(samples, f, mspec)
        contribs[est] = c
        ds = method.decide(f, c, ks, gt.lookup_ppl, spec=mspec)
        if windows:
            ds = method.with_ties(ds, windows.window_losses, mspec, windows.on, windows.choose)
        decisions[est] = ds
        for d in ds.items:
            sets[(f"shapley:{est}", d.k)] = d.removed
            sets[(f"shapley:{est}:rank-and-cut", d.k)] = decision_lib.rank_and_cut(c.values, d.k)
    return sets, contribs, decisions


def baseline_sets(lm, windows, gt: gtm.GroundTruth, ks, names=tuple(BASELINES)) -> dict:
    out = {}
    for name in names:
        r = run_baseline(name, lm, windows, evaluator=LookupEvaluator(gt), k_max=max(ks), seed=0)
        for k in ks:
            out[(name, k)] = r.removed(k)
    return out


# ---------------------------------------------------------------- fidelity


def _agreement(est: np.ndarray, exact: np.ndarray) -> tuple[float, float]:
    from scipy.stats import spearmanr

    rho = float(spearmanr(est, exact).statistic)
    return rho, float(np.linalg.norm(est - exact) / np.linalg.norm(exact))


def fidelity(gt: gtm.GroundTruth, ns, seeds, ks, estimators, progress: bool = True,
             surrogate: SurrogateSpec = SurrogateSpec(), mc_masks: int = PAPER_MASKS) -> list[dict]:
    """One row per (n, seed, estimator): agreement with the exact values, precision vs the optimum per k."""
    exact = {name: np.array(gt.analysis[key]) for name, key in (("shapley", "shapley"), ("strata", "strata_semivalue"))
             if key in gt.analysis}
    if gt.complete:
        exact["banzhaf"] = shapley.semivalue(gt.value_function(), gt.n_layers, shapley.BANZHAF).values
        strata = tuple(gt.analysis.get("strata") or default_strata(gt.n_layers))
        exact["sampled-strata"] = shapley.semivalue(gt.value_function(), gt.n_layers,
                                                    shapley.sampled_strata(strata)).values
    missing = sorted({TARGET[e] for e in estimators} - set(exact))
    if missing:
        raise WorkbenchError(f"the ground truth (k_max={gt.k_max}) is too small for the exact {missing} values; "
                             "rebuild it without --k-max, or choose --fidelity-estimators paper regression-adjusted.")
    optimum = {k: set(gt.optimum(k)[0][0]) for k in ks}
    rows = []
    for n in ns:
        for seed in seeds:
            t0 = time.monotonic()
            samples = lookup_samples(gt, SamplingSpec(n_masks=n, seed=seed))
            sets, contribs, _ = pipeline_sets(samples, gt, estimators, ks, seed, surrogate, mc_masks)
            for est in estimators:
                values = contribs[est].values
                row = {"n": n, "seed": seed, "estimator": est, "target": TARGET[est]}
                for name, ref in exact.items():
                    row[f"spearman_{name}"], row[f"rel_l2_{name}"] = _agreement(values, ref)
                row["spearman"] = row[f"spearman_{TARGET[est]}"]
                row["rel_l2"] = row[f"rel_l2_{TARGET[est]}"]
                for k in ks:
                    for kind, key in (("verified", f"shapley:{est}"), ("rank_cut", f"shapley:{est}:rank-and-cut")):
                        chosen = sets[(key, k)]
                        row[f"precision_{kind}_k{k}"] = len(optimum[k] & set(chosen)) / k
                        row[f"ppl_{kind}_k{k}"] = float(gt.lookup_ppl(decision_lib.removal_mask(chosen, gt.n_layers)[None])[0])
                rows.append(row)
            if progress:
                print(f"fidelity n={n} seed={seed}: {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
    return rows


# ---------------------------------------------------------------- held-out measurement


def heldout_data(lm, data: DataSpec, source: str, n_windows: int = 0) -> DataSpec:
    """`data` on the held-out text `source` with `n_windows` windows (0: as many as the text holds)."""
    from engine.data import load_text

    if not n_windows:
        n_tokens = len(lm.tokenizer(load_text(source, data.text_field), add_special_tokens=False)["input_ids"])
        n_windows = n_tokens // data.seq_len
    return dataclasses.replace(data, source=source, n_windows=n_windows)


def measure(lm, data: DataSpec, removal_sets: list[tuple[int, ...]]) -> tuple[dict, float]:
    """({removed set: perplexity}, ppl_full) on `data`, all sets in one prefix-shared call."""
    from engine.data import make_windows
    from engine.evaluate import MaskEvaluator

    ev = MaskEvaluator(lm, make_windows(lm.tokenizer, data))
    masks = np.stack([decision_lib.removal_mask(s, lm.n_layers) for s in removal_sets])  # (n, L)
    return dict(zip(removal_sets, ev.perplexities(masks))), float(ev.ppl_full)


@dataclasses.dataclass(frozen=True)
class WindowCheck:
    """Windows the decision's candidates are compared on, as engine.pipeline._decide does: `n` validation
    windows of the calibration text (choose=True: they choose), or the calibration windows (ties only)."""

    n: int
    on: str  # the decision's `tied_on` wording (the pipeline's)
    window_losses: object  # bool[n, L] -> (nll float[n, W], tokens int[n, W]), each mask evaluated once
    choose: bool


def window_check(lm, data: DataSpec, val_windows: int) -> WindowCheck:
    """The pipeline's comparison windows for `val_windows` (data.validation_windows, or the calibration windows
    when 0), with a per-mask cache so the estimators' shared candidates are evaluated once."""
    from engine.data import make_windows, validation_windows
    from engine.evaluate import MaskEvaluator

    if val_windows:
        ev = MaskEvaluator(lm, validation_windows(lm.tokenizer, data, val_windows))
        on = f"{val_windows} validation windows of the calibration text"
    else:
        ev = MaskEvaluator(lm, make_windows(lm.tokenizer, data))
        on = "the calibration windows (the surrogate was fitted on them)"
    seen: dict[bytes, tuple] = {}

    def window_losses(masks):
        masks = np.asarray(masks, dtype=bool)
        todo = [m for m in dict.fromkeys(m.tobytes() for m in masks) if m not in seen]
        if todo:
            nll, tok = ev.window_losses(np.stack([np.frombuffer(m, dtype=bool) for m in todo]))
            seen.update({m: (nll[i], tok[i]) for i, m in enumerate(todo)})
        return (np.stack([seen[m.tobytes()][0] for m in masks]), np.stack([seen[m.tobytes()][1] for m in masks]))

    return WindowCheck(val_windows, on, window_losses, bool(val_windows))


def decision_rule(ds: method.Decisions) -> str:
    d = ds.items[0]
    if d.tied_on and "validation" in d.tied_on:
        return f"the best of its candidates on {d.tied_on}, ties there"
    return "the best of its candidates on the calibration windows, ties there"


def heldout_table(gt: gtm.GroundTruth, near: dict, heldout: dict, ds: method.Decisions, splits) -> tuple[list, list]:
    """Per k and held-out split: the decision's chosen set over the best held-out perplexity among the
    near-optimal calibration sets `near[k]`, its ties, and whether the held-out best of the decision's
    measured candidates is the choice or tied with it. (markdown lines, rows)."""
    L = gt.n_layers
    lines = ["| k | split | calibration ppl of the %d best sets | their held-out ppl (min - max) | chosen | "
             "chosen / best of them | tied | best among chosen + tied |" % len(next(iter(near.values()))),
             "|---:|---|---|---|---:|---:|---:|---|"]
    rows = []
    for d in ds.items:
        cal = [float(gt.lookup_ppl(decision_lib.removal_mask(r, L)[None])[0]) for r in near[d.k]]
        for name in splits:
            v = [float(heldout[name][r]) for r in near[d.k]]
            cands = [c.removed for c in d.candidates]
            best_cand = min(cands, key=lambda r: heldout[name][r])
            ok = best_cand == d.removed or best_cand in d.tied
            ratio = float(heldout[name][d.removed]) / min(v)
            rows.append({"k": d.k, "split": name, "ratio": ratio, "chosen": list(d.removed),
                         "tied": [list(t) for t in d.tied], "heldout_best_candidate": list(best_cand),
                         "heldout_best_among_chosen_and_tied": ok, "heldout_best_near": list(min(near[d.k],
                                                                                              key=lambda r: heldout[name][r]))})
            lines.append(f"| {d.k} | {name} | {min(cal):.3f} - {max(cal):.3f} | {min(v):.3f} - {max(v):.3f} | "
                         f"{heldout[name][d.removed]:.3f} | {ratio:.4f} | {len(d.tied)} | {'yes' if ok else 'no'} |")
    return lines, rows


# ---------------------------------------------------------------- outputs


def _fmt(x: float) -> str:
    return f"{x:.3f}" if np.isfinite(x) else "inf"


def comparison_tables(rows: list[dict], ks, splits, full: dict) -> list[str]:
    lines = []
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["method"], r["k"]): r for r in rows}
    for split in splits:
        lines += [f"### Perplexity on {split} (full model {full[split]:.3f})", "",
                  "| method | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---:|" * len(ks)]
        for m in methods:
            lines.append(f"| {m} | " + " | ".join(_fmt(by[(m, k)][f"ppl_{split}"]) for k in ks) + " |")
        lines.append("")
    return lines


def verdict(rows: list[dict], ks, splits, pipeline: str = "shapley:paper") -> tuple[list[str], list[dict]]:
    """Per k and held-out split: the pipeline vs the best baseline and vs the optimum."""
    by = {(r["method"], r["k"]): r for r in rows}
    baselines = [m for m in dict.fromkeys(r["method"] for r in rows) if m in BASELINES]
    out, lines = [], ["| k | split | pipeline | best baseline | pipeline / best baseline | optimum | pipeline / optimum |",
                      "|---:|---|---:|---|---:|---:|---:|"]
    for k in ks:
        for split in splits:
            p = by[(pipeline, k)][f"ppl_{split}"]
            best = min(baselines, key=lambda b: by[(b, k)][f"ppl_{split}"])
            b = by[(best, k)][f"ppl_{split}"]
            o = by[("optimum", k)][f"ppl_{split}"]
            out.append({"k": k, "split": split, "pipeline": p, "best_baseline": best, "baseline": b, "optimum": o,
                        "vs_baseline": p / b, "vs_optimum": p / o})
            lines.append(f"| {k} | {split} | {_fmt(p)} | {best} {_fmt(b)} | {p / b:.4f} | {_fmt(o)} | {p / o:.4f} |")
    return lines, out


def fidelity_table(rows: list[dict], ks, kind: str = "verified") -> list[str]:
    """Mean ± std over seeds per (estimator, n); precision of the `kind` sets (verified | rank_cut)."""
    lines = ["| estimator (target) | n | Spearman | rel. L2 | " + " | ".join(f"prec. k={k}" for k in ks) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(ks)]
    groups = {}
    for r in rows:
        groups.setdefault((r["estimator"], r["n"]), []).append(r)
    for (est, n), rs in groups.items():
        def ms(key):
            v = np.array([r[key] for r in rs], dtype=float)
            return f"{v.mean():.3f} ± {v.std():.3f}"
        lines.append(f"| {est} ({rs[0]['target']}) | {n} | {ms('spearman')} | {ms('rel_l2')} | "
                     + " | ".join(ms(f"precision_{kind}_k{k}") for k in ks) + " |")
    return lines


def gap_table(rows: list[dict], ks, optimum: dict) -> list[str]:
    """Calibration perplexity of the chosen sets over the optimum's, in %, mean (max) over seeds."""
    lines = ["| estimator | n | " + " | ".join(f"k={k} verified / rank-and-cut" for k in ks) + " |",
             "|---|---:|" + "---:|" * len(ks)]
    groups = {}
    for r in rows:
        groups.setdefault((r["estimator"], r["n"]), []).append(r)
    for (est, n), rs in groups.items():
        cells = []
        for k in ks:
            g = [100 * (np.array([r[f"ppl_{kind}_k{k}"] for r in rs]) / optimum[k] - 1) for kind in ("verified", "rank_cut")]
            cells.append(" / ".join(f"{x.mean():.2f} ({x.max():.2f})" for x in g))
        lines.append(f"| {est} | {n} | " + " | ".join(cells) + " |")
    return lines


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    from engine.atomic import open_atomic

    with open_atomic(path, "w", newline="") as fh:  # temp file beside + rename: never half a table
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def plots(out: Path, rows: list[dict], fid: list[dict], ks, splits) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    methods = list(dict.fromkeys(r["method"] for r in rows))
    # Perplexity relative to the calibration optimum's set on the same split; random and last are
    # orders of magnitude worse, so the axis is clipped (their lines leave the top of the plot).
    fig, axes = plt.subplots(1, len(splits), figsize=(5 * len(splits) + 3, 4.5), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for ax, split in zip(axes[0], splits):
        opt = {k: next(r[f"ppl_{split}"] for r in rows if r["method"] == "optimum" and r["k"] == k) for k in ks}
        for n, m in enumerate(methods):
            y = [next(r[f"ppl_{split}"] for r in rows if r["method"] == m and r["k"] == k) / opt[k] for k in ks]
            style = dict(lw=2.5, color="black") if m == "optimum" else dict(lw=1.2, color=cmap(n % 20))
            if m.endswith("rank-and-cut"):
                style["ls"] = ":"
            ax.plot(ks, y, marker="o", label=m, **style)
        ax.set_ylim(0.9, 1.4)
        ax.set_xticks(ks)
        ax.set_xlabel("layers removed (k)")
        ax.set_ylabel("perplexity / optimum set's perplexity")
        ax.set_title(split)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=110)
    plt.close(fig)
    files.append(str(out / "compare.png"))
    if fid:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
        for est in dict.fromkeys(r["estimator"] for r in fid):
            ns = sorted({r["n"] for r in fid if r["estimator"] == est})
            for ax, key in zip(axes, ("spearman", "rel_l2", f"precision_verified_k{ks[len(ks) // 2]}")):
                v = [np.array([r[key] for r in fid if r["estimator"] == est and r["n"] == n]) for n in ns]
                ax.errorbar(ns, [x.mean() for x in v], yerr=[x.std() for x in v], marker="o", capsize=3,
                            label=f"{est} vs {TARGET[est]}")
                ax.set_xscale("log", base=2)
                ax.set_xlabel("evaluated masks n")
                ax.set_title(key)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "fidelity.png", dpi=110)
        plt.close(fig)
        files.append(str(out / "fidelity.png"))
    return files


# ---------------------------------------------------------------- main


def run(args) -> dict:
    import torch

    from engine.data import make_windows
    from engine.models import load_model

    t0 = time.monotonic()
    torch.set_num_threads(args.threads)
    gt = gtm.load(args.ground_truth)
    lm = load_model(ModelSpec(name=args.model))
    data = DataSpec(source=args.data, n_windows=args.windows, seq_len=args.seq_len, seed=args.data_seed)
    windows = make_windows(lm.tokenizer, data)
    if (lm.identity, windows.data_hash) != (gt.meta["model_identity"], gt.meta["data_hash"]):
        raise WorkbenchError(
            f"{args.ground_truth} was computed for another model or other calibration windows "
            f"({gt.meta['model_identity']}, data {gt.meta['data_hash']}); rerun bench.ground_truth with the same "
            "--model/--data/--windows/--seq-len."
        )
    L = gt.n_layers
    ks = sorted(set(args.ks or [max(1, round(L * f)) for f in (1 / 8, 1 / 4, 3 / 8, 1 / 2)]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    # Everything is computed in memory from the ground truth: no run store.
    t = time.monotonic()
    surrogate = SurrogateSpec(ensemble=args.ensemble)
    sets, contribs, decisions = pipeline_sets(lookup_samples(gt, SamplingSpec(n_masks=args.n_masks)), gt,
                                              args.estimators, ks, 0, surrogate, args.mc_masks,
                                              window_check(lm, data, args.val_windows))
    timings["pipeline"] = round(time.monotonic() - t, 1)
    t = time.monotonic()
    sets.update(baseline_sets(lm, windows, gt, ks, args.baselines))
    timings["baselines"] = round(time.monotonic() - t, 1)
    near = {k: [r for r, _ in gt.optimum(k, top=args.near)] for k in ks}  # best calibration sets
    for k in ks:
        # The paper's rule on the exact values of the real game: what rank-and-cut gives with no
        # estimation error at all (separates the rule's limits from the estimator's).
        for name, key in (("exact Shapley", "shapley"), ("exact strata semivalue", "strata_semivalue")):
            if key in gt.analysis:
                sets[(f"rank-and-cut on {name}", k)] = decision_lib.rank_and_cut(gt.analysis[key], k)
        sets[("optimum", k)] = near[k][0]
    t = time.monotonic()
    fid = fidelity(gt, args.fidelity_n, args.seeds, ks, args.fidelity_estimators,
                   not args.json, surrogate, args.mc_masks) if args.fidelity_n else []
    timings["fidelity"] = round(time.monotonic() - t, 1)
    t = time.monotonic()
    chosen_by = MethodSpec().estimator if MethodSpec().estimator in args.estimators else "paper"
    candidates = {c.removed for d in decisions[chosen_by].items for c in d.candidates}
    distinct = sorted(set(sets.values()) | {r for k in ks for r in near[k]} | candidates)
    heldout, full, eval_windows = {}, {"calibration": gt.ppl_full}, {}
    for name in args.eval_data:
        spec = heldout_data(lm, data, name, args.eval_windows)
        eval_windows[name] = spec.n_windows
        heldout[name], full[name] = measure(lm, spec, distinct)
    timings["heldout"] = round(time.monotonic() - t, 1)
    splits = ["calibration", *args.eval_data]
    rows = []
    for (m, k), removed in sets.items():
        row = {"method": m, "k": k, "removed": " ".join(map(str, removed)),
               "ppl_calibration": float(gt.lookup_ppl(decision_lib.removal_mask(removed, L)[None])[0])}
        for name in args.eval_data:
            row[f"ppl_{name}"] = float(heldout[name][removed])
        rows.append(row)
    order = {m: i for i, m in enumerate(dict.fromkeys(m for m, _ in sets))}
    rows.sort(key=lambda r: (order[r["method"]], r["k"]))
    vlines, vrows = verdict(rows, ks, splits)
    spread, heldout_ratio = heldout_table(gt, near, heldout, decisions[chosen_by], args.eval_data)
    md = [f"# Layer removal on {gt.meta['model']} (L={L}): every method against the optimum", "",
          f"Ground truth: {len(gt.codes)} masks, {gt.meta['n_windows']} x {gt.meta['seq_len']} calibration tokens "
          f"({gt.meta['data']}), computed {gt.meta['date']}. Shapley pipeline: {args.n_masks} stratified masks "
          "(perplexities looked up in the ground truth), default surrogate; `shapley:<estimator>` is the set "
          "`decision.decide` keeps (rank-and-cut and beam candidates verified on calibration), "
          "`shapley:<estimator>:rank-and-cut` the paper's rule alone. `optimum` is the best set on calibration, "
          "measured on every split. Held-out splits: %s windows of %d tokens." % (
              ", ".join(f"{name} {n}" for name, n in eval_windows.items()) or "none", args.seq_len), "",
          f"Command: `python -m bench.compare {' '.join(args.argv)}`", "",
          "## Shapley pipeline (paper estimator) vs best baseline and optimum", "",
          "Best baseline = the best of the %d baselines on that split and k (chosen after the fact); optimum = "
          "the set with the lowest calibration perplexity, measured on the split." % len(args.baselines), "",
          *vlines, "", "## Held-out ratio: the decision against the %d best sets on calibration" % args.near, "",
          f"The set the default pipeline (`{chosen_by}`, {decision_rule(decisions[chosen_by])}) chooses, over the "
          f"best held-out perplexity among the {args.near} best calibration sets (target <= 1.01); `tied`: the "
          "candidates the decision reports as statistically tied with its choice; `best among chosen + tied`: "
          "whether the held-out best of the candidates it measured is the choice or one of those ties.", "",
          *(spread if args.eval_data else []), "",
          "## All methods", "", *comparison_tables(rows, ks, splits, full)]
    if "shapley" in gt.analysis:
        md += ["## Exact values of the real game", "", "| layer | " + " | ".join(map(str, range(L))) + " |",
               "|---|" + "---:|" * L,
               "| Shapley | " + " | ".join(f"{x:.4f}" for x in gt.analysis["shapley"]) + " |",
               "| strata semivalue | " + " | ".join(f"{x:.4f}" for x in gt.analysis["strata_semivalue"]) + " |",
               "| paper estimate (n=%d) | " % args.n_masks
               + " | ".join(f"{x:.4f}" for x in contribs["paper"].values) + " |", ""]
    if fid:
        md += ["## Estimator fidelity (mean ± std over seeds %s)" % list(args.seeds), "",
               "Target: `strata` = exact restricted-strata semivalue of the real game, `shapley` = exact Shapley "
               "values of the real game. Precision = |chosen ∩ optimal| / k for the verified set.", "",
               *fidelity_table(fid, ks), "",
               "Precision of the rank-and-cut sets (the paper's rule on the estimated values):", "",
               *fidelity_table(fid, ks, "rank_cut"), "",
               "Calibration perplexity of the chosen sets above the optimum, % (mean over seeds, max in brackets):",
               "", *gap_table(fid, ks, {k: gt.optimum(k)[0][1] for k in ks}), ""]
    timings["total"] = round(time.monotonic() - t0, 1)
    md += [f"Seconds: {json.dumps(timings)}", ""]
    from engine.atomic import write_atomic

    write_atomic(out / "compare.md", "\n".join(md))
    write_csv(out / "compare.csv", rows)
    write_csv(out / "fidelity.csv", fid)
    files = plots(out, rows, fid, ks, splits)
    return {"ks": ks, "verdict": vrows, "heldout_ratio": heldout_ratio, "val_windows": args.val_windows,
            "eval_windows": eval_windows, "rows": rows, "fidelity": fid, "ppl_full": full, "seconds": timings,
            "files": [str(out / "compare.md"), str(out / "compare.csv"), str(out / "fidelity.csv"), *files]}


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smaller study: fidelity n 64 128, seeds 0 1, paper + regression-adjusted only")
    p.add_argument("--ground-truth", default=str(gtm.DEFAULT_OUT))
    p.add_argument("--model", default="demo")
    p.add_argument("--data", default="demo")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--eval-data", nargs="*", default=None, help="held-out splits (default demo-test demo-ood)")
    p.add_argument("--eval-windows", type=int, default=0,
                   help="windows of each held-out split (default 0: every seq_len window its text holds)")
    p.add_argument("--ks", type=int, nargs="*", default=None, help="default L/8, L/4, 3L/8, L/2")
    p.add_argument("--n-masks", type=int, default=SamplingSpec().n_masks)
    p.add_argument("--fidelity-n", type=int, nargs="*", default=None)
    p.add_argument("--seeds", type=int, nargs="*", default=None)
    p.add_argument("--estimators", nargs="*", default=list(ESTIMATORS))
    p.add_argument("--fidelity-estimators", nargs="*", default=None)
    p.add_argument("--baselines", nargs="*", default=list(BASELINES))
    p.add_argument("--ensemble", type=int, default=SurrogateSpec().ensemble, help="surrogate ensemble members")
    p.add_argument("--mc-masks", type=int, default=PAPER_MASKS, help="Monte Carlo masks of the paper's estimator")
    p.add_argument("--near", type=int, default=10, help="near-optimal calibration sets measured on held-out splits")
    p.add_argument("--val-windows", type=int, default=MethodSpec().val_windows,
                   help="validation windows the pipeline chooses on (the engine's default; 0: calibration only)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    if a.eval_data is None:
        a.eval_data = ["demo-test", "demo-ood"] if a.data == "demo" else []
    if a.fidelity_n is None:
        a.fidelity_n = [64, 128] if a.quick else [64, 128, 256, 512, 1024]
    if a.seeds is None:
        a.seeds = [0, 1] if a.quick else [0, 1, 2]
    if a.fidelity_estimators is None:
        a.fidelity_estimators = ["paper", "regression-adjusted"] if a.quick else list(FIDELITY_ESTIMATORS)
    for name in [*a.estimators, *a.fidelity_estimators]:
        if name not in ESTIMATORS:
            p.error(f"unknown estimator {name!r}; choose from {', '.join(ESTIMATORS)}")
    if "paper" not in a.estimators:
        p.error("--estimators must include 'paper' (the pipeline the comparison is about)")
    return a


def main(argv=None) -> dict:
    from bench.common import emit

    a = parse(argv)
    result = run(a)
    lines = [Path(result["files"][0]).read_text()]
    return emit(lines, result, a.json)


if __name__ == "__main__":
    run_script(main)
