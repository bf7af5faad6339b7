"""GGUF export per weight type: file size, seconds and the perplexity of the file read back.

    .venv/bin/python -m bench.gguf_quant [--model smollm2] [--data demo] [--windows 4] [--seq-len 128]
        [--k 8] [--criterion block-influence] [--removed 3,5,...] [--quants f32,f16,q8_0,q4_1]
        [--out DIR] [--threads 0] [--json]

Loads the model once, takes the removal set (--removed, or --criterion's set at --k on the
calibration windows), then for every quant writes the pruned model with `engine.gguf_export.export_gguf`
(the code `engine export --format gguf` runs) into --out and reads it back in a fresh process with
transformers' GGUF loader. Reported per quant: size in MiB, export seconds (write + fresh-process
check), reloaded perplexity on the calibration windows and its difference relative to the pruned
model in memory (float32), and whether the check passed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.common import emit, run_script


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.gguf_quant", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data", default="demo")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--criterion", default="block-influence")
    p.add_argument("--removed", default=None, help="layers to remove (overrides --criterion)")
    p.add_argument("--quants", default="f32,f16,q8_0,q4_1")
    p.add_argument("--out", default=None, help="folder for the files (default: a temporary one, removed)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def run(args) -> dict:
    import torch

    from engine.baselines import run_baseline
    from engine.config import DataSpec, ModelSpec
    from engine.data import make_windows
    from engine.gguf_export import export_gguf
    from engine.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    t = time.monotonic()
    lm = load_model(ModelSpec(name=args.model))
    windows = make_windows(lm.tokenizer, DataSpec(source=args.data, n_windows=args.windows, seq_len=args.seq_len))
    load_s = time.monotonic() - t
    if args.removed:
        removed, how = tuple(int(x) for x in args.removed.split(",")), "by hand"
    else:
        removed, how = tuple(run_baseline(args.criterion, lm, windows, k_max=args.k).removed(args.k)), args.criterion
    rows = []
    with tempfile.TemporaryDirectory(prefix="gguf-quant-", dir=args.out) as tmp:
        folder = Path(args.out) if args.out else Path(tmp)
        for q in args.quants.split(","):
            t = time.monotonic()
            m = export_gguf(lm, removed, folder / f"pruned-{q}.gguf", q, verify_windows=windows.input_ids,
                            overwrite=True)
            v = m["verification"]
            rows.append({"quant": q, "size_mib": m["size_bytes"] / 2**20, "seconds": time.monotonic() - t,
                         "ppl_in_memory": v["ppl_in_memory"], "ppl_reloaded": v["ppl_reloaded"],
                         "rel_diff": v["ppl_rel_diff"], "allowed": m["reload_rtol"], "verified": v["ok"],
                         "tensor_types": m["tensor_types"], "fallback_tensors": m["fallback_tensors"]})
    return {"bench": "gguf_quant", "model": args.model, "identity": lm.identity, "n_layers": lm.n_layers,
            "removed": list(removed), "chosen_by": how, "windows": args.windows, "seq_len": args.seq_len,
            "load_s": load_s, "quants": rows}


def main(argv=None) -> dict:
    args = parse(argv)
    r = run(args)
    lines = [f"{r['model']}: layers {r['removed']} removed ({r['chosen_by']}), {r['windows']} x {r['seq_len']} tokens"]
    lines += [f"  {x['quant']:5} {x['size_mib']:7.1f} MiB {x['seconds']:6.0f} s  ppl {x['ppl_reloaded']:.4f} "
              f"(in memory {x['ppl_in_memory']:.4f}, rel {x['rel_diff']:.2e}, allowed {x['allowed']:.0e}) "
              f"{'verified' if x['verified'] else 'FAILED'}" for x in r["quants"]]
    return emit(lines, r, args.json)


if __name__ == "__main__":
    run_script(main)
