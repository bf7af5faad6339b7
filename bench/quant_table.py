"""After pruning: full, pruned and pruned+healed models, each exported as f16, q8_0 and q4_1 GGUF.

    .venv/bin/python -m bench.quant_table [--model demo] [--removed 2,3,7,10] [--quants f16,q8_0,q4_1]
        [--heal objective=distill,steps=300,...] [--tasks ...] [--limit 20] [--eval-data demo-test]
        [--eval-windows 64] [--out bench/results] [--files DIR] [--json]

One process: the model is loaded, healed once without `--removed` (engine.heal.heal_model, `engine
heal`'s code; `--heal` overrides HealSpec fields), and every (model, quant) is written with
engine.gguf_export.export_gguf (what `engine export --format gguf` runs, with its fresh-process reload
check), then loaded back from the file (transformers' GGUF loader, as `--model file.gguf` does) and
measured: file size; perplexity on the same held-out windows with the paired bootstrap interval of
its ratio to the full model's f16 file; zero-shot accuracy (lm-eval, engine.zeroshot, the first
`--limit` items of each task) per task with its standard error, the mean, and the paired difference
of the mean to the full f16 file. Writes <out>/quant_table_<model>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import emit, run_script

RESULTS = Path(__file__).resolve().parent / "results"


def parse(argv=None):
    from engine.config import ZEROSHOT_TASKS

    p = argparse.ArgumentParser(prog="python -m bench.quant_table", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--data", default="demo", help="calibration and healing text")
    p.add_argument("--removed", default="2,3,7,10", help="layers removed (default: the demo run's decision, k = 4)")
    p.add_argument("--quants", default="f16,q8_0,q4_1")
    p.add_argument("--heal", default="", help="HealSpec fields for the healed model, e.g. steps=300,objective=distill")
    p.add_argument("--healed", default=None, help="an `engine heal --out` folder of this model without --removed: "
                   "used as the healed model instead of healing here (its manifest's settings are reported)")
    p.add_argument("--tasks", default=",".join(ZEROSHOT_TASKS))
    p.add_argument("--limit", type=int, default=20, help="zero-shot items per task (0: no zero-shot)")
    p.add_argument("--eval-data", default="demo-test", help="held-out text for perplexity")
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--level", type=float, default=0.9)
    p.add_argument("--cache-dir", default=None, help="task data (default $LAYERPRUNE_CACHE)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--files", default=None, help="keep the GGUF files here (default: a temporary folder, removed)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    return a


def _nll(lm, windows):
    """(nll float64[W], tokens int64[W]) of a loaded model as it is (all its layers)."""
    from engine.heal import window_losses

    nll, tok, _ = window_losses(lm, windows, np.ones(lm.n_layers, dtype=bool))
    return nll, tok


def run(args) -> dict:
    import torch

    from bench.heal_recipe import parse_recipe
    from engine import heal as heal_lib
    from engine.config import HEAL_STEPS, DataSpec, ModelSpec, default_cache_dir, parse_names
    from engine.data import load_text, make_windows
    from engine.gguf_export import export_gguf
    from engine.models import load_model
    from engine.uncertainty import compare_candidates
    from engine.zeroshot import compare as zs_compare
    from engine.zeroshot import evaluate_model

    t0 = time.monotonic()
    torch.set_num_threads(args.threads)
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    tasks = parse_names(args.tasks)
    lm = load_model(ModelSpec(name=args.model))
    L = lm.n_layers
    removed = tuple(int(i) for i in args.removed.split(",")) if args.removed else ()
    kept = [i for i in range(L) if i not in set(removed)]
    data = DataSpec(source=args.data, seq_len=args.seq_len)
    verify = make_windows(lm.tokenizer, DataSpec(source=args.data, n_windows=4, seq_len=args.seq_len)).input_ids
    heldout = make_windows(lm.tokenizer, DataSpec(source=args.eval_data, n_windows=args.eval_windows,
                                                  seq_len=args.seq_len)).input_ids
    if args.healed:  # an export of `engine heal`: already pruned and healed
        from engine.export import MANIFEST

        manifest = json.loads((Path(args.healed) / MANIFEST).read_text())
        if manifest.get("removed_layers") != list(removed):
            raise SystemExit(f"--healed {args.healed} removed {manifest.get('removed_layers')}, not {list(removed)}")
        h = manifest["healing"]
        healed, healed_removed = load_model(ModelSpec(name=args.healed)), ()
        heal_info = {"spec": {k: h.get(k) for k in ("objective", "generated", "rank", "lr", "batch", "modules", "data")},
                     "steps": h["steps"], "train_seconds": h["seconds"], "from": str(Path(args.healed).resolve())}
    else:
        spec = parse_recipe(args.heal)
        text = load_text(args.data)
        heal_lib.check_overlap(args.data, text, {args.eval_data: load_text(args.eval_data)})
        hw = heal_lib.healing_windows(lm.tokenizer, text, spec.seq_len or data.seq_len, spec.held_back, spec.seed)
        healed, healed_removed = load_model(ModelSpec(name=args.model)), removed
        steps = heal_lib.total_steps(spec, len(hw.train), HEAL_STEPS)
        out = heal_lib.heal_model(healed, kept, hw, spec, steps)
        heal_info = {"spec": dict(spec.__dict__), "steps": steps, "train_seconds": round(out.seconds, 1)}
    variants = {"full": (lm, ()), "pruned": (lm, removed), "pruned+healed": (healed, healed_removed)}
    rows, nll, tok, zs = [], [], [], {}
    with tempfile.TemporaryDirectory(prefix="quant-table-", dir=args.files) as tmp:
        folder = Path(args.files) if args.files else Path(tmp)
        for name, (model, rem) in variants.items():
            for q in args.quants.split(","):
                t = time.monotonic()
                path = folder / f"{name.replace('+', '-')}-{q}.gguf"
                m = export_gguf(model, rem, path, q, verify_windows=verify, overwrite=True)
                export_s = time.monotonic() - t
                g = load_model(ModelSpec(name=str(path)))
                a, b = _nll(g, heldout)
                nll.append(a), tok.append(b)
                row = {"model": name, "quant": q, "n_layers": len(model.adapter.layers(model.model)) - len(rem), "size_mib": m["size_bytes"] / 2**20,
                       "export_seconds": round(export_s, 1), "verified": m["verification"]["ok"],
                       "ppl": float(np.exp(a.sum() / b.sum()))}
                if args.limit:
                    r = evaluate_model(g.model, g.tokenizer, tasks, cache, limit=args.limit)
                    zs[(name, q)] = r
                    row.update({"tasks": {t_: {"acc": s.acc, "stderr": s.stderr, "n": s.n} for t_, s in r.tasks.items()},
                                "mean_acc": r.mean, "mean_acc_stderr": r.mean_stderr, "zeroshot_seconds": r.seconds})
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "tasks"}), file=sys.stderr, flush=True)
                del g
    ref = next(i for i, r in enumerate(rows) if r["model"] == "full")
    cmp = compare_candidates([(i,) for i in range(len(rows))], np.stack(nll), np.stack(tok), level=args.level, seed=0,
                             chosen=ref)
    for i, r in enumerate(rows):
        r.update(ppl_vs_ref=cmp.ratio[i], ppl_vs_ref_low=cmp.ci_low[i], ppl_vs_ref_high=cmp.ci_high[i])
        if args.limit:
            d = zs_compare(zs[(r["model"], r["quant"])], zs[(rows[ref]["model"], rows[ref]["quant"])])["mean"]
            r.update(acc_vs_ref=d["diff"], acc_vs_ref_low=d["lo"], acc_vs_ref_high=d["hi"], acc_level=d["level"])
    result = {"bench": "quant_table", "model": args.model, "identity": lm.identity, "n_layers": L,
              "removed": list(removed), "healing": heal_info, "eval_data": args.eval_data,
              "eval_windows": int(heldout.shape[0]), "seq_len": args.seq_len, "tasks": list(tasks), "limit": args.limit,
              "reference": f"{rows[ref]['model']} {rows[ref]['quant']}", "level": args.level, "rows": rows,
              "seconds": round(time.monotonic() - t0, 1), "command": "python -m bench.quant_table " + " ".join(args.argv)}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"quant_table_{Path(args.model).name}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text("\n".join(_table(result)) + "\n")
    result["files"] = [str(stem.with_suffix(".json")), str(stem.with_suffix(".md"))]
    return result


def _table(r) -> list[str]:
    pct = f"{r['level']:.0%}"
    h = r["healing"]
    lines = [f"# Quantized after pruning: {r['model']} ({r['n_layers']} layers), without {', '.join(map(str, r['removed']))}",
             "", f"Command: `{r['command']}` ({r['seconds']:.0f} s wall; 2 CPU cores shared with other sessions).", "",
             f"Healed: {h['steps']} LoRA steps ({', '.join(f'{k}={v}' for k, v in h['spec'].items() if k in ('objective', 'generated', 'rank', 'lr', 'batch', 'modules'))}), "
             f"{h['train_seconds']:.0f} s of training. Perplexity: {r['eval_windows']} windows of {r['seq_len']} tokens of "
             f"{r['eval_data']}, read back from each GGUF file; `vs {r['reference']}`: perplexity ratio to that file "
             f"with its {pct} paired bootstrap interval over the same windows."
             + (f" Zero-shot: lm-eval acc on the first {r['limit']} items of each of {len(r['tasks'])} tasks; mean ± "
                "its standard error; `acc - ref`: the mean's paired difference to the reference with its 95% "
                "stratified paired bootstrap interval." if r["limit"] else ""), ""]
    zs = bool(r["limit"])
    head = "| model | quant | layers | MiB | perplexity | vs ref (interval) |" + (" mean acc | acc - ref (95%) |" if zs else "")
    lines += [head, "|---|---|---:|---:|---:|---|" + ("---:|---|" if zs else "")]
    for x in r["rows"]:
        line = (f"| {x['model']} | {x['quant']} | {x['n_layers']} | {x['size_mib']:.1f} | {x['ppl']:.2f} | "
                f"{x['ppl_vs_ref']:.3f} ({x['ppl_vs_ref_low']:.3f}-{x['ppl_vs_ref_high']:.3f}) |")
        if zs:
            line += (f" {x['mean_acc']:.3f} ± {x['mean_acc_stderr']:.3f} | {x['acc_vs_ref']:+.3f} "
                     f"[{x['acc_vs_ref_low']:+.3f}, {x['acc_vs_ref_high']:+.3f}] |")
        lines.append(line)
    if zs:
        tasks = r["tasks"]
        lines += ["", "Per task (acc ± stderr, n = " + str(r["rows"][0]["tasks"][tasks[0]]["n"]) + " each):", "",
                  "| model | quant | " + " | ".join(tasks) + " |", "|---|---|" + "---:|" * len(tasks)]
        for x in r["rows"]:
            lines.append(f"| {x['model']} | {x['quant']} | " + " | ".join(
                f"{x['tasks'][t]['acc']:.3f} ± {x['tasks'][t]['stderr']:.3f}" for t in tasks) + " |")
    return lines


def main(argv=None) -> dict:
    a = parse(argv)
    r = run(a)
    return emit(_table(r), r, a.json)


if __name__ == "__main__":
    run_script(main)
