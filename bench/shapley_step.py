"""The paper's Shapley step on the surrogate: engine.shapley (vectorised) against the reference loop.

L = 32, strata keeping 30, 27, 24, 21, 18 layers, 80,000 base masks, surrogate = the paper's MLP
(Linear(32, 64) - CELU - Linear(64, 1) - Sigmoid) with random init (one Adam step on random data:
the timing does not depend on the weights).

  engine     engine.shapley.restricted_strata_semivalue(surrogate, ...): the surrogate is the
             value function; its flip_values kernel gives each base mask and its L one-layer
             flips without building the flipped masks (engine/surrogate.py).
  generic    the same estimator on surrogate.predict alone: (L+1) masks per base mask built and
             predicted in large batches (what any value function without a kernel gets).
  reference  REFERENCE APPROACH (the paper's public code, reimplemented here for comparison):
             for each layer i and each base mask m, f(m with i kept) - f(m with i dropped) as two
             separate network calls of batch 1 (.item() each). Timed on `--subset` base masks
             and extrapolated linearly to all of them.
Agreement: the reference loop runs on exactly the base masks the engine drew for a
`--subset`-mask estimate (recorded from its flip_values calls); both estimates must agree.
Each side is timed `--repeats` times (default 3); the medians are reported.

The engine uses the default thread pools of torch and numpy's BLAS (--threads N limits both;
the reference loop's batch-1 calls cannot use more than one core). Wall time on a machine shared with other jobs mostly measures
waiting for a core, so process CPU time is reported next to it.

Run: .venv/bin/python -m bench.shapley_step [--masks 80000] [--subset 500] [--layers 32]
     [--chunk 65536] [--threads N] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from bench.common import emit, run_script
from engine.sampling import default_strata
from engine.shapley import DEFAULT_CHUNK, restricted_strata_semivalue
from engine.surrogate import MLPSurrogate


def random_surrogate(L: int, seed: int = 0) -> MLPSurrogate:
    """The paper's MLP, practically at its random init (one Adam step on 64 random masks)."""
    rng = np.random.default_rng(seed)
    return MLPSurrogate(preset="adam", seed=seed, max_steps=1).fit(rng.random((64, L)) < 0.8, rng.random(64))


def reference_loop(net: torch.nn.Module, base_masks: np.ndarray) -> np.ndarray:
    """REFERENCE: per layer, per base mask, two batch-1 network calls; mean marginal, float[L]."""
    n, L = base_masks.shape
    out = np.zeros(L)
    with torch.no_grad():
        for i in range(L):
            acc = 0.0
            for s in range(n):
                with_i = base_masks[s].copy()
                with_i[i] = True
                without_i = base_masks[s].copy()
                without_i[i] = False
                f1 = net(torch.tensor(with_i, dtype=torch.float32).unsqueeze(0)).item()
                f0 = net(torch.tensor(without_i, dtype=torch.float32).unsqueeze(0)).item()
                acc += f1 - f0
            out[i] = acc / n
    return out


class Recording:
    """A surrogate as a value function that records the base masks the estimator draws."""

    def __init__(self, surrogate: MLPSurrogate):
        self.surrogate, self.bases = surrogate, []

    def __call__(self, masks):
        return self.surrogate(masks)

    def flip_values(self, base):
        self.bases.append(np.array(base, dtype=bool))
        return self.surrogate.flip_values(base)


