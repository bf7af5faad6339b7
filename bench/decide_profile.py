"""Where the raced decision spends its evaluations and seconds, per phase, and A/B of decision variants.

    .venv/bin/python -m bench.decide_profile --cache-dir DIR [--model demo --data demo --masks 256]
        [--k 8] [--variants old,new] [--test-data demo-test --test-windows 32] [--json]

DIR must hold the sampled run. For each variant (VARIANTS: `old` = the race before issue 23's cost cuts,
`new` = today's defaults), interleaved in one process on one fresh window pool each: the decide stage's
race (`decision.race_decide` with the run's fit, contributions and baselines' sets, the default MethodSpec
with --remove k) with every look timed: per phase (the candidates' race, each swap round) and per look:
sets measured, set-window evaluations, seconds, and the trie's prefix-sharing ratio (layer calls over the
layer calls of measuring every set independently). Then the chosen sets of every variant measured on
`--test-windows` windows of `--test-data` (never seen by the decision), paired: perplexity and the ratio
to the first variant's set with its 90% bootstrap interval (`tied_or_better`: the interval reaches 1 or
lies below it). The last stdout line (with --json) is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

# name -> race_decide keyword overrides (racing.RaceRule fields under "rule")
VARIANTS = {
    "old": {"rule": {"stop_tied": False}},  # every swap round while the winner changes (before issue 23's cuts)
    "new": {},  # the defaults: swap rounds stop once a winner is not shown better than its incumbent
    "first2": {"rule": {"first": 2}},  # a 2-window first look (the default since issue 23's last change)
    "first4": {"rule": {"first": 4}},  # a 4-window first look (the default before)
    "finalists4": {"rule": {"finalists": 4}},  # halving never below 4 survivors per k (default 2)
    "finalists10": {"rule": {"finalists": 10}},
}


def profile_one(run, method, f, c, extra, ks, overrides: dict) -> dict:
    """Run one variant of the raced decision on a fresh pool; per-look events with timings."""
    from engine import decision as decision_lib
    from engine import racing
    from engine.pipeline import stages

    pool, cal_cols, val_cols, on = stages._decision_pool(run, method, None)
    base = racing.RaceRule(first=method.race_first, alpha=method.race_alpha, finalists=method.race_finalists)
    rule = dataclasses.replace(base, **overrides.get("rule", {}))
    events: list[dict] = []
    inner = pool._measure

    def measure(masks, start, stop):  # times each real measurement and counts its trie's layer calls
        t = time.monotonic()
        calls0 = pool.layer_calls
        out = inner(masks, start, stop)
        events[-1]["seconds"] = events[-1].get("seconds", 0.0) + time.monotonic() - t
        events[-1]["layer_calls"] = events[-1].get("layer_calls", 0) + pool.layer_calls - calls0
        events[-1]["independent_layer_calls"] = events[-1].get("independent_layer_calls", 0) + int(masks.sum())
        return out

    pool._measure = measure

    def progress(e):
        events.append({k: e[k] for k in ("stage", "look", "looks", "windows", "sets", "evaluations")})
        if len(events) > 1:
            print(f"    {events[-2]['stage']} look {events[-2]['look']}: {events[-2]['sets']} sets x "
                  f"{events[-2]['windows']} windows, {events[-2].get('seconds', 0):.0f} s", file=sys.stderr, flush=True)

    t0 = time.monotonic()
    ds = decision_lib.race_decide(f.predict, c.values, run.n_layers, ks, pool, f.samples.ppl_full, cal_cols,
                                  val_cols, n_verify=method.n_verify, swap_rounds=method.swaps,
                                  n_keep=method.n_compare, extra=extra, rule=rule, level=method.level,
                                  seed=method.mc_seed, on=on, progress=progress)
    seconds = time.monotonic() - t0
    phases: dict[str, dict] = {}
    for e in events:
        ph = phases.setdefault(e["stage"], {"evaluations": 0, "seconds": 0.0, "looks": []})
        ph["evaluations"] += e["evaluations"]
        ph["seconds"] += e.get("seconds", 0.0)
        ph["looks"].append({k: (round(v, 2) if isinstance(v, float) else v) for k, v in e.items() if k != "stage"})
    for ph in phases.values():
        ph["seconds"] = round(ph["seconds"], 1)
    lc = sum(e.get("layer_calls", 0) * e["windows"] for e in events)  # trie nodes x windows (approx: per range)
    ind = sum(e.get("independent_layer_calls", 0) * e["windows"] for e in events)
    d = ds[0]
    return {"seconds": round(seconds, 1), "evaluations": int(pool.evaluations), "measure_calls": pool.calls,
            "phases": phases, "prefix_sharing_ratio": round(float(sum(e.get("layer_calls", 0) for e in events))
                                                            / max(1, sum(e.get("independent_layer_calls", 0)
                                                                         for e in events)), 3),
            "chosen": list(d.removed), "source": d.source, "ppl_calibration": d.ppl_measured,
            "ppl_validation": d.validation_ppl, "n_measured": d.n_measured, "tied": [list(t) for t in d.tied],
            "_weighted": (lc, ind)}


def main(argv=None) -> dict:
    from engine import pipeline
    from engine.config import DataSpec, MethodSpec, ModelSpec, RunSpec, SamplingSpec
    from engine.data import make_windows
    from engine.decision import removal_mask
    from engine.evaluate import MaskEvaluator
    from engine.pipeline import stages
    from engine.uncertainty import compare_candidates

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--model", default="demo")
    p.add_argument("--data", default="demo")
    p.add_argument("--masks", type=int, default=256)
    p.add_argument("--windows", type=int, default=8, help="calibration windows of the run")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--val-windows", type=int, default=None, help="default: MethodSpec's")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--variants", default="old,new", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--test-data", default="demo-test")
    p.add_argument("--test-windows", type=int, default=32, help="0: no held-out comparison")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--save", default=None, help="write the JSON object to this file after each variant too")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    names = [v for v in a.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    pipeline.set_threads(a.threads)
    spec = RunSpec(model=ModelSpec(name=a.model), data=DataSpec(source=a.data, n_windows=a.windows, seq_len=a.seq_len),
                   sampling=SamplingSpec(n_masks=a.masks))
    run = pipeline.open_run(spec, a.cache_dir, create=False)
    method = MethodSpec(remove=a.k)
    if a.val_windows is not None:
        method = dataclasses.replace(method, val_windows=a.val_windows)
    f, c = stages._contributions(run, method)
    extra, _ = stages.baseline_candidates(run, [a.k])
    out = {"run_id": run.run_id, "model": a.model, "k": a.k, "n_layers": run.n_layers, "variants": {}}
    ev = None
    if a.test_windows:
        test = make_windows(run.lm.tokenizer, DataSpec(source=a.test_data, n_windows=a.test_windows,
                                                       seq_len=spec.data.seq_len))
        ev = MaskEvaluator(run.lm, test)
        out.update(test_data=a.test_data, test_windows=a.test_windows, ppl_full_test=float(ev.ppl_full))
    losses = {}
    for name in names:
        r = profile_one(run, method, f, c, extra, [a.k], VARIANTS[name])
        r.pop("_weighted")
        out["variants"][name] = r
        print(f"{name}: {r['seconds']:.0f} s, {r['evaluations']} set-window evaluations, chosen {r['chosen']} "
              f"({r['source']}), calibration ppl {r['ppl_calibration']:.2f}, validation {r['ppl_validation']}; "
              f"prefix sharing {r['prefix_sharing_ratio']}", flush=True)
        for st, ph in r["phases"].items():
            looks = ", ".join(f"{x['sets']}x{x['windows']}w {x.get('seconds', 0):.0f}s" for x in ph["looks"])
            print(f"  {st}: {ph['evaluations']} evaluations, {ph['seconds']:.0f} s; looks {looks}", flush=True)
        if a.save:
            Path(a.save).write_text(json.dumps(out))
        if ev is not None:
            losses[name] = ev.window_losses(removal_mask(r["chosen"], run.n_layers)[None])
            nll, tok = losses[name]
            print(f"  held-out {a.test_data} ({a.test_windows} windows, full {ev.ppl_full:.2f}): "
                  f"{float(np.exp(nll.sum() / tok.sum())):.2f}", flush=True)
    if ev is not None and names:
        sets = [tuple(out["variants"][n]["chosen"]) for n in names]
        nll = np.concatenate([losses[n][0] for n in names])  # (variants, windows)
        tok = np.concatenate([losses[n][1] for n in names])
        cmp = compare_candidates(sets, nll, tok, chosen=0)
        for i, n in enumerate(names):
            out["variants"][n]["heldout"] = {"ppl": cmp.ppl[i], "ratio_to_first": cmp.ratio[i],
                                             "ci_low": cmp.ci_low[i], "ci_high": cmp.ci_high[i],
                                             "tied_or_better": bool(cmp.ci_low[i] <= 1.0)}
            print(f"  held-out, paired: {n} {cmp.ppl[i]:.2f} x{cmp.ratio[i]:.3f} to {names[0]} "
                  f"[{cmp.ci_low[i]:.3f}, {cmp.ci_high[i]:.3f}]")
    if a.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
