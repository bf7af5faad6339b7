"""Mask evaluation at real depth: 32-, 40- and 80-layer models (scaled down in width) at 256 / 1,024 / 8,000 masks.

For each depth L a random-weight Llama with L layers is built in memory (the layer counts of
Llama-2-7B / 13B / 70B; width scaled down to --hidden so it runs on a CPU here) and, for each mask
count n, the default stratified design (engine.sampling, seed 0) is drawn. Reported per (L, n):

  layer calls per mask   count_prefix_computations(masks) / n (exact; the reference makes L)
  engine masks/s         MaskEvaluator (prefix sharing, depth-first) on all n masks
  batched masks/s        MaskEvaluator(batch_masks=True) on the same masks (perplexities checked
                         against the depth-first walk on the first 64)
  reference masks/s      bench.common.ZeroingReference (zeroed weights, full depth), in the same run,
                         on --reference-masks evenly spaced masks, time scaled by n / that number
                         (its work per mask does not depend on the mask); said in the output
  ratio                  engine over reference masks/s
  measured / floor       engine time over the counting floor: layer calls x one layer call +
                         n x one head+loss (bench.mask_eval.compare; 1.0 = no overhead at all)

Timing every count at every depth takes long on 2 CPU cores (8,000 masks at L = 80 are 363k layer
calls); `--timed` picks the counts that are timed (default 256,1024), the others are counted only.
The defaults take about 4 min of CPU time (14 min wall on this 2-core machine at load ~7). On a
loaded machine read the floor ratio in CPU time (`measured_over_floor_cpu`): wall-clock unit costs
and the timed walk see different shares of the CPU.

Run: .venv/bin/python -m bench.depth [--depths 32,40,80] [--masks 256,1024,8000] [--timed 256,1024]
     [--hidden 64] [--windows 4] [--seq-len 64] [--reference-masks 32] [--threads 1] [--no-batched]
     [--breakdown] [--json]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench.common import emit, run_script
from bench.mask_eval import compare
from engine.config import ModelSpec, SamplingSpec
from engine.evaluate import MaskEvaluator, count_prefix_computations
from engine.models import LoadedModel, wrap_model
from engine.sampling import sample_masks

SHAPED_LIKE = {32: "Llama-2-7B", 40: "Llama-2-13B", 80: "Llama-2-70B"}
FFN_RATIO = 11008 / 4096  # Llama-2's MLP width over its hidden size


def build_model(n_layers: int, hidden: int, vocab: int = 1024, seed: int = 0) -> LoadedModel:
    """A random-weight LlamaForCausalLM with n_layers layers of width `hidden` (float32, CPU)."""
    torch.manual_seed(seed)
    config = LlamaConfig(num_hidden_layers=n_layers, hidden_size=hidden, intermediate_size=round(hidden * FFN_RATIO),
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=1024,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    name = f"random-L{n_layers}-h{hidden}"
    return wrap_model(model, spec=ModelSpec(name=name), identity=f"random:{name}:{seed}")


CHECKED = 64  # masks on which the batched walk's perplexities are compared with the depth-first walk


def time_batched(lm: LoadedModel, ids: torch.Tensor, masks: np.ndarray) -> dict:
    """The batched walk on the same masks: seconds, calls, states per call, and its largest relative
    difference from the depth-first walk on the first CHECKED masks (a third full pass would double
    the run time here)."""
    ev = MaskEvaluator(lm, ids, batch_masks=True)
    ev.perplexities(masks[:2])  # warm-up (records the k-state arguments it needs)
    ev.layer_calls = ev.batched_calls = 0
    t0 = time.perf_counter()
    got = ev.perplexities(masks)
    seconds = time.perf_counter() - t0
    ref = MaskEvaluator(lm, ids).perplexities(masks[:CHECKED])
    rel = float(np.max(np.abs(got[:CHECKED] - ref) / np.abs(ref)))
    return {"batched_seconds": seconds, "batched_masks_per_s": len(masks) / seconds,
            "batched_layer_calls": ev.layer_calls, "batched_calls": ev.batched_calls,
            "batch_states": ev.batch_states, "batched_max_rel_diff": rel}


def walk_breakdown(lm: LoadedModel, ids: torch.Tensor, masks: np.ndarray, repeats: int = 300) -> dict:
    """Process CPU time of one depth-first walk split into: inside its layer calls, inside its leaves
    (final norm + head + loss), and the rest (the walk itself); next to the floor's unit costs, one
    layer (n_layers // 2) called `repeats` times in a row on the same input, and one leaf likewise."""
    ev = MaskEvaluator(lm, ids)
    ev.perplexities(masks[:2])  # warm-up
    with torch.inference_mode():
        c = time.process_time()
        for _ in range(repeats):
            ev._layer(lm.n_layers // 2, ev._root)
        unit_layer = (time.process_time() - c) / repeats
        c = time.process_time()
        for _ in range(max(1, repeats // 3)):
            ev._leaf_nll(ev._root)
        unit_leaf = (time.process_time() - c) / max(1, repeats // 3)
    spent = {"layer": 0.0, "leaf": 0.0}
    layer, leaf = ev._layer, ev._leaf_nll

    def timed(name, fn):
        def call(*a):
            c = time.process_time()
            try:
                return fn(*a)
            finally:
                spent[name] += time.process_time() - c
        return call

    ev._layer, ev._leaf_nll = timed("layer", layer), timed("leaf", leaf)  # instance attributes shadow the methods
    ev.layer_calls = 0
    c = time.process_time()
    ev.perplexities(masks)
    total = time.process_time() - c
    calls, n = ev.layer_calls, len(masks)
    return {"walk_cpu_seconds": total, "in_layer_calls_cpu_seconds": spent["layer"],
            "in_leaves_cpu_seconds": spent["leaf"], "rest_cpu_seconds": total - spent["layer"] - spent["leaf"],
            "layer_call_cpu_in_walk": spent["layer"] / calls, "layer_call_cpu_repeated": unit_layer,
            "leaf_cpu_in_walk": spent["leaf"] / n, "leaf_cpu_repeated": unit_leaf,
            "floor_cpu_seconds_repeated_units": calls * unit_layer + n * unit_leaf}


def parse_args(argv=None) -> argparse.Namespace:
    ints = lambda text: tuple(int(x) for x in text.split(",") if x.strip())  # noqa: E731
    p = argparse.ArgumentParser(prog="python -m bench.depth", description=__doc__.splitlines()[0])
    p.add_argument("--depths", type=ints, default=(32, 40, 80))
    p.add_argument("--masks", type=ints, default=(256, 1024, 8000))
    p.add_argument("--timed", type=ints, default=(256, 1024), help="mask counts that are timed (others: counted)")
    p.add_argument("--hidden", type=int, default=64, help="model width (scaled down from 4096-8192)")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--reference-masks", type=int, default=32, help="masks the reference runs (time scaled)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--no-batched", action="store_true", help="skip the batch_masks timing")
    p.add_argument("--breakdown", action="store_true",
                   help="also split one walk's CPU time: inside layer calls, inside leaves, the rest")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    rows, lines = [], []
    lines.append(f"depth: random-weight Llama, hidden {args.hidden}, {args.windows} x {args.seq_len} tokens, "
                 f"{args.threads} torch thread(s); reference on {args.reference_masks} evenly spaced masks, scaled")
    lines.append(f"{'L':>3} {'masks':>6} {'calls/mask':>10} {'engine/s':>9} {'batched/s':>9} {'ref/s':>8} "
                 f"{'ratio':>6} {'meas/floor':>10} {'(CPU time)':>10} {'bound':>6}")
    for L in args.depths:
        lm = build_model(L, args.hidden)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 1024, (args.windows, args.seq_len), generator=g)  # (n, T)
        for n in args.masks:
            masks = sample_masks(SamplingSpec(n_masks=n, seed=0), L)  # (n, L)
            count = count_prefix_computations(masks)
            extra: list[str] = []
            row = {"n_layers": L, "shaped_like": SHAPED_LIKE.get(L), "n_masks": n, "prefix_computations": count,
                   "layer_calls_per_mask": count / n, "reference_layer_calls_per_mask": L, "timed": n in args.timed}
            if n in args.timed:
                r = compare(lm, ids, masks, reference_masks=min(n, args.reference_masks))
                if not r.agree:
                    raise SystemExit(f"engine and reference disagree at L={L}, n={n}: {r.max_rel_diff:.2e}")
                row.update({k: v for k, v in asdict(r).items() if k not in ("n_masks", "n_layers")})
                if not args.no_batched:
                    row.update(time_batched(lm, ids, masks))
                if args.breakdown:
                    b = walk_breakdown(lm, ids, masks)
                    row["breakdown"] = b
                    extra.append(
                        f"    breakdown (CPU): walk {b['walk_cpu_seconds']:.2f} s = layer calls "
                        f"{b['in_layer_calls_cpu_seconds']:.2f} s ({b['layer_call_cpu_in_walk'] * 1e3:.3f} ms each; "
                        f"repeated {b['layer_call_cpu_repeated'] * 1e3:.3f}) + leaves {b['in_leaves_cpu_seconds']:.2f} s "
                        f"({b['leaf_cpu_in_walk'] * 1e3:.3f} ms; repeated {b['leaf_cpu_repeated'] * 1e3:.3f}) + rest "
                        f"{b['rest_cpu_seconds']:.2f} s")
            rows.append(row)
            if row["timed"]:
                lines.append(f"{L:>3} {n:>6} {row['layer_calls_per_mask']:>10.2f} {row['engine_masks_per_s']:>9.1f} "
                             f"{row.get('batched_masks_per_s', float('nan')):>9.1f} {row['reference_masks_per_s']:>8.1f} "
                             f"{row['ratio']:>5.2f}x {row['measured_over_floor']:>10.2f} "
                             f"{row['measured_over_floor_cpu']:>10.2f} {row['ratio_bound']:>5.2f}x")
            else:
                lines.append(f"{L:>3} {n:>6} {row['layer_calls_per_mask']:>10.2f}   (counted, not timed)")
            lines += extra
    seconds = time.perf_counter() - t_start
    lines.append(f"calls/mask: layer calls per mask with prefix sharing (the reference makes L); ratio: engine over "
                 f"reference masks/s; meas/floor: engine time over its counting floor; bound: reference / floor. "
                 f"Total {seconds:.0f} s.")
    result = {"bench": "depth", "hidden": args.hidden, "windows": args.windows, "seq_len": args.seq_len,
              "threads": args.threads, "reference_masks": args.reference_masks, "seconds": seconds, "rows": rows}
    return emit(lines, result, args.json)


if __name__ == "__main__":
    run_script(main)
