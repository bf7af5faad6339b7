"""Masks per second: this engine (prefix sharing, real skipping) against the reference approach.

The same stratified masks (engine.sampling, default strata, seed 0) are evaluated by
  engine     engine.evaluate.MaskEvaluator (default settings), and
  reference  bench.common.ZeroingReference: zero the dropped layers' weights, run the full
             model, restore, one mask at a time (what the paper's public code does).
Both must give the same perplexities (max relative difference reported; a zeroed pre-norm
layer is an exact identity, checked on the first mask). The reference is timed in two halves,
before and after the engine, so a drift in machine load affects both sides alike.

Also reported: the floor for the prefix-sharing approach, count_prefix_computations(masks) x
(time of one layer call) + n_masks x (time of one head + loss), the engine's measured time over
that floor, the bound reference / floor (the best ratio any prefix-sharing evaluator can reach
on these masks with these kernels), and the engine's layer_calls (must equal the count).

With --reference-masks N the reference runs on N evenly spaced masks only and its time is
scaled by n / N: its work per mask does not depend on the mask (every layer always runs), so
larger mask counts (where prefix sharing saves more) can be compared in reasonable time.

Run: .venv/bin/python -m bench.mask_eval [--masks 256] [--model demo] [--windows 8]
     [--seq-len 128] [--device cpu] [--dtype float32] [--threads N] [--reference-masks N]
     [--compile] [--json]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from bench.common import ZeroingReference, emit, median_seconds, sync, run_script
from engine.config import DataSpec, ModelSpec, SamplingSpec
from engine.data import make_windows
from engine.evaluate import MaskEvaluator, count_prefix_computations
from engine.models import LoadedModel, load_model
from engine.sampling import sample_masks

# Perplexities must agree to this relative tolerance (float32); half precision rounds differently
# in the chunked head of the engine and the one-shot logits of the reference.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}


@dataclass(frozen=True)
class MaskEvalResult:
    """One engine-vs-reference comparison (seconds are wall time over all masks)."""

    ratio: float  # engine masks/s over reference masks/s
    engine_seconds: float
    reference_seconds: float  # for all n masks (scaled from reference_masks when fewer ran)
    reference_masks: int  # masks the reference actually ran (n unless --reference-masks)
    reference_seconds_measured: float
    cpu_ratio: float  # the same ratio in process CPU time (robust to a busy machine; CPU devices)
    engine_cpu_seconds: float
    reference_cpu_seconds: float
    engine_masks_per_s: float
    reference_masks_per_s: float
    n_masks: int
    n_layers: int
    kept_layers: int  # sum of kept layers over all masks (layer calls without sharing, with skipping)
    prefix_computations: int  # distinct (prefix, next kept layer) pairs
    layer_calls: int  # what the engine actually ran
    layer_call_seconds: float  # median time of one layer call on all windows
    head_loss_seconds: float  # median time of one final norm + head + loss on all windows
    floor_seconds: float  # prefix_computations x layer call + n_masks x head+loss
    measured_over_floor: float
    layer_call_cpu_seconds: float  # the same three in process CPU time
    head_loss_cpu_seconds: float
    floor_cpu_seconds: float
    measured_over_floor_cpu: float
    ratio_bound: float  # reference / floor: the best ratio prefix sharing can reach on these masks
    ratio_bound_cpu: float
    compiled: bool  # engine layers through torch.compile
    compile_seconds: float  # its one-time compilation (warm-up, not in engine_seconds)
    max_rel_diff: float  # engine vs reference perplexities
    tolerance: float
    agree: bool
    zeroed_identity_max_abs: float  # |out - in| of zeroed layers (reference), first mask
    ppl_full: float
    n_windows: int
    seq_len: int
    device: str
    dtype: str


def compare(lm: LoadedModel, input_ids: torch.Tensor, masks: np.ndarray, unit_repeats: int = 5,
            reference_masks: int | None = None, compile: bool = False) -> MaskEvalResult:
    """Evaluate `masks` with the engine and the reference on `input_ids` (n, T); time both.

    reference_masks: run the reference on only this many masks (evenly spaced) and scale its
    time by n / reference_masks. Valid because the reference's work does not depend on the
    mask (it always runs every layer).
    compile: the engine's layers through torch.compile; the compilation happens in the warm-up
    and is reported as compile_seconds, outside the timed evaluation."""
    device = lm.device
    masks = np.asarray(masks, dtype=bool)
    n = len(masks)
    dtype = next(lm.model.parameters()).dtype
    n_ref = n if not reference_masks or reference_masks >= n else reference_masks
    ref_idx = np.linspace(0, n - 1, n_ref).round().astype(int)  # the masks the reference runs
    ref_masks = masks[ref_idx]
    half = n_ref // 2

    reference = ZeroingReference(lm, input_ids)
    identity_err = reference.zeroed_identity_error(masks[0])
    reference.perplexity(masks[0])  # warm-up

    t0, c0 = time.perf_counter(), time.process_time()
    ref_a = reference.perplexities(ref_masks[:half])
    sync(device)
    ref_seconds, ref_cpu = time.perf_counter() - t0, time.process_time() - c0

    t0 = time.perf_counter()
    evaluator = MaskEvaluator(lm, input_ids, compile=compile)
    with torch.inference_mode():  # warm-up; with compile=True this compiles every layer
        for j in range(lm.n_layers):
            evaluator._layer(j, evaluator._root)
    evaluator.perplexities(masks[:2])
    compile_seconds = time.perf_counter() - t0 if compile else 0.0
    # Unit costs for the floor. The private pieces are the engine's own steps: one layer call
    # (_layer, on all windows) and one leaf (_leaf_nll: final norm + head + loss).
    root = evaluator._root  # (n, T, d): embedding output
    layers = [0, lm.n_layers // 2, lm.n_layers - 1]
    with torch.inference_mode():  # as in the engine's own loop
        layer_t = np.array([median_seconds(lambda j=j: evaluator._layer(j, root), unit_repeats, device)
                            for j in layers])  # (3, wall/cpu)
        layer_s, layer_cpu = np.median(layer_t, axis=0)
        head_s, head_cpu = median_seconds(lambda: evaluator._leaf_nll(root), unit_repeats, device)
    evaluator.layer_calls = 0
    t0, c0 = time.perf_counter(), time.process_time()
    eng = evaluator.perplexities(masks)
    sync(device)
    eng_seconds, eng_cpu = time.perf_counter() - t0, time.process_time() - c0
    layer_calls = evaluator.layer_calls

    t0, c0 = time.perf_counter(), time.process_time()
    ref_b = reference.perplexities(ref_masks[half:])
    sync(device)
    ref_seconds += time.perf_counter() - t0
    ref_cpu += time.process_time() - c0
    ref = np.concatenate([ref_a, ref_b])
    ref_measured = ref_seconds
    ref_seconds, ref_cpu = ref_seconds * n / n_ref, ref_cpu * n / n_ref  # = measured when n_ref == n

    eng_on_ref = eng[ref_idx]
    finite = np.isfinite(ref) & np.isfinite(eng_on_ref)
    same_nonfinite = bool(np.array_equal(np.isfinite(ref), np.isfinite(eng_on_ref)))
    rel = np.abs(eng_on_ref[finite] - ref[finite]) / np.abs(ref[finite])
    max_rel = float(rel.max()) if rel.size else 0.0
    tol = TOLERANCE.get(dtype, 1e-2)
    count = count_prefix_computations(masks)
    floor = count * layer_s + n * head_s
    floor_cpu = count * layer_cpu + n * head_cpu
    return MaskEvalResult(
        ratio=ref_seconds / eng_seconds,
        engine_seconds=eng_seconds,
        reference_seconds=ref_seconds,
        reference_masks=n_ref,
        reference_seconds_measured=ref_measured,
        cpu_ratio=ref_cpu / max(eng_cpu, 1e-9),
        engine_cpu_seconds=eng_cpu,
        reference_cpu_seconds=ref_cpu,
        engine_masks_per_s=n / eng_seconds,
        reference_masks_per_s=n / ref_seconds,
        n_masks=n,
        n_layers=lm.n_layers,
        kept_layers=int(masks.sum()),
        prefix_computations=count,
        layer_calls=layer_calls,
        layer_call_seconds=float(layer_s),
        head_loss_seconds=head_s,
        floor_seconds=float(floor),
        measured_over_floor=float(eng_seconds / floor),
        layer_call_cpu_seconds=float(layer_cpu),
        head_loss_cpu_seconds=head_cpu,
        floor_cpu_seconds=float(floor_cpu),
        measured_over_floor_cpu=float(eng_cpu / max(floor_cpu, 1e-9)),
        ratio_bound=float(ref_seconds / floor),
        ratio_bound_cpu=float(ref_cpu / max(floor_cpu, 1e-9)),
        compiled=compile,
        compile_seconds=compile_seconds,
        max_rel_diff=max_rel,
        tolerance=tol,
        agree=same_nonfinite and max_rel <= tol,
        zeroed_identity_max_abs=identity_err,
        ppl_full=float(evaluator.ppl_full),
        n_windows=int(input_ids.shape[0]),
        seq_len=int(input_ids.shape[1]),
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
    )


def report_lines(r: MaskEvalResult, title: str) -> list[str]:
    return [
        f"{title}: {r.n_masks} masks, {r.n_layers} layers, {r.n_windows} x {r.seq_len} tokens, {r.device} {r.dtype}",
        f"  engine     {r.engine_seconds:8.2f} s  {r.engine_masks_per_s:8.2f} masks/s"
        + (f"  (torch.compile; {r.compile_seconds:.1f} s compiling in the warm-up, not included)" if r.compiled else ""),
        f"  reference  {r.reference_seconds:8.2f} s  {r.reference_masks_per_s:8.2f} masks/s  (zero weights, full model"
        + (")" if r.reference_masks == r.n_masks else
           f"; {r.reference_seconds_measured:.2f} s measured on {r.reference_masks} of the masks, scaled)"),
        f"  ratio      {r.ratio:.2f}x (engine over reference, same run); CPU time {r.engine_cpu_seconds:.2f} s vs "
        f"{r.reference_cpu_seconds:.2f} s: {r.cpu_ratio:.2f}x",
        f"  floor      {r.floor_seconds:8.2f} s = {r.prefix_computations} prefix computations x "
        f"{r.layer_call_seconds * 1e3:.2f} ms + {r.n_masks} x {r.head_loss_seconds * 1e3:.2f} ms head+loss; "
        f"measured/floor {r.measured_over_floor:.2f}",
        f"  CPU floor  {r.floor_cpu_seconds:8.2f} s = {r.prefix_computations} x {r.layer_call_cpu_seconds * 1e3:.2f} ms + "
        f"{r.n_masks} x {r.head_loss_cpu_seconds * 1e3:.2f} ms; measured/floor in CPU time {r.measured_over_floor_cpu:.2f}",
        f"  bound      reference / floor = {r.ratio_bound:.2f}x wall, {r.ratio_bound_cpu:.2f}x CPU: the most that "
        f"counting allows on these masks (no overhead at all)",
        f"  layer calls {r.layer_calls} (kept layers without sharing {r.kept_layers})",
        f"  perplexities agree: {r.agree} (max relative difference {r.max_rel_diff:.2e}, tolerance {r.tolerance:g}); "
        f"zeroed layer |out - in| max {r.zeroed_identity_max_abs:g}",
    ]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.mask_eval", description=__doc__.splitlines()[0])
    p.add_argument("--masks", type=int, default=256, help="stratified masks (default strata, seed 0)")
    p.add_argument("--model", default="demo", help="demo, a local folder or a hub id")
    p.add_argument("--windows", type=int, default=8, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per window")
    p.add_argument("--data", default="demo", help="calibration text (engine.data sources)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--compile", action="store_true", help="engine layers through torch.compile (needs a C++ compiler)")
    p.add_argument("--reference-masks", type=int, default=0,
                   help="run the reference on this many (evenly spaced) masks and scale its time (0 = all)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lm = load_model(ModelSpec(name=args.model, dtype=args.dtype, device=args.device))
    windows = make_windows(lm.tokenizer, DataSpec(source=args.data, n_windows=args.windows, seq_len=args.seq_len))
    masks = sample_masks(SamplingSpec(n_masks=args.masks, seed=0), lm.n_layers)  # (n, L)
    r = compare(lm, windows.input_ids, masks, reference_masks=args.reference_masks or None, compile=args.compile)
    result = {"bench": "mask_eval", "model": args.model, "threads": torch.get_num_threads(), **asdict(r)}
    return emit(report_lines(r, f"mask_eval ({args.model})"), result, args.json)


if __name__ == "__main__":
    run_script(main)
