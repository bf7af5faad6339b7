"""`engine fit` (and the default contributions' cross-fit) with the surrogate's MLPs one after another vs
trained as one batched network (engine.surrogate.BATCHED_FITS), in one process on the same run.

    .venv/bin/python -m bench.fit_speed --cache-dir DIR [--model demo --data demo --masks 256] [--json]

DIR must hold the run (sample it first, e.g. `python -m engine sample --cache-dir DIR`). Per mode: the
seconds of what `engine fit` runs (pipeline.fit with the comparison of every kind, then
pipeline.work_curve) and of pipeline.contributions (regression-adjusted: 5 cross-fits), the held-out R²
and the contributions; the ratio sequential / batched and the largest contribution difference beside
the ensemble's own spread (the seed noise), and the load average before and after (1, 5, 15 min). The
last stdout line (with --json) is one JSON object.

What the batched mode changes: fit_mlps_batched (one network for the ensemble, the learning curve, the
work curve and the cross-fits), the comparison's mlp:adam / mlp+log-pairwise and the work curve's last
point reusing the ensemble's first member. What both modes share (so the sequential mode is today's code
with batching off, a little faster than the code before issue 23): small predictions on one thread
(GBT, MLP) and the work curve's bootstrap resamples drawn with the groups found once.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def measure(run, spec, method, batched: bool) -> dict:
    from engine import pipeline, surrogate

    surrogate.BATCHED_FITS = batched
    pipeline._FITS.clear()  # refit: nothing cached from the other mode
    t = time.perf_counter()
    f = pipeline.fit(run, method, compare=True)
    pipeline.work_curve(run, method)
    fit_s = time.perf_counter() - t
    pipeline._FITS.clear()
    t = time.perf_counter()
    c = pipeline.contributions(run, method)
    return {"batched": batched, "fit_seconds": round(fit_s, 2),
            "contributions_seconds": round(time.perf_counter() - t, 2),
            "r2": f["r2"], "spearman": f["spearman"], "contributions": c["contributions"],
            "stderr": c.get("stderr")}


def main(argv=None) -> dict:
    from engine.config import DataSpec, MethodSpec, ModelSpec, RunSpec, SamplingSpec
    from engine import pipeline

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--model", default="demo")
    p.add_argument("--data", default="demo")
    p.add_argument("--masks", type=int, default=256)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    pipeline.set_threads(a.threads)
    spec = RunSpec(model=ModelSpec(name=a.model), data=DataSpec(source=a.data), sampling=SamplingSpec(n_masks=a.masks))
    run = pipeline.open_run(spec, a.cache_dir, create=False)
    method = MethodSpec()
    load_before = [round(x, 2) for x in os.getloadavg()]
    old, new = measure(run, spec, method, False), measure(run, spec, method, True)
    diff = float(np.max(np.abs(np.subtract(old["contributions"], new["contributions"]))))
    out = {"run_id": run.run_id, "n_masks": int(run.store.count()), "sequential": old, "batched": new,
           "fit_speedup": round(old["fit_seconds"] / new["fit_seconds"], 2),
           "contributions_speedup": round(old["contributions_seconds"] / new["contributions_seconds"], 2),
           "max_contribution_diff": diff, "r2_diff": new["r2"] - old["r2"],
           "load_average": {"before": load_before, "after": [round(x, 2) for x in os.getloadavg()]}}
    print(f"engine fit: sequential {old['fit_seconds']} s, batched {new['fit_seconds']} s "
          f"({out['fit_speedup']}x); contributions (cross-fit): {old['contributions_seconds']} s vs "
          f"{new['contributions_seconds']} s ({out['contributions_speedup']}x)")
    print(f"held-out R² {old['r2']:.4f} vs {new['r2']:.4f}; largest contribution difference {diff:.4g}")
    if a.json:
        print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
