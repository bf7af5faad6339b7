"""Ray workers on this machine: speedup of 2 workers over 1 on the same masks, and Ray's overhead per mask.

A random-weight Llama (--layers, --hidden; saved to a temporary folder so the workers can load it,
as they would a real model) and N stratified masks (default strata, seed 0). On one local Ray
cluster (`ray.init(num_cpus=--cpus)`), the same masks are evaluated by
  local      MaskEvaluator in this process (the single-process engine, --threads-per-worker threads),
  1 worker   RayEvaluator(workers=1), and
  2 workers  RayEvaluator(workers=2), each actor with --threads-per-worker torch threads.
Each evaluator is timed from the first task submitted to the last result received (actor start-up,
which loads the model, is reported separately). Perplexities must equal the local ones (rtol 1e-6).

  speedup              1-worker seconds / 2-worker seconds (target >= 1.6 on 2 cores)
  overhead_s_per_mask  (1-worker seconds - local seconds) / N: splitting, scheduling, shipping masks
                       and results through Ray, per mask (same work, same thread count); on a loaded
                       machine the two runs see different loads, so also:
  idle_s_per_mask      (workers x seconds - the actors' summed time inside their tasks) / N: time an
                       actor had no task (start of the run, scheduling, results in transit, the tail)

The machine's load average is printed before and after: on a shared 2-core machine the other
processes take CPU time from the workers, so the speedup measures what was available, not Ray.

Run: .venv/bin/python -m bench.workers [--masks 512] [--layers 16] [--hidden 128] [--windows 8]
     [--seq-len 128] [--cpus 2] [--threads-per-worker 1] [--json]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import emit, run_script
from engine.config import EvalSpec, ModelSpec, SamplingSpec
from engine.evaluate import MaskEvaluator
from engine.models import load_model
from engine.sampling import sample_masks

ROOT = Path(__file__).resolve().parents[1]


def save_random_llama(folder: Path, n_layers: int, hidden: int, vocab: int = 1024, seed: int = 0) -> Path:
    """A random-weight Llama saved with save_pretrained, with a byte-level tokenizer (no downloads)."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    config = LlamaConfig(num_hidden_layers=n_layers, hidden_size=hidden, intermediate_size=round(hidden * 11008 / 4096),
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=1024,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "<eos>": 1}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>").save_pretrained(folder)
    return folder


def timed_ray(lm, ids, masks, workers: int, threads: int) -> dict:
    from engine.distributed import RayEvaluator

    t0 = time.perf_counter()
    with RayEvaluator(lm, ids, EvalSpec(workers=workers), threads=threads) as ev:
        startup = time.perf_counter() - t0
        t0 = time.perf_counter()
        ppl = ev.perplexities(masks)
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "startup_seconds": startup, "ppl": ppl, "layer_calls": ev.layer_calls,
                "busy_seconds": ev.busy_seconds, "idle_s_per_mask": (workers * seconds - ev.busy_seconds) / len(masks),
                "pids": len(ev.pids), "actor_startup_seconds": [round(i["startup_seconds"], 2) for i in ev.info]}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__.splitlines()[0])
    p.add_argument("--masks", type=int, default=512)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    p.add_argument("--threads-per-worker", type=int, default=1, help="torch threads in each worker and locally")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    import ray

    args = parse_args(argv)
    torch.set_num_threads(args.threads_per_worker)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        folder = save_random_llama(Path(tmp) / "model", args.layers, args.hidden)
        lm = load_model(ModelSpec(name=str(folder)))
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(2, 1024, (args.windows, args.seq_len), generator=g)  # (n, T)
        masks = sample_masks(SamplingSpec(n_masks=args.masks, seed=0), lm.n_layers)  # (N, L)

        local = MaskEvaluator(lm, ids)
        local.perplexities(masks[:2])  # warm-up
        local.layer_calls = 0
        t0 = time.perf_counter()
        local_ppl = local.perplexities(masks)
        local_s = time.perf_counter() - t0

        env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads_per_worker)}
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": env})
        try:
            one = timed_ray(lm, ids, masks, 1, args.threads_per_worker)
            two = timed_ray(lm, ids, masks, 2, args.threads_per_worker)
        finally:
            ray.shutdown()
    load_after = os.getloadavg()
    for r in (one, two):
        np.testing.assert_allclose(r.pop("ppl"), local_ppl, rtol=1e-6)
    speedup = one["seconds"] / two["seconds"]
    overhead = (one["seconds"] - local_s) / args.masks
    result = {
        "bench": "workers", "speedup": speedup, "overhead_s_per_mask": overhead,
        "local_seconds": local_s, "one_worker": one, "two_workers": two, "local_layer_calls": local.layer_calls,
        "n_masks": args.masks, "n_layers": args.layers, "hidden": args.hidden, "windows": args.windows,
        "seq_len": args.seq_len, "cpus": args.cpus, "threads_per_worker": args.threads_per_worker,
        "os_cpu_count": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": load_after,
    }
    lines = [
        f"workers: {args.masks} masks, random Llama {args.layers} layers x hidden {args.hidden}, "
        f"{args.windows} x {args.seq_len} tokens, {args.threads_per_worker} torch thread(s) per worker, "
        f"Ray cluster of {args.cpus} CPUs on a {os.cpu_count()}-core machine",
        f"  local      {local_s:7.2f} s  {args.masks / local_s:6.1f} masks/s  ({local.layer_calls} layer calls)",
        f"  1 worker   {one['seconds']:7.2f} s  {args.masks / one['seconds']:6.1f} masks/s  ({one['layer_calls']} layer "
        f"calls; start-up {one['startup_seconds']:.1f} s)",
        f"  2 workers  {two['seconds']:7.2f} s  {args.masks / two['seconds']:6.1f} masks/s  ({two['layer_calls']} layer "
        f"calls; start-up {two['startup_seconds']:.1f} s)",
        f"  speedup    {speedup:.2f}x (2 workers over 1); overhead {overhead * 1e3:.2f} ms/mask (1 worker over local)",
        f"  idle       {one['idle_s_per_mask'] * 1e3:.2f} ms/mask (1 worker), {two['idle_s_per_mask'] * 1e3:.2f} ms/mask "
        f"(2 workers): actor time outside tasks",
        f"  load average before {load_before[0]:.1f}, after {load_after[0]:.1f} (1 min; 2 cores shared with other work)",
    ]
    return emit(lines, result, args.json)


if __name__ == "__main__":
    run_script(main)
