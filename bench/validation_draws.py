"""How many validation windows does the decision need? Validation draws against the whole held-out text.

    .venv/bin/python -m bench.validation_draws [--losses /tmp/validation_losses.npz] [--draws 300]
        [--counts 16 32 64 128] [--near 10] [--json]
    .venv/bin/python -m bench.validation_draws --race [bench.validation_race's options]

`--race` runs bench/validation_race.py instead: the product's raced decision (engine/racing.py, the
pipeline's pool and method.decide) per sampling seed on real per-window losses, its set-window evaluations
and wall seconds beside the decision before the race; the rest of this docstring is the older study,
whose `engine` rows apply the engine's rule with ground-truth lookups (no race).

For each k in 2 4 6 8, the `--near` best removal sets on the calibration windows (ground truth) are the
candidates. Their per-window losses are computed once with the demo model (saved to `--losses` and
reused when it exists; about an hour on 2 busy cores) on: every aligned window of calibration.txt
outside the 8 calibration windows (`data.validation_windows`, 324), the 8 demo-test windows
bench.compare measures, and every aligned window of test.txt outside those 8 (361). Then, for N in
`--counts`, `--draws` random sets of N validation windows each choose the candidate with the lowest
validation perplexity (the engine's rule, `MethodSpec.val_windows`); reported per k: its held-out
perplexity over the best candidate's, on the 361 windows ("testall") and on bench.compare's 8
("test8"), mean and share <= 1.01, and the same for the calibration-best set (the rule without
validation) and for the set best on the 361 test windows (what no rule can beat in-domain). The last stdout line (with --json) is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

import numpy as np

from bench import ground_truth as gtm
from bench.common import run_script
from engine.config import MethodSpec

KS = (2, 4, 6, 8)
SPLITS = ("val", "test8", "testall")


def _free(lm, spec) -> int:
    from engine.data import validation_windows

    return int(validation_windows(lm.tokenizer, spec, 10**9, at_most=True).input_ids.shape[0])


def _splits(lm, gt: gtm.GroundTruth, splits=SPLITS) -> dict:
    from engine.config import DataSpec
    from engine.data import make_windows, validation_windows

    cal = DataSpec(source=gt.meta["data"], n_windows=gt.meta["n_windows"], seq_len=gt.meta["seq_len"])
    test = dataclasses.replace(cal, source="demo-test")
    make = {"val": lambda: validation_windows(lm.tokenizer, cal, _free(lm, cal)),
            "test8": lambda: make_windows(lm.tokenizer, test),
            "testall": lambda: validation_windows(lm.tokenizer, test, _free(lm, test))}
    return {name: make[name]() for name in splits}


def losses(gt: gtm.GroundTruth, sets, path: Path, splits=SPLITS) -> dict:
    """{split + '_nll' / '_tok': float/int[c, W], 'sets': str[c]} for the removal `sets` (and any the cache
    already holds): read from the cache at `path`, the missing sets computed with the demo model on `splits`
    (a cache holds the same splits for every set: use one path per choice of splits) and added."""
    import torch

    from engine import decision as decision_lib
    from engine.config import ModelSpec
    from engine.evaluate import MaskEvaluator
    from engine.models import load_model

    d = {k: v for k, v in np.load(path).items()} if path.exists() else {}
    have = {tuple(int(x) for x in s.split(",")) if s else () for s in d.get("sets", [])}
    todo = sorted(set(sets) - have)
    if not todo:
        return d
    torch.set_num_threads(1)
    lm = load_model(ModelSpec(name=gt.meta["model"]))
    masks = np.stack([decision_lib.removal_mask(s, gt.n_layers) for s in todo])  # (c, L)
    new = {"sets": np.array([",".join(map(str, s)) for s in todo])}
    for name, w in _splits(lm, gt, splits).items():
        new[name + "_nll"], new[name + "_tok"] = MaskEvaluator(lm, w).window_losses(masks)
        print(f"{name}: {new[name + '_nll'].shape}", file=sys.stderr, flush=True)
    d = {k: np.concatenate([d[k], v]) if k in d else v for k, v in new.items()}
    np.savez(path, **d)
    return d


def _index(d: dict) -> dict:
    return {tuple(int(x) for x in s.split(",")) if s else (): i for i, s in enumerate(d["sets"])}


def _ppl(d: dict, name: str, rows, cols=None) -> np.ndarray:
    nll, tok = d[name + "_nll"][rows], d[name + "_tok"][rows]
    if cols is not None:
        nll, tok = nll[:, cols], tok[:, cols]
    return np.exp(nll.sum(1) / tok.sum(1))


def engine_decisions(gt: gtm.GroundTruth, seed: int, swaps: int) -> dict:
    """{k: removal sets the engine's decision compares on validation windows}: the default pipeline
    (256 stratified masks with sampling seed `seed`, default surrogate and estimator, `swaps` rounds of
    swap search) with the ground truth as its calibration measurement, as bench.compare runs it."""
    from bench.compare import lookup_samples
    from engine import method
    from engine.config import MethodSpec, SamplingSpec, SurrogateSpec

    samples = lookup_samples(gt, SamplingSpec(seed=seed))
    f = method.fit(samples, SurrogateSpec(seed=seed), curve=False)
    spec = MethodSpec(surrogate=SurrogateSpec(seed=seed), mc_seed=seed, boot=0, swaps=swaps)
    ds = method.decide(f, method.contributions(samples, f, spec), KS, gt.lookup_ppl, spec=spec)
    return {d.k: [c.removed for c in d.candidates] for d in ds.items}


def engine_rule(gt: gtm.GroundTruth, path: Path, seeds: int, near: int, val_windows: int) -> list[dict]:
    """The engine's whole decision (its own candidates, chosen on its `val_windows` validation windows) over
    sampling seeds 0..seeds-1, with and without the swap search: per k, the chosen set's perplexity on the
    361 test windows over the best of the `near` best calibration sets there."""
    from engine.config import DataSpec, ModelSpec
    from engine.data import validation_windows
    from engine.models import load_model

    cands = {(seed, swaps): engine_decisions(gt, seed, swaps) for seed in range(seeds) for swaps in (0, 2)}
    near_sets = {k: [r for r, _ in gt.optimum(k, top=near)] for k in KS}
    needed = {s for c in cands.values() for sets in c.values() for s in sets} | {s for v in near_sets.values() for s in v}
    d = losses(gt, needed, path)
    index = _index(d)
    lm = load_model(ModelSpec(name=gt.meta["model"]))
    cal = DataSpec(source=gt.meta["data"], n_windows=gt.meta["n_windows"], seq_len=gt.meta["seq_len"])
    every = validation_windows(lm.tokenizer, cal, _free(lm, cal)).input_ids  # the cache's "val" columns
    mine = validation_windows(lm.tokenizer, cal, val_windows).input_ids  # the engine's (MethodSpec.val_windows)
    cols = [next(j for j in range(len(every)) if (every[j] == w).all()) for w in mine]
    rows = []
    for (seed, swaps), per_k in cands.items():
        ratio = {}
        for k in KS:
            rs = [index[s] for s in per_k[k]]
            chosen = rs[int(np.argmin(_ppl(d, "val", rs, cols)))]
            best = _ppl(d, "testall", [index[s] for s in near_sets[k]]).min()
            ratio[k] = float(_ppl(d, "testall", [chosen])[0] / best)
        rows.append({"seed": seed, "swaps": swaps, "ratio": ratio, "all_k": all(v <= 1.01 for v in ratio.values()),
                     "candidates": {k: len(v) for k, v in per_k.items()},
                     "near_among_candidates": {k: len(set(per_k[k]) & set(near_sets[k])) for k in KS}})
    return rows


def draws(gt: gtm.GroundTruth, d: dict, near: int, counts, n_draws: int) -> list[dict]:
    index = _index(d)

    def ppl(name, rows, cols=None):
        return _ppl(d, name, rows, cols)

    rows_k = {k: [index[r] for r, _ in gt.optimum(k, top=near)] for k in KS}
    W = d["val_nll"].shape[1]
    out = []
    for n in [*counts, W, 0, -1]:  # W: every validation window; 0: the calibration-best set; -1: best on testall
        rng = np.random.default_rng(2)
        for held in ("testall", "test8"):
            r = []
            for _ in range(n_draws if 0 < n < W else 1):
                cols = np.sort(rng.choice(W, n, replace=False)) if n > 0 else None
                row = []
                for k in KS:
                    h = ppl(held, rows_k[k])
                    pick = (int(np.argmin(ppl("val", rows_k[k], cols))) if n > 0 else 0 if n == 0  # best first
                            else int(np.argmin(ppl("testall", rows_k[k]))))
                    row.append(h[pick] / h.min())
                r.append(row)
            r = np.array(r)
            out.append({"val_windows": n, "heldout": held, "windows": int(d[held + "_nll"].shape[1]),
                        "mean_ratio": dict(zip(KS, r.mean(0).round(4).tolist())),
                        "share_within_1pct": dict(zip(KS, (r <= 1.01).mean(0).round(2).tolist())),
                        "share_all_k": float((r <= 1.01).all(1).mean()), "draws": len(r)})
    return out


def main(argv=None) -> dict:
    from bench.common import emit

    argv = sys.argv[1:] if argv is None else list(argv)
    if "--race" in argv:  # the product's raced decision over sampling seeds (bench/validation_race.py)
        from bench import validation_race

        return validation_race.main([x for x in argv if x != "--race"])
    p = argparse.ArgumentParser(prog="python -m bench.validation_draws", description=__doc__.split("\n\n")[0])
    p.add_argument("--ground-truth", default=str(gtm.DEFAULT_OUT))
    p.add_argument("--losses", default="/tmp/validation_losses.npz", help="cache of the per-window losses")
    p.add_argument("--near", type=int, default=10)
    p.add_argument("--counts", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--draws", type=int, default=300)
    p.add_argument("--engine-seeds", type=int, default=5,
                   help="sampling seeds of the engine's own decision, with and without swaps (0: skip)")
    p.add_argument("--val-windows", type=int, default=MethodSpec().val_windows,
                   help="the engine's validation windows (its default)")
    p.add_argument("--race", action="store_true", help="instead: the raced decision over sampling seeds on real "
                   "per-window losses (python -m bench.validation_race --help for its options)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    gt = gtm.load(a.ground_truth)
    near_sets = {r for k in KS for r, _ in gt.optimum(k, top=a.near)}
    rows = draws(gt, losses(gt, near_sets, Path(a.losses)), a.near, a.counts, a.draws)
    label = {0: "calibration-best", -1: "best on testall"}
    lines = [f"{label.get(r['val_windows'], str(r['val_windows']) + ' val. windows'):>18} "
             f"{r['heldout']:7s} ({r['windows']} w.): mean ratio {r['mean_ratio']}, share <= 1.01 "
             f"{r['share_within_1pct']}, all k {r['share_all_k']:.2f} ({r['draws']} draws)" for r in rows]
    engine = engine_rule(gt, Path(a.losses), a.engine_seeds, a.near, a.val_windows) if a.engine_seeds else []
    for r in engine:
        lines.append(f"engine decision, seed {r['seed']}, swaps {r['swaps']}: testall ratio "
                     + ", ".join(f"k={k} {v:.4f}" for k, v in r["ratio"].items())
                     + f"; all k <= 1.01: {r['all_k']}; near-optimal sets among the candidates "
                     f"{r['near_among_candidates']}")
    return emit(lines, {"rows": rows, "near": a.near, "engine": engine, "val_windows": a.val_windows}, a.json)


if __name__ == "__main__":
    run_script(main)