def engine_base_masks(surrogate: MLPSurrogate, L: int, strata, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Run the engine's estimator on n base masks; return (its values, the base masks it drew)."""
    recording = Recording(surrogate)
    est = restricted_strata_semivalue(recording, L, strata, n_masks=n, seed=seed)
    return est.values, np.concatenate(recording.bases)


def timed(fn, repeats: int) -> tuple[object, float, float]:
    """(result, wall seconds, process CPU seconds) of fn(): the medians over `repeats` runs."""
    walls, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return out, float(np.median(walls)), float(np.median(cpus))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.shapley_step", description=__doc__.splitlines()[0])
    p.add_argument("--masks", type=int, default=80_000, help="base masks of the full estimate")
    p.add_argument("--subset", type=int, default=500, help="base masks the reference loop is timed on")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="masks per value-function call (engine's default)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--repeats", type=int, default=3, help="each side is timed this often; medians are reported")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:  # torch's threads and the BLAS/OpenMP pools numpy uses
        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)
    L = args.layers
    strata = default_strata(L)  # 32 -> (30, 27, 24, 21, 18), the paper's
    surrogate = random_surrogate(L)

    def engine_step(f):
        return restricted_strata_semivalue(f, L, strata, n_masks=args.masks, seed=0, chunk=args.chunk)

    engine_step(surrogate)  # warm-up: first-touch memory and lazy initialisation are not the step

    full, engine_s, engine_cpu = timed(lambda: engine_step(surrogate), args.repeats)
    generic, generic_s, generic_cpu = timed(lambda: engine_step(surrogate.predict), args.repeats)

    sub_values, base = engine_base_masks(surrogate, L, strata, args.subset, seed=0)
    reference_loop(surrogate.net, base[:10])  # warm-up
    with torch.no_grad():
        ref_values, ref_subset_s, ref_subset_cpu = timed(lambda: reference_loop(surrogate.net, base), args.repeats)
    ref_s = ref_subset_s * args.masks / args.subset  # linear in the number of base masks
    ref_cpu = ref_subset_cpu * args.masks / args.subset
    max_abs = float(np.max(np.abs(sub_values - ref_values)))
    scale = float(np.max(np.abs(ref_values)))
    agree = max_abs <= 1e-5 * max(scale, 1e-3)  # float32 network, float64 sums
    result = {
        "bench": "shapley_step",
        "ratio": ref_s / engine_s,
        "engine_seconds": engine_s,
        "reference_seconds": ref_s,
        "reference_seconds_measured": ref_subset_s,
        "reference_subset": args.subset,
        "cpu_ratio": ref_cpu / engine_cpu,
        "engine_cpu_seconds": engine_cpu,
        "reference_cpu_seconds": ref_cpu,
        "generic_seconds": generic_s,
        "generic_cpu_seconds": generic_cpu,
        "generic_ratio": ref_s / generic_s,
        "max_abs_diff_engine_vs_generic": float(np.max(np.abs(full.values - generic.values))),
        "chunk": args.chunk,
        "n_masks": args.masks,
        "n_layers": L,
        "strata": list(strata),
        "network_calls_engine": full.n_evaluations,
        "network_calls_reference": 2 * L * args.masks,
        "max_abs_diff_on_subset": max_abs,
        "max_abs_value_on_subset": scale,
        "agree": bool(agree),
        "threads": torch.get_num_threads(),
    }
    lines = [
        f"shapley_step: L={L}, strata {list(strata)}, {args.masks} base masks, paper MLP (random init)",
        f"  engine     {engine_s:10.3f} s  ({full.n_evaluations} masks through the surrogate's flip kernel, "
        f"{torch.get_num_threads()} threads)",
        f"  generic    {generic_s:10.3f} s  (the same masks built and predicted in batches: {ref_s / generic_s:.0f}x)",
        f"  reference  {ref_s:10.2f} s  extrapolated from {ref_subset_s:.2f} s on {args.subset} base masks "
        f"({2 * L * args.subset} batch-1 calls)",
        f"  ratio      {result['ratio']:.0f}x wall (engine over reference, same run); CPU time "
        f"{engine_cpu:.2f} s vs {ref_cpu:.2f} s: {result['cpu_ratio']:.0f}x",
        f"  agree on the subset: {agree} (max |difference| {max_abs:.2e}, largest |value| {scale:.2e})",
    ]
    return emit(lines, result, args.json)


if __name__ == "__main__":
    run_script(main)
