"""The whole workflow on the real 30-layer model (SmolLM2-135M-Instruct): costs at real depth and the
product's removal sets against the cheap baselines' on held-out and out-of-domain text.

    .venv/bin/python -m bench.real [--model smollm2] [--data demo] [--windows 4] [--seq-len 128]
        [--masks 128] [--swaps 2] [--n-compare 10] [--val-windows 64] [--ensemble 5] [--boot 20] [--ks 4,6,8,10]
        [--eval-data demo-test,demo-ood] [--eval-windows 32] [--baselines block-influence,angular,ppl]
        [--threads 0] [--cache-dir DIR] [--json]

1. `engine run` (pipeline.run_all, in this process) with --remove max(ks) and the given sampling
   and decision options. Each stage (model load + windows, sample, fit, contributions, decide) is
   timed and its peak resident memory read from /proc/self/status VmHWM, reset before the stage
   (/proc/self/clear_refs; the figure is the process's peak during the stage, the loaded model
   included). `stages_s` and `stages_peak_mib` report them.
2. Sampling cost: masks/s, decoder-layer calls per mask as made, against the counting floor
   (fidelity.count_prefix_computations: the fewest layer calls prefix sharing allows for these
   masks) and against L (what evaluating each mask from scratch costs).
3. Every baseline in --baselines on the calibration windows (timed), its removal set at each k; a
   baseline already stored in the run (`engine baselines --criterion sleb --k-max 10`, or the
   decision's own candidates) is read, not rerun (`baselines_stored`), and one computed here is stored.
   Stored before this bench runs, it is also one of the decision's candidates.
4. On each held-out text (--eval-windows windows of seq_len tokens): per-window losses of the full
   model, the product's set and each baseline's set at every k, all in one prefix-shared call.
   `uncertainty.compare_candidates` (the decision's own paired bootstrap over windows) gives each
   baseline's perplexity ratio to the product's set with a 90% interval. The product is
   `best_or_tied` at k when no baseline's set is better with its interval excluding 1.

JSON (last line): stages_s, stages_peak_mib, sampling {...}, baselines_s, by_k (on the first
--eval-data text: [{k, product_removed, product_ppl, baselines {name: ppl}, baseline_sets,
ratio_to_product {name: [ratio, lo, hi]}, best_baseline, product_best_or_tied}]), by_k_<split> for
every held-out text, full_ppl {split: ppl}, command, settings. The machine was shared: timings are
one run on 2 cores with other jobs.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import emit, run_script

LEVEL = 0.9


def _hwm_mib() -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) / 1024


def _reset_hwm() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS
    except OSError:
        pass


class StageMeter:
    """Wraps pipeline functions so each call records (seconds, peak MiB) under a stage name."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.peak: dict[str, float] = {}
        self.returned: dict[str, object] = {}  # the last value each stage returned

    def wrap(self, module, attr: str, stage: str):
        fn = getattr(module, attr)

        def timed(*a, **k):
            _reset_hwm()
            t = time.monotonic()
            try:
                self.returned[stage] = fn(*a, **k)
                return self.returned[stage]
            finally:
                self.seconds[stage] = round(self.seconds.get(stage, 0.0) + time.monotonic() - t, 2)
                self.peak[stage] = round(max(self.peak.get(stage, 0.0), _hwm_mib()), 1)

        setattr(module, attr, timed)
        return fn


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.real", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data", default="demo")
    p.add_argument("--windows", type=int, default=4, help="calibration windows (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--masks", type=int, default=128)
    p.add_argument("--scheme", default="stratified")
    p.add_argument("--swaps", type=int, default=None, help="decision swap rounds (default: MethodSpec's)")
    p.add_argument("--n-compare", type=int, default=None, help="decision candidates per k (default: MethodSpec's)")
    p.add_argument("--val-windows", type=int, default=None, help="decision validation windows (default: MethodSpec's)")
    p.add_argument("--ensemble", type=int, default=None, help="surrogate ensemble size (default: SurrogateSpec's)")
    p.add_argument("--boot", type=int, default=None, help="bootstrap refits for intervals (default: MethodSpec's)")
    p.add_argument("--ks", default="4,6,8,10", help="layers removed, compared (default %(default)s)")
    p.add_argument("--eval-data", default="demo-test,demo-ood")
    p.add_argument("--eval-windows", type=int, default=32, help="windows per held-out text (default %(default)s)")
    p.add_argument("--baselines", default="block-influence,angular,ppl",
                   help="cheap criteria compared (add sleb when affordable: ~14 min on this model here)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    p.add_argument("--cache-dir", default=None, help="run store (default $LAYERPRUNE_CACHE or ./cache)")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def run(args) -> dict:
    from engine import pipeline
    from engine.baselines import run_baseline
    from engine.config import DataSpec, EvalSpec, MethodSpec, ModelSpec, RunSpec, SamplingSpec
    from engine.data import make_windows
    from engine.decision import removal_mask
    from engine.evaluate import MaskEvaluator
    from engine.fidelity import count_prefix_computations
    from engine.pipeline.stages import _baseline_removed
    from engine.uncertainty import compare_candidates

    ks = [int(x) for x in args.ks.split(",")]
    splits = [s for s in args.eval_data.split(",") if s]
    names = [b for b in args.baselines.split(",") if b]
    spec = RunSpec(model=ModelSpec(name=args.model),
                   data=DataSpec(source=args.data, n_windows=args.windows, seq_len=args.seq_len),
                   sampling=SamplingSpec(scheme=args.scheme, n_masks=args.masks))
    overrides = {k: v for k, v in (("swaps", args.swaps), ("n_compare", args.n_compare),
                                   ("val_windows", args.val_windows), ("boot", args.boot)) if v is not None}
    mspec = dataclasses.replace(MethodSpec(remove=max(ks), ks=tuple(ks)), **overrides)  # decide every k asked for
    if args.ensemble is not None:
        mspec = dataclasses.replace(mspec, surrogate=dataclasses.replace(mspec.surrogate, ensemble=args.ensemble))
    evaluation = EvalSpec(threads=args.threads or None)

    meter = StageMeter()
    stages = importlib.import_module("engine.pipeline.exporting")  # where run_all looks its stages up
    originals = [(stages, a, meter.wrap(stages, a, s)) for a, s in
                 (("open_run", "load"), ("sample", "sample"), ("_fit", "fit"), ("_contributions", "contributions"),
                  ("_decide", "decide"))]
    t0 = time.monotonic()
    try:
        result = pipeline.run_all(spec, mspec, cache_dir=args.cache_dir, progress=True, json_mode=True,
                                  evaluation=evaluation)
    finally:
        for module, attr, fn in originals:
            setattr(module, attr, fn)
    run_wall = time.monotonic() - t0
    run_ = meter.returned["load"]  # the run engine run opened (model and calibration windows)
    lm, L = run_.lm, run_.n_layers
    masks = run_.store.table().masks  # (n, L)
    floor = count_prefix_computations(masks)
    s = result["sampling"]
    sampling = {"n_masks": int(len(masks)), "evaluated_now": int(result["evaluated"]),
                "seconds": meter.seconds.get("sample"),
                "masks_per_s": (result["evaluated"] / meter.seconds["sample"]) if result["evaluated"] else None,
                "layer_calls": s.get("layer_calls"),
                "layer_calls_per_mask": (s["layer_calls"] / result["evaluated"]) if result["evaluated"] else None,
                "floor_layer_calls_per_mask": floor / len(masks), "from_scratch_layer_calls_per_mask": L}
    product = {x["k"]: tuple(x["removed"]) for x in result["by_k"]}
    sources = {x["k"]: x.get("source") for x in result["by_k"]}  # where each set came from

    baseline_s, sets, baseline_stored = {}, {}, []
    for name in names:
        t = time.monotonic()
        stored = run_.store.get_artifact(f"baseline:{name}")  # `engine baselines` (or the decision) stored it
        if stored is not None and all(_baseline_removed(stored, k) is not None for k in ks):
            sets[name] = {k: _baseline_removed(stored, k) for k in ks}
            baseline_stored.append(name)
        else:
            r = run_baseline(name, lm, run_.windows, k_max=max(ks))
            run_.store.put_artifact(f"baseline:{name}", r.to_json())  # a rerun (or the app) finds it
            sets[name] = {k: tuple(int(i) for i in r.removed(k)) for k in ks}
        baseline_s[name] = round(time.monotonic() - t, 2)
        print(f"baseline {name}: {baseline_s[name]:.0f} s{' (stored)' if name in baseline_stored else ''}",
              file=sys.stderr, flush=True)

    tables, full_ppl = {}, {}
    for split in splits:
        windows = make_windows(lm.tokenizer, DataSpec(source=split, n_windows=args.eval_windows, seq_len=args.seq_len))
        cands = list(dict.fromkeys([()] + [product[k] for k in ks] + [sets[n][k] for n in names for k in ks]))
        ev = MaskEvaluator(lm, windows)
        nll, tok = ev.window_losses(np.stack([removal_mask(c, L) for c in cands]))  # (c, W) each
        index = {c: i for i, c in enumerate(cands)}
        ppl = np.exp(nll.sum(1) / tok.sum(1))
        full_ppl[split] = float(ppl[index[()]])
        rows = []
        for k in ks:
            mine = [product[k]] + [sets[n][k] for n in names]
            sub = [index[c] for c in mine]
            cmp = compare_candidates(mine, nll[sub], tok[sub], level=LEVEL, chosen=0)
            base_ppl = {n: float(ppl[index[sets[n][k]]]) for n in names}
            ratio = {n: [cmp.ratio[j + 1], cmp.ci_low[j + 1], cmp.ci_high[j + 1]] for j, n in enumerate(names)}
            best = min(names, key=lambda n: base_ppl[n])
            beaten = any(ratio[n][2] < 1.0 for n in names)  # a baseline better, its interval below 1
            rows.append({"k": k, "product_removed": list(product[k]), "product_ppl": float(ppl[index[product[k]]]),
                         "baselines": base_ppl, "baseline_sets": {n: list(sets[n][k]) for n in names},
                         "ratio_to_product": ratio, "best_baseline": best,
                         "product_best_or_tied": not beaten,
                         "product_strictly_best": all(ratio[n][1] > 1.0 for n in names)})
        tables[split] = rows
    return {"bench": "real", "model": args.model, "identity": lm.identity, "n_layers": L,
            "n_params": lm.n_params, "run_id": result["run_id"], "stages_s": meter.seconds,
            "stages_peak_mib": meter.peak, "run_wall_s": round(run_wall, 1), "run_seconds_reported": result["seconds"],
            "sampling": sampling, "baselines_s": baseline_s,
            "baselines_stored": baseline_stored, "product_sources": sources, "full_ppl": full_ppl,
            "calibration": {"ppl_full": result["ppl_full"],
                            "by_k": {x["k"]: x["ppl_measured"] for x in result["by_k"]}},
            "by_k": tables[splits[0]] if splits else [], **{f"by_k_{s}": tables[s] for s in splits},
            "level": LEVEL, "eval_windows": args.eval_windows,
            "settings": {"windows": args.windows, "seq_len": args.seq_len, "masks": args.masks, "scheme": args.scheme,
                         "method": dataclasses.asdict(mspec), "baselines": names, "ks": ks, "threads": args.threads},
            "command": "python -m bench.real " + " ".join(shlex.quote(a) for a in sys.argv[1:])}


def lines_for(r: dict) -> list[str]:
    out = [f"{r['model']} ({r['n_layers']} layers, {r['n_params'] / 1e6:.1f} M parameters): engine run "
           f"{r['run_wall_s']:.0f} s",
           "stages: " + ", ".join(f"{k} {v:.0f} s / {r['stages_peak_mib'][k]:.0f} MiB" for k, v in r["stages_s"].items())]
    s = r["sampling"]
    if s["masks_per_s"]:
        out.append(f"sampling: {s['n_masks']} masks, {s['masks_per_s']:.2f} masks/s, {s['layer_calls_per_mask']:.1f} "
                   f"layer calls/mask (counting floor {s['floor_layer_calls_per_mask']:.1f}, from scratch "
                   f"{s['from_scratch_layer_calls_per_mask']})")
    out.append("baselines: " + ", ".join(f"{n} {v:.0f} s" for n, v in r["baselines_s"].items()))
    for split, ppl in r["full_ppl"].items():
        out.append(f"{split} ({r['eval_windows']} windows; full model ppl {ppl:.2f}):")
        for row in r[f"by_k_{split}"]:
            rb = ", ".join(f"{n} {v:.2f} (x{row['ratio_to_product'][n][0]:.3f} "
                           f"[{row['ratio_to_product'][n][1]:.3f}, {row['ratio_to_product'][n][2]:.3f}])"
                           for n, v in row["baselines"].items())
            out.append(f"  k={row['k']}: product {row['product_ppl']:.2f}; {rb}; best or tied: "
                       f"{row['product_best_or_tied']}")
    return out


def main(argv=None) -> dict:
    args = parse(argv)
    r = run(args)
    return emit(lines_for(r), r, args.json)


if __name__ == "__main__":
    run_script(main)
