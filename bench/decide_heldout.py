"""The raced decision against the baselines' sets on held-out text, paired over the same windows.

    .venv/bin/python -m bench.decide_heldout --cache-dir DIR [--model demo --data demo --masks 256]
        [--ks 4,8] [--test-data demo-test --test-windows 64] [--json]

DIR must hold the sampled run. For each k: `pipeline.decide` with `--remove k` (the default decision: the
race over rank-and-cut, the surrogate's beam, the baselines' sets and the swap neighbours), its seconds
and set-window evaluations; then the chosen set, rank-and-cut and every baseline's set (block influence,
angular, single-layer PPL, and any baseline stored in the run, e.g. SLEB) measured on `--test-windows`
windows of `--test-data` (never seen by the decision): perplexity, and the ratio to the chosen set with
its 90% paired bootstrap interval over those windows (uncertainty.compare_candidates). `best_or_tied`:
no other set is better with an interval entirely below 1. The last stdout line (with --json) is one JSON
object.
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def main(argv=None) -> dict:
    from engine import pipeline
    from engine.config import DataSpec, MethodSpec, ModelSpec, RunSpec, SamplingSpec, parse_ints
    from engine.data import make_windows
    from engine.decision import rank_and_cut, removal_mask
    from engine.evaluate import MaskEvaluator
    from engine.uncertainty import compare_candidates

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--model", default="demo")
    p.add_argument("--data", default="demo")
    p.add_argument("--masks", type=int, default=256)
    p.add_argument("--ks", type=parse_ints, default=(4, 8))
    p.add_argument("--test-data", default="demo-test")
    p.add_argument("--test-windows", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    pipeline.set_threads(a.threads)
    spec = RunSpec(model=ModelSpec(name=a.model), data=DataSpec(source=a.data), sampling=SamplingSpec(n_masks=a.masks))
    run = pipeline.open_run(spec, a.cache_dir, create=False)
    test = make_windows(run.lm.tokenizer, DataSpec(source=a.test_data, n_windows=a.test_windows,
                                                   seq_len=spec.data.seq_len))
    ev = MaskEvaluator(run.lm, test)
    rows = []
    for k in a.ks:
        method = MethodSpec(remove=k)
        art = pipeline.stored(run, "decisions", method)
        if art is None or art["stale"]:  # decide now (a stored decision of these settings is reused)
            art = pipeline.decide(run, method)
        seconds = art["cost"]["seconds"]
        d = art["decisions"][0]
        chosen = tuple(d["removed"])
        values = pipeline.stored(run, "contributions", method)["contributions"]
        sets = {"product": chosen, "rank-and-cut": rank_and_cut(values, k)}
        extra, _ = pipeline.baseline_candidates(run, [k])
        for s, names in extra.get(k, {}).items():  # "baseline:a+baseline:b" when two baselines share a set
            for name in names.split("+"):
                sets.setdefault(name.split(":", 1)[1], s)
        names = list(sets)
        nll, tok = ev.window_losses(np.stack([removal_mask(sets[n], run.n_layers) for n in names]))
        cmp = compare_candidates([sets[n] for n in names], nll, tok, chosen=0)
        by = {n: {"removed": list(sets[n]), "ppl": cmp.ppl[i], "ratio_to_product": cmp.ratio[i],
                  "ci_low": cmp.ci_low[i], "ci_high": cmp.ci_high[i]} for i, n in enumerate(names)}
        best_or_tied = all(by[n]["ci_high"] >= 1.0 for n in names if n != "product")
        rows.append({"k": k, "removed": list(chosen), "source": d.get("source"), "decide_seconds": round(seconds, 1),
                     "evaluations": d.get("evaluations"), "budget_hit": d.get("budget_hit"),
                     "n_measured": d.get("n_measured"), "ppl_full_test": float(ev.ppl_full), "methods": by,
                     "product_best_or_tied": best_or_tied})
        print(f"k={k}: chosen {list(chosen)} (from {d.get('source')}), decide {seconds:.0f} s, "
              f"{d.get('evaluations')} set-window evaluations; {a.test_data} ({a.test_windows} windows, full "
              f"{ev.ppl_full:.2f}):")
        for n, v in by.items():
            print(f"  {n:16} {v['ppl']:9.2f}  x{v['ratio_to_product']:.3f} [{v['ci_low']:.3f}, {v['ci_high']:.3f}]  "
                  f"{v['removed']}")
        print(f"  best or tied-best: {best_or_tied}")
    out = {"run_id": run.run_id, "model": a.model, "test_data": a.test_data, "test_windows": a.test_windows,
           "by_k": rows}
    if a.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
