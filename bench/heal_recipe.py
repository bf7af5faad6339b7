"""Healing recipes on one pruned set: which settings win back the held-out perplexity, and how fast.

Each recipe (HealSpec fields as `name=value,...`) heals a fresh copy of the model without `--removed`
with engine.heal.heal_model (what `engine heal` runs) on the calibration text, and is measured on the
same held-out windows (demo-test, demo-ood by default) before and after: perplexity, the after/before
ratio with its paired bootstrap interval (heal.compare), `recovered` (share of the perplexity lost to
pruning won back), and the training seconds. Recipes run one after another in this process, so their
seconds compare as ratios (one torch thread each).

Usage: python -m bench.heal_recipe --removed 2,3,7,10 --recipe objective=lm,steps=100 --recipe objective=distill,steps=300
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from bench.common import run_script


def parse_recipe(text: str):
    from engine.config import HealSpec

    fields = {f.name: f for f in dataclasses.fields(HealSpec)}
    kw = {}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        if name not in fields:
            raise SystemExit(f"unknown HealSpec field {name!r} in --recipe {text!r}; fields: {', '.join(fields)}")
        default = fields[name].default
        kw[name] = value if isinstance(default, str) or name == "data" else (
            int(value) if "int" in str(fields[name].type) else float(value))
    return HealSpec(**kw)


def run(args) -> dict:
    import torch

    from engine import heal as heal_lib
    from engine.config import HEAL_STEPS, DataSpec, ModelSpec
    from engine.data import load_text, make_windows
    from engine.decision import removal_mask
    from engine.models import load_model

    torch.set_num_threads(args.threads)
    lm = load_model(ModelSpec(name=args.model))
    L = lm.n_layers
    removed = tuple(int(i) for i in args.removed.split(","))
    kept = [i for i in range(L) if i not in set(removed)]
    mask = removal_mask(removed, L)
    data = DataSpec(source=args.data, seq_len=args.seq_len)
    text = load_text(args.data)
    heal_lib.check_overlap(args.data, text, {n: load_text(n) for n in args.eval_data})
    evals = {n: make_windows(lm.tokenizer, dataclasses.replace(data, source=n, n_windows=args.eval_windows)).input_ids
             for n in args.eval_data}
    before = {n: heal_lib.window_losses(lm, w, mask) for n, w in evals.items()}
    rows = []
    for recipe in args.recipe:
        spec = parse_recipe(recipe)
        hw = heal_lib.healing_windows(lm.tokenizer, text, spec.seq_len or args.seq_len, spec.held_back, spec.seed)
        steps = heal_lib.total_steps(spec, len(hw.train), HEAL_STEPS)
        fresh = load_model(ModelSpec(name=args.model))
        t = time.monotonic()
        out = heal_lib.heal_model(fresh, kept, hw, spec, steps)
        secs = time.monotonic() - t
        row = {"recipe": recipe, "steps": steps, "seconds": round(secs, 1), "train_seconds": round(out.seconds, 1),
               "trainable_params": out.trainable_params, "loss_first": out.loss_first, "loss_last": out.loss_last}
        for n, w in evals.items():
            after = heal_lib.window_losses(fresh, w, mask)
            row[n] = heal_lib.compare(before[n][:2], after[:2], before[n][2], args.level)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return {"model": args.model, "removed": list(removed), "eval_windows": args.eval_windows, "rows": rows,
            "command": "python -m bench.heal_recipe " + " ".join(args.argv)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.heal_recipe", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--data", default="demo", help="healing text")
    p.add_argument("--eval-data", nargs="*", default=["demo-test", "demo-ood"])
    p.add_argument("--removed", default="2,3,7,10", help="the set (default: the product's decision at k = 4 on the demo)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-windows", type=int, default=128)
    p.add_argument("--recipe", action="append", required=True, help="HealSpec fields, e.g. objective=distill,steps=300")
    p.add_argument("--level", type=float, default=0.9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    result = run(a)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    run_script(main)
