"""Masks per second of the engine against the reference approach on a Llama-2-7B-shaped model.

For a lent accelerator: a random-weight Llama with Llama-2-7B's shape (32 layers, hidden 4096,
32 heads, MLP 11008, vocab 32000) in bf16 on CUDA, `--windows` x `--seq-len` random token ids,
N stratified masks (default strata, seed 0); same comparison as bench/mask_eval.py (engine vs
zero-weights reference, perplexity agreement, floor). Appends a dated section with the machine
(torch.cuda.get_device_name) to bench/README.md (`--readme`, or `--no-readme`).

`--small` uses a 4-layer, hidden-64 shape so it runs on a CPU (tests/test_bench.py does).

`--depth` is bench/depth.py's measurement on this model: for each count in `--depth-masks`
(default 256,1024,8000): layer calls per mask, engine masks/s (depth-first), engine masks/s with
`batch_masks` (sibling trie nodes as one batched layer call, states bounded by the free GPU
memory), reference masks/s on `--reference-masks` evenly spaced masks (time scaled, said in the
output), and the engine's time over its counting floor. For a GPU: bfloat16, loss in float32.

Run: .venv/bin/python -m bench.gpu_mask_eval [--masks 256] [--device cuda] [--dtype bfloat16]
     [--windows 10] [--seq-len 128] [--small] [--readme bench/README.md | --no-readme] [--json]
     .venv/bin/python -m bench.gpu_mask_eval --depth [--depth-masks 256,1024,8000] [--reference-masks 64]
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench.common import emit, run_script
from bench.mask_eval import compare, report_lines
from engine.config import ModelSpec, SamplingSpec
from engine.models import wrap_model
from engine.sampling import sample_masks

LLAMA2_7B = dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=32,
                 intermediate_size=11008, vocab_size=32000)
SMALL = dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
             intermediate_size=128, vocab_size=512)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def build_model(shape: dict, device: str, dtype: torch.dtype, seed: int = 0):
    """A random-weight LlamaForCausalLM of `shape`, created directly on `device` in `dtype`."""
    torch.manual_seed(seed)
    config = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    name = "llama-2-7b-shaped" if shape is LLAMA2_7B else "small"
    return wrap_model(model, spec=ModelSpec(name=name, dtype=str(dtype).removeprefix("torch."), device=device),
                      identity=f"random:{name}:{seed}")


def machine(device: str) -> str:
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name(torch.device(device))} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads (torch {torch.__version__})"


def readme_section(lines: list[str], when: str, where: str, command: str) -> str:
    body = "\n".join(lines)
    return f"\n### gpu_mask_eval, {when}\n\nMachine: {where}. Command: `{command}`\n\n```\n{body}\n```\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_mask_eval", description=__doc__.splitlines()[0])
    p.add_argument("--masks", type=int, default=256)
    p.add_argument("--windows", type=int, default=10)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--small", action="store_true", help="4 layers, hidden 64 (CPU-sized test shape)")
    p.add_argument("--readme", default=str(Path(__file__).with_name("README.md")), help="append the figures here")
    p.add_argument("--no-readme", action="store_true", help="do not write the README section")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--depth", action="store_true", help="bench/depth.py's table on this model (see above)")
    p.add_argument("--depth-masks", default="256,1024,8000", help="--depth: mask counts")
    p.add_argument("--reference-masks", type=int, default=64, help="--depth: masks the reference runs (scaled)")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def depth_rows(lm, ids: torch.Tensor, counts: list[int], reference_masks: int) -> tuple[list[dict], list[str]]:
    """bench/depth.py's per-count measurement on `lm` (engine, batched engine, subsampled reference)."""
    import numpy as np

    from bench.depth import time_batched
    from engine.evaluate import count_prefix_computations

    rows, lines = [], [f"{'masks':>6} {'calls/mask':>10} {'engine/s':>9} {'batched/s':>9} {'ref/s':>8} {'ratio':>6} "
                       f"{'meas/floor':>10} {'states/call':>11}"]
    for n in counts:
        masks = sample_masks(SamplingSpec(n_masks=n, seed=0), lm.n_layers)  # (n, L)
        r = compare(lm, ids, masks, reference_masks=min(n, reference_masks))
        b = time_batched(lm, ids, masks)
        row = {"n_masks": n, "layer_calls_per_mask": count_prefix_computations(masks) / n, **asdict(r), **b}
        rows.append(row)
        lines.append(f"{n:>6} {row['layer_calls_per_mask']:>10.2f} {r.engine_masks_per_s:>9.2f} "
                     f"{b['batched_masks_per_s']:>9.2f} {r.reference_masks_per_s:>8.2f} {r.ratio:>5.2f}x "
                     f"{r.measured_over_floor:>10.2f} {b['batch_states']:>11}")
        if not (r.agree and np.isfinite(b["batched_max_rel_diff"])):
            lines.append(f"  perplexities disagree at {n} masks (max rel diff {r.max_rel_diff:.2e})")
    lines.append(f"reference on {reference_masks} evenly spaced masks per count, time scaled to all masks")
    return rows, lines


def main(argv=None) -> dict:
    args = parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available here; pass --device cpu --small to run the CPU-sized shape")
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = SMALL if args.small else LLAMA2_7B
    t0 = time.perf_counter()
    lm = build_model(shape, args.device, DTYPES[args.dtype])
    build_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (args.windows, args.seq_len), generator=g)  # (n, T)
    where = machine(args.device)
    title = f"gpu_mask_eval ({'small' if args.small else 'Llama-2-7B shape'}, random weights)"
    if args.depth:
        counts = [int(x) for x in args.depth_masks.split(",") if x.strip()]
        rows, table = depth_rows(lm, ids, counts, args.reference_masks)
        lines = [f"{title}, --depth: {lm.n_layers} layers, {args.windows} x {args.seq_len} tokens, {args.dtype}",
                 *table, f"  machine    {where}; model built in {build_s:.1f} s"]
        result = {"bench": "gpu_mask_eval", "mode": "depth", "shape": shape, "machine": where,
                  "build_seconds": build_s, "dtype": args.dtype, "rows": rows}
        if not args.no_readme:
            _append_readme(args, argv, lines, where)
        return emit(lines, result, args.json)
    masks = sample_masks(SamplingSpec(n_masks=args.masks, seed=0), lm.n_layers)  # (n, L)
    r = compare(lm, ids, masks)
    lines = report_lines(r, title) + [f"  machine    {where}; model built in {build_s:.1f} s"]
    result = {"bench": "gpu_mask_eval", "shape": shape, "machine": where, "build_seconds": build_s, **asdict(r)}
    if not args.no_readme:
        _append_readme(args, argv, lines, where)
    return emit(lines, result, args.json)


def _append_readme(args, argv, lines: list[str], where: str) -> None:
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python -m bench.gpu_mask_eval " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    with open(args.readme, "a", encoding="utf-8") as f:
        f.write(readme_section(lines, when, where, command.strip()))


if __name__ == "__main__":
    run_script(main)
