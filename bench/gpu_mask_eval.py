"""Masks per second of the engine against the reference approach on a Llama-2-7B-shaped model.

For a lent accelerator: a random-weight Llama with Llama-2-7B's shape (32 layers, hidden 4096,
32 heads, MLP 11008, vocab 32000) in bf16 on CUDA, `--windows` x `--seq-len` random token ids,
N stratified masks (default strata, seed 0); same comparison as bench/mask_eval.py (engine vs
zero-weights reference, perplexity agreement, floor). Appends a dated section with the machine
(torch.cuda.get_device_name) to bench/README.md (`--readme`, or `--no-readme`).

`--small` uses a 4-layer, hidden-64 shape so it runs on a CPU (tests/test_bench.py does).

Run: .venv/bin/python -m bench.gpu_mask_eval [--masks 256] [--device cuda] [--dtype bfloat16]
     [--windows 10] [--seq-len 128] [--small] [--readme bench/README.md | --no-readme] [--json]
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
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


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
    masks = sample_masks(SamplingSpec(n_masks=args.masks, seed=0), lm.n_layers)  # (n, L)
    r = compare(lm, ids, masks)
    where = machine(args.device)
    title = f"gpu_mask_eval ({'small' if args.small else 'Llama-2-7B shape'}, random weights)"
    lines = report_lines(r, title) + [f"  machine    {where}; model built in {build_s:.1f} s"]
    result = {"bench": "gpu_mask_eval", "shape": shape, "machine": where, "build_seconds": build_s, **asdict(r)}
    if not args.no_readme:
        when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        command = "python -m bench.gpu_mask_eval " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
        with open(args.readme, "a", encoding="utf-8") as f:
            f.write(readme_section(lines, when, where, command.strip()))
    return emit(lines, result, args.json)


if __name__ == "__main__":
    run_script(main)
