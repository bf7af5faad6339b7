"""Healing side by side: the product's decision and the strongest baselines, before and after LoRA.

For each k: the set `engine run` decides (the default pipeline on the model's calibration text, run
store in --cache-dir), and the sets of the two strongest baselines by held-out perplexity on the demo
(block-influence, sleb: bench/results/compare.md); each healed with the same budget (steps, text,
seed: engine.heal.heal_model, what `engine heal` runs) and measured on the same held-out windows
before and after. Paired intervals: each set's healed/unhealed ratio, and every row against the
product's healed set (uncertainty.compare_candidates, a bootstrap over the same windows).
Writes bench/results/heal.md and heal.csv; ``--json`` prints the result as the last line.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import emit, run_script

RESULTS = Path(__file__).resolve().parent / "results"
BASELINES = ("block-influence", "sleb")
PRODUCT = "product"


def _sets(args, lm, windows, ks) -> dict[tuple[str, int], tuple[int, ...]]:
    """{(method, k): removed set}: the pipeline's decision (a real run) and the baselines' sets."""
    from engine import pipeline
    from engine.baselines import run_baseline
    from engine.config import EvalSpec, MethodSpec, RunSpec, SamplingSpec
    from engine.errors import WorkbenchError

    spec = RunSpec(model=dataclasses.replace(RunSpec().model, name=args.model),
                   data=dataclasses.replace(RunSpec().data, source=args.data, seq_len=args.seq_len),
                   sampling=SamplingSpec(n_masks=args.n_masks))
    method = MethodSpec(remove=max(ks), ks=tuple(ks))  # the decision decides only the k it is asked for
    evaluation = EvalSpec(threads=args.threads)
    try:  # the run's stored decisions when current (what `engine run --remove K` stored), else the whole run
        run = pipeline.open_run(spec, args.cache_dir, evaluation, create=False, loaded=(lm, windows))
        art = pipeline.stored(run, "decisions", method)
    except WorkbenchError:
        art = None
    if art is None or art["stale"] or not set(ks) <= set(art["ks"]):
        r = pipeline.run_all(spec, method, cache_dir=args.cache_dir, progress=False, evaluation=evaluation)
        run_id, by_k = r["run_id"], r["by_k"]
    else:
        run_id, by_k = run.run_id, art["decisions"]
    sets = {(PRODUCT, d["k"]): tuple(d["removed"]) for d in by_k if d["k"] in ks}
    for name in args.baselines:
        b = run_baseline(name, lm, windows, k_max=max(ks))
        sets.update({(name, k): tuple(int(i) for i in b.removed(k)) for k in ks})
    return sets, run_id


def _heal_one(args, removed, hw, evals, spec):
    """Load a fresh model, measure the set on every split, heal it, measure again."""
    from engine import heal as heal_lib
    from engine.config import ModelSpec
    from engine.decision import removal_mask
    from engine.models import load_model

    lm = load_model(ModelSpec(name=args.model))
    L = lm.n_layers
    mask = removal_mask(removed, L)
    splits = {"held back": hw.held_back, **evals}
    before = {n: heal_lib.window_losses(lm, w, mask) for n, w in splits.items()}
    out = heal_lib.heal_model(lm, [i for i in range(L) if i not in set(removed)], hw, spec, spec.steps)
    after = {n: heal_lib.window_losses(lm, w, mask) for n, w in splits.items()}
    return before, after, out


def run(args) -> dict:
    import torch

    from engine import heal as heal_lib
    from engine.config import HEAL_STEPS, DataSpec, HealSpec, ModelSpec
    from engine.data import load_text, make_windows
    from engine.models import load_model
    from engine.uncertainty import compare_candidates

    t0 = time.monotonic()
    torch.set_num_threads(args.threads)
    lm = load_model(ModelSpec(name=args.model))
    data = DataSpec(source=args.data, seq_len=args.seq_len)
    windows = make_windows(lm.tokenizer, data)
    ks = sorted(set(args.ks))
    sets, run_id = _sets(args, lm, windows, ks)
    t_sets = time.monotonic() - t0
    spec = HealSpec(steps=args.steps or HEAL_STEPS, lr=args.lr, batch=args.batch, seed=args.seed)
    heal_text = load_text(args.data)
    heal_lib.check_overlap(args.data, heal_text, {n: load_text(n) for n in args.eval_data})
    hw = heal_lib.healing_windows(lm.tokenizer, heal_text, data.seq_len, spec.held_back, spec.seed)
    evals = {}
    for name in args.eval_data:
        n_tok = len(lm.tokenizer(load_text(name), add_special_tokens=False)["input_ids"])
        n = min(args.eval_windows or n_tok // data.seq_len, n_tok // data.seq_len)
        evals[name] = make_windows(lm.tokenizer, dataclasses.replace(data, source=name, n_windows=n)).input_ids
    healed = {}  # removed set -> (before, after, outcome); a set two methods share is healed once
    for (m, k), removed in sets.items():
        if removed in healed:
            continue
        if not args.json:
            print(f"healing k={k} {m} {list(removed)} ...", file=sys.stderr, flush=True)
        t = time.monotonic()
        healed[removed] = (*_heal_one(args, removed, hw, evals, spec), time.monotonic() - t)
    rows = []
    split_names = ["held back", *args.eval_data]
    for k in ks:
        methods = [m for (m, kk) in sets if kk == k]
        for name in split_names:
            # every (method, before/after) on the same windows: paired ratios to the product's healed set
            labels, nll, tok = [], [], []
            for m in methods:
                b, a, _, _ = healed[sets[(m, k)]]
                labels += [(m, "pruned"), (m, "healed")]
                nll += [b[name][0], a[name][0]]
                tok += [b[name][1], a[name][1]]
            ref = labels.index((PRODUCT, "healed"))
            cmp = compare_candidates([(i,) for i in range(len(labels))], np.stack(nll), np.stack(tok), level=args.level,
                                     seed=0, chosen=ref)
            for m in methods:
                b, a, out, secs = healed[sets[(m, k)]]
                own = heal_lib.compare(b[name][:2], a[name][:2], b[name][2], args.level)
                i = labels.index((m, "healed"))
                j = labels.index((m, "pruned"))
                rows.append({
                    "k": k, "method": m, "removed": " ".join(map(str, sets[(m, k)])), "split": name,
                    "n_windows": own["n_windows"], "ppl_full": own["ppl_full"], "ppl_pruned": own["ppl_before"],
                    "ppl_healed": own["ppl_after"], "healed_over_pruned": own["ratio"],
                    "healed_over_pruned_low": own["ratio_low"], "healed_over_pruned_high": own["ratio_high"],
                    "recovered": own["recovered"],
                    "pruned_vs_product_pruned": cmp.ratio[j] / cmp.ratio[labels.index((PRODUCT, "pruned"))],
                    "healed_vs_product_healed": cmp.ratio[i], "healed_vs_product_low": cmp.ci_low[i],
                    "healed_vs_product_high": cmp.ci_high[i], "steps": out.steps, "train_seconds": round(out.seconds, 1),
                    "seconds": round(secs, 1), "loss_first": out.loss_first, "loss_last": out.loss_last,
                })
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, csv_path = out_dir / "heal.md", out_dir / "heal.csv"
    lines = _table(args, rows, ks, split_names, spec, run_id, time.monotonic() - t0, t_sets)
    md.write_text("\n".join(lines) + "\n")
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return {"rows": rows, "files": [str(md), str(csv_path)], "run_id": run_id, "steps": spec.steps, "lr": spec.lr,
            "batch": spec.batch, "seconds": round(time.monotonic() - t0, 1), "sets_seconds": round(t_sets, 1),
            "command": "python -m bench.heal " + " ".join(args.argv)}


def _f(x, d=2) -> str:
    return "" if x is None else f"{x:.{d}f}"


def _table(args, rows, ks, splits, spec, run_id, seconds, t_sets) -> list[str]:
    pct = f"{args.level:.0%}"
    lines = [
        f"# Healing after pruning on {args.model} (LoRA r={spec.rank}, {spec.steps} steps, lr {spec.lr:g}, batch "
        f"{spec.batch} x {args.seq_len} tokens of {args.data}"
        + (f" + {spec.generated} windows sampled from the full model" if spec.generated else "")
        + f", objective {spec.objective}, seed {spec.seed})", "",
        f"Command: `python -m bench.heal {' '.join(args.argv)}` ({seconds:.0f} s wall in all, {t_sets:.0f} s of it for "
        f"the run {run_id} and the baselines; 2 CPU cores shared with other sessions, one torch thread).", "",
        f"`product`: the set `engine run` decides (default settings, {args.n_masks} masks); baselines: the two "
        "strongest on the demo's held-out text (bench/results/compare.md). Every set is healed with the same budget "
        "(steps, text, seed) and measured on the same windows before and after. `healed/pruned`: the set's "
        f"perplexity ratio after/before healing with its {pct} paired bootstrap interval over the windows; "
        "`recovered`: share of the perplexity lost to pruning that healing won back (1 = the full model's); "
        f"`vs product healed`: the healed set's perplexity over the product's healed set's ({pct} paired interval; "
        "> 1: the product's set is better after healing).", "",
    ]
    for name in splits:
        sub = [r for r in rows if r["split"] == name]
        lines += [f"## {name} ({sub[0]['n_windows']} windows of {args.seq_len} tokens, full model {sub[0]['ppl_full']:.2f})", "",
                  "| k | method | removed | pruned | healed | healed/pruned | recovered | vs product healed | steps | "
                  "train s |", "|---:|---|---|---:|---:|---|---:|---|---:|---:|"]
        for r in sub:
            lines.append(
                f"| {r['k']} | {r['method']} | {r['removed']} | {_f(r['ppl_pruned'])} | {_f(r['ppl_healed'])} | "
                f"{_f(r['healed_over_pruned'], 3)} ({_f(r['healed_over_pruned_low'], 3)}-"
                f"{_f(r['healed_over_pruned_high'], 3)}) | {_f(r['recovered'], 2)} | "
                f"{_f(r['healed_vs_product_healed'], 3)} ({_f(r['healed_vs_product_low'], 3)}-"
                f"{_f(r['healed_vs_product_high'], 3)}) | {r['steps']} | {r['train_seconds']:.0f} |")
        lines.append("")
    return lines


def parse(argv=None):
    from engine.config import HEAL_LR

    p = argparse.ArgumentParser(prog="python -m bench.heal", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--data", default="demo", help="calibration and healing text")
    p.add_argument("--eval-data", nargs="*", default=None, help="held-out texts (default demo-test demo-ood)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per window (calibration, healing, held-out)")
    p.add_argument("--eval-windows", type=int, default=128, help="windows per held-out text (0: all)")
    p.add_argument("--ks", type=int, nargs="*", default=[4, 8])
    p.add_argument("--baselines", nargs="*", default=list(BASELINES))
    p.add_argument("--n-masks", type=int, default=256, help="masks of the product's run")
    p.add_argument("--steps", type=int, default=None, help="healing steps of every set (default engine's)")
    p.add_argument("--lr", type=float, default=HEAL_LR)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--level", type=float, default=0.9)
    p.add_argument("--cache-dir", default=None, help="run store of the product's run (default $LAYERPRUNE_CACHE)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    if a.eval_data is None:
        a.eval_data = ["demo-test", "demo-ood"] if a.data == "demo" else []
    return a


def main(argv=None) -> dict:
    a = parse(argv)
    result = run(a)
    return emit([Path(result["files"][0]).read_text()], result, a.json)


if __name__ == "__main__":
    run_script(main)
