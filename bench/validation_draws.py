"""How many validation windows does the decision need? Validation draws against the whole held-out text.

    .venv/bin/python -m bench.validation_draws [--losses /tmp/validation_losses.npz] [--draws 300]
        [--counts 16 32 64 128] [--near 10] [--json]

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

KS = (2, 4, 6, 8)


def _free(lm, spec) -> int:
    from engine.data import validation_windows

    return int(validation_windows(lm.tokenizer, spec, 10**9, at_most=True).input_ids.shape[0])


def losses(gt: gtm.GroundTruth, near: int, path: Path) -> dict:
    """{split: (nll float[c, W], tokens int[c, W])} and the candidate sets, computed once and cached."""
    import torch

    from engine import decision as decision_lib
    from engine.config import DataSpec, ModelSpec
    from engine.data import make_windows, validation_windows
    from engine.evaluate import MaskEvaluator
    from engine.models import load_model

    if path.exists():
        z = np.load(path)
        return {k: z[k] for k in z.files}
    torch.set_num_threads(1)
    lm = load_model(ModelSpec(name=gt.meta["model"]))
    cal = DataSpec(source=gt.meta["data"], n_windows=gt.meta["n_windows"], seq_len=gt.meta["seq_len"])
    test = dataclasses.replace(cal, source="demo-test")
    sets = sorted({r for k in KS for r, _ in gt.optimum(k, top=near)})
    masks = np.stack([decision_lib.removal_mask(s, gt.n_layers) for s in sets])  # (c, L)
    splits = {"val": validation_windows(lm.tokenizer, cal, _free(lm, cal)), "test8": make_windows(lm.tokenizer, test),
              "testall": validation_windows(lm.tokenizer, test, _free(lm, test))}
    out = {"sets": np.array([",".join(map(str, s)) for s in sets])}
    for name, w in splits.items():
        out[name + "_nll"], out[name + "_tok"] = MaskEvaluator(lm, w).window_losses(masks)
        print(f"{name}: {out[name + '_nll'].shape}", file=sys.stderr, flush=True)
    np.savez(path, **out)
    return out


def draws(gt: gtm.GroundTruth, d: dict, near: int, counts, n_draws: int) -> list[dict]:
    sets = [tuple(int(x) for x in s.split(",")) if s else () for s in d["sets"]]
    index = {s: i for i, s in enumerate(sets)}

    def ppl(name, rows, cols=None):
        nll, tok = d[name + "_nll"][rows], d[name + "_tok"][rows]
        if cols is not None:
            nll, tok = nll[:, cols], tok[:, cols]
        return np.exp(nll.sum(1) / tok.sum(1))

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

    p = argparse.ArgumentParser(prog="python -m bench.validation_draws", description=__doc__.split("\n\n")[0])
    p.add_argument("--ground-truth", default=str(gtm.DEFAULT_OUT))
    p.add_argument("--losses", default="/tmp/validation_losses.npz", help="cache of the per-window losses")
    p.add_argument("--near", type=int, default=10)
    p.add_argument("--counts", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--draws", type=int, default=300)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    gt = gtm.load(a.ground_truth)
    rows = draws(gt, losses(gt, a.near, Path(a.losses)), a.near, a.counts, a.draws)
    label = {0: "calibration-best", -1: "best on testall"}
    lines = [f"{label.get(r['val_windows'], str(r['val_windows']) + ' val. windows'):>18} "
             f"{r['heldout']:7s} ({r['windows']} w.): mean ratio {r['mean_ratio']}, share <= 1.01 "
             f"{r['share_within_1pct']}, all k {r['share_all_k']:.2f} ({r['draws']} draws)" for r in rows]
    return emit(lines, {"rows": rows, "near": a.near}, a.json)


if __name__ == "__main__":
    run_script(main)
