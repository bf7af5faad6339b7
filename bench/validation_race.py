"""The product's raced decision over sampling seeds, on real per-window losses (issue 23).

    .venv/bin/python -m bench.validation_race [--seeds 0 1 2 3 4] [--ks 2 4 6 8] [--firsts 2 4]
        [--cache-dir DIR] [--fresh] [--near 10] [--no-prerace] [--out FILE] [--json]

(`python -m bench.validation_draws --race ...` runs the same.) For each sampling seed: 256 stratified
masks with their ground-truth calibration perplexities (bench.compare.lookup_samples, free), the default
fit and contributions (MethodSpec with surrogate seed = mc_seed = the sampling seed, boot 0, as
bench.validation_draws' older rows), then for each k alone (what `engine run --remove k` decides) and
each race first look in `--firsts`, the pipeline's own decision: engine.pipeline.stages._decision_pool's pool (the 64 validation windows of the calibration
text, then the 8 calibration windows, each shuffled with mc_seed) and engine.method.decide, with the
baselines' sets (engine.pipeline.stages.CANDIDATE_BASELINES, computed once on the calibration windows, as
the pipeline computes them for a run that has none stored) among the candidates; and (unless
`--no-prerace`) the decision before the race (`prerace_decision`), all interleaved per k, the order
rotated by the seed.

Measurement: the demo model's per-window losses, cached per removal set and window in
`DIR/race_losses.npz` (72 columns: the validation windows in `data.validation_windows` order, then the
calibration windows). `--fresh`: every look is measured by the pool's own evaluator (the product's wall
time; results written to the cache); otherwise cached windows are read, missing validation windows are
measured by the model and missing calibration windows read from the ground truth's `window_nll`, so a
rerun is cheap but its seconds are not the product's (`cached_evaluations` says how many were read).

Per seed, k and first look: the chosen set, its source, the race's set-window evaluations
(`pool.evaluations`) and the decision's wall seconds, and the chosen set's perplexity on the 361
`testall` windows of test.txt (bench.validation_draws) over the best of the `--near` best calibration sets
there (their testall losses cached in `DIR/testall_losses.npz`). The last stdout line (with --json) is
one JSON object; `--out` writes it to a file as well.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import types
from pathlib import Path

import numpy as np

from bench import ground_truth as gtm
from bench.common import _jsonable, run_script

KS = (2, 4, 6, 8)


def _key(s) -> str:
    return ",".join(str(int(i)) for i in s)


class RaceCache:
    """Per-window losses of removal sets on the canonical columns (validation windows, then calibration
    windows): nll float[c, W], tok int[c, W], have bool[c, W]; `path` None keeps it in memory."""

    def __init__(self, path: Path | None, n_windows: int):
        self.path, self.W = path, n_windows
        self.row: dict[str, int] = {}
        self.nll = np.zeros((0, n_windows))
        self.tok = np.zeros((0, n_windows), dtype=np.int64)
        self.have = np.zeros((0, n_windows), dtype=bool)
        if path is not None and path.exists():
            with np.load(path) as z:
                if z["nll"].shape[1] != n_windows:
                    raise ValueError(f"{path} holds {z['nll'].shape[1]} windows per set, expected {n_windows}; "
                                     "delete it or use another --cache-dir")
                self.row = {str(s): i for i, s in enumerate(z["sets"])}
                self.nll, self.tok, self.have = z["nll"].copy(), z["tok"].copy(), z["have"].copy()

    def rows(self, sets) -> np.ndarray:
        """Row of each set, added (unmeasured) when new."""
        new = [k for k in dict.fromkeys(_key(s) for s in sets) if k not in self.row]
        if new:
            for k in new:
                self.row[k] = len(self.row)
            n = len(new)
            self.nll = np.concatenate([self.nll, np.full((n, self.W), np.nan)])
            self.tok = np.concatenate([self.tok, np.zeros((n, self.W), dtype=np.int64)])
            self.have = np.concatenate([self.have, np.zeros((n, self.W), dtype=bool)])
        return np.array([self.row[_key(s)] for s in sets], dtype=np.int64)

    def put(self, sets, cols, nll, tok) -> None:
        r = self.rows(sets)
        self.nll[np.ix_(r, cols)], self.tok[np.ix_(r, cols)], self.have[np.ix_(r, cols)] = nll, tok, True

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.stem + ".tmp.npz")
        np.savez(tmp, sets=np.array(list(self.row), dtype=str), nll=self.nll, tok=self.tok, have=self.have)
        tmp.replace(self.path)


@dataclasses.dataclass
class Context:
    """What every decision of one ground truth shares: the model, a run-like record for the pipeline's pool,
    the canonical windows, the baselines' sets."""

    gt: gtm.GroundTruth
    run: types.SimpleNamespace  # lm, spec.data, windows, n_layers: what stages._decision_pool reads
    canon: dict  # window bytes -> canonical column
    n_val: int  # canonical columns 0..n_val-1: validation windows; n_val.. the calibration windows in run order
    val: object  # int[n_val, T]: the validation windows (data.validation_windows order)
    baselines: dict  # name -> BaselineResult.to_json()
    baseline_evaluations: int


def context(gt: gtm.GroundTruth, lm=None, val_windows: int | None = None) -> Context:
    """The shared record for `gt` (lm: the ground truth's model, loaded when None)."""
    from engine.baselines import run_baseline
    from engine.config import DataSpec, MethodSpec, ModelSpec
    from engine.data import make_windows, validation_windows
    from engine.models import load_model
    from engine.pipeline import stages

    lm = lm or load_model(ModelSpec(name=gt.meta["model"]))
    data = DataSpec(source=gt.meta["data"], n_windows=gt.meta["n_windows"], seq_len=gt.meta["seq_len"])
    run = types.SimpleNamespace(lm=lm, spec=types.SimpleNamespace(data=data), windows=make_windows(lm.tokenizer, data),
                                n_layers=gt.n_layers)
    n = MethodSpec().val_windows if val_windows is None else val_windows
    val = validation_windows(lm.tokenizer, data, n, at_most=True).input_ids  # (n_val, T)
    ids = [*val, *run.windows.input_ids]
    canon = {w.numpy().tobytes(): j for j, w in enumerate(ids)}
    if len(canon) != len(ids):
        raise ValueError("two windows of the pool hold the same tokens; the cache could not tell them apart")
    baselines = {name: run_baseline(name, lm, run.windows).to_json() for name in stages.CANDIDATE_BASELINES}
    spent = gt.n_layers * int(run.windows.input_ids.shape[0]) if "ppl" in baselines else 0  # as baseline_candidates
    return Context(gt, run, canon, len(val), val, baselines, spent)


def baseline_sets(ctx: Context, ks) -> dict:
    """{k: {removed set: "baseline:<name>[+baseline:<other>]"}}, as stages.baseline_candidates builds them."""
    from engine.pipeline import stages

    out: dict[int, dict] = {}
    for k in ks:
        for name, r in ctx.baselines.items():
            s = stages._baseline_removed(r, k)
            if s is not None:
                have = out.setdefault(k, {}).get(s)
                out[k][s] = f"{have}+baseline:{name}" if have else f"baseline:{name}"
    return out


def cached_pool(ctx: Context, spec, cache: RaceCache, fresh: bool):
    """(pool, calibration cols, validation cols, tied_on words, stats) from stages._decision_pool, its
    measure wrapped to read/write `cache` (module docstring); stats counts cached / measured evaluations and
    the seconds the model spent."""
    from engine.pipeline import stages

    pool, cal_cols, val_cols, on = stages._decision_pool(ctx.run, spec, None)
    ids, n_val = stages.decision_windows(ctx.run, spec)
    col = np.array([ctx.canon[w.numpy().tobytes()] for w in ids])  # pool position -> canonical column
    inner = pool._measure
    stats = {"cached_evaluations": 0, "model_evaluations": 0, "ground_truth_evaluations": 0, "model_seconds": 0.0}

    def model(masks, start, stop):
        t = time.monotonic()
        out = inner(masks, start, stop)
        stats["model_seconds"] += time.monotonic() - t
        stats["model_evaluations"] += masks.shape[0] * (stop - start)
        return out

    def measure(masks, start, stop):  # (n, L) -> (nll float[n, w], tok int[n, w]) on pool windows start..stop-1
        sets = [tuple(np.flatnonzero(~m)) for m in masks]
        cols = col[start:stop]
        if fresh:
            nll, tok = model(masks, start, stop)
            cache.put(sets, cols, nll, tok)
            return nll, tok
        r = cache.rows(sets)
        have = cache.have[np.ix_(r, cols)]  # (n, w)
        stats["cached_evaluations"] += int(have.sum())
        v_stop = min(stop, n_val)
        if start < v_stop:  # validation windows: the model, for the sets missing any of them
            need = ~have[:, : v_stop - start].all(axis=1)
            if need.any():
                nll, tok = model(masks[need], start, v_stop)
                cache.put([s for s, x in zip(sets, need) if x], cols[: v_stop - start], nll, tok)
        c_start = max(start, n_val)
        if c_start < stop:  # calibration windows: the ground truth's per-window losses
            need = ~have[:, c_start - start:].all(axis=1)
            if need.any():
                cc = cols[c_start - start:] - ctx.n_val  # calibration window index (run.windows order)
                nll = ctx.gt.lookup_window_nll(masks[need])[:, cc]
                tok = np.broadcast_to(ctx.gt.window_tokens[cc], nll.shape)
                cache.put([s for s, x in zip(sets, need) if x], cols[c_start - start:], nll, tok)
                stats["ground_truth_evaluations"] += int(nll.size)
        r = cache.rows(sets)
        return cache.nll[np.ix_(r, cols)].copy(), cache.tok[np.ix_(r, cols)].copy()

    pool._measure = measure
    return pool, cal_cols, val_cols, on, stats


def raced_decision(ctx: Context, f, c, spec, k: int, cache: RaceCache, fresh: bool) -> dict:
    """The pipeline's decision for `k` alone (engine.method.decide on the cached pool, the baselines' sets
    among the candidates): chosen set, source, evaluations, wall seconds, cache and model counts."""
    from engine import method as method_lib
    from engine.decision import removal_mask

    pool, cal_cols, val_cols, on, stats = cached_pool(ctx, spec, cache, fresh)
    extra = baseline_sets(ctx, [k]) if spec.decision == "verified" and not spec.no_baseline_candidates else {}
    t = time.monotonic()
    ds = method_lib.decide(f, c, [k], None, None, spec, pool=pool, calibration_cols=cal_cols,
                           validation_cols=val_cols, extra=extra, on=on)
    seconds = time.monotonic() - t
    d = ds.items[0]
    if fresh:  # the model's calibration-window losses against the ground truth's (the cached mode reads those)
        cal = np.arange(ctx.n_val, cache.W)
        sets = [s for s in pool.have if pool.measured(s) == pool.W]
        r = cache.rows(sets)
        gt_nll = ctx.gt.lookup_window_nll(np.stack([removal_mask(s, ctx.gt.n_layers) for s in sets]))
        stats["calibration_max_abs_diff_vs_ground_truth"] = float(np.abs(cache.nll[np.ix_(r, cal)] - gt_nll).max())
    return {"k": k, "decision": "race", "race_first": spec.race_first, "race_finalists": spec.race_finalists,
            "chosen": list(d.removed), "source": d.source,
            "evaluations": int(pool.evaluations), "seconds": round(seconds, 2),
            "sets_raced": d.n_measured, "tied": len(d.tied), "budget_hit": d.budget_hit,
            "ppl_pool": pool.ppl(d.removed), "ppl_calibration": d.ppl_measured,
            "fresh": fresh, **{k_: (round(v, 2) if isinstance(v, float) else v) for k_, v in stats.items()}}


PRE_RACE = "pre-race"  # the decision before the race (issue 23's "today"): method.decide + method.with_ties


def prerace_decision(ctx: Context, f, c, spec, k: int, cache: RaceCache, fresh: bool) -> dict:
    """The decision as the pipeline ran it before the race (engine/pipeline.py at 79fa08e^, `_decide`):
    engine.method.decide with every candidate and swap neighbour measured on the calibration windows
    (spec.swaps rounds, the n_compare best kept), then method.with_ties choosing the best of them on the
    validation windows. `fresh`: both measured by the model; else calibration perplexities from the ground
    truth and validation losses from the cache (missing ones measured). Evaluations: sets x windows."""
    from engine import method as method_lib
    from engine.evaluate import MaskEvaluator

    val = ctx.val  # (n_val, T)
    stats = {"cached_evaluations": 0, "model_evaluations": 0, "ground_truth_evaluations": 0, "model_seconds": 0.0}
    count = {"cal": 0, "val": 0}
    cal_eval = MaskEvaluator(ctx.run.lm, ctx.run.windows) if fresh else None
    val_eval = MaskEvaluator(ctx.run.lm, val)
    n_cal = int(ctx.run.windows.input_ids.shape[0])

    def measure(masks):  # (n, L) -> calibration perplexities float[n]
        count["cal"] += masks.shape[0] * n_cal
        if not fresh:
            stats["ground_truth_evaluations"] += masks.shape[0] * n_cal
            return ctx.gt.lookup_ppl(masks)
        t = time.monotonic()
        out = cal_eval.perplexities(masks)
        stats["model_seconds"] += time.monotonic() - t
        stats["model_evaluations"] += masks.shape[0] * n_cal
        return out

    def window_losses(masks):  # (n, L) -> (nll float[n, n_val], tok int[n, n_val])
        count["val"] += masks.shape[0] * ctx.n_val
        sets = [tuple(np.flatnonzero(~m)) for m in masks]
        cols = np.arange(ctx.n_val)
        r = cache.rows(sets)
        need = np.ones(len(sets), bool) if fresh else ~cache.have[np.ix_(r, cols)].all(axis=1)
        stats["cached_evaluations"] += int((~need).sum()) * ctx.n_val
        if need.any():
            t = time.monotonic()
            nll, tok = val_eval.window_losses(masks[need])
            stats["model_seconds"] += time.monotonic() - t
            stats["model_evaluations"] += int(need.sum()) * ctx.n_val
            cache.put([s for s, x in zip(sets, need) if x], cols, nll, tok)
        return cache.nll[np.ix_(r, cols)].copy(), cache.tok[np.ix_(r, cols)].copy()

    t = time.monotonic()
    ds = method_lib.decide(f, c, [k], measure, None, spec)
    ds = method_lib.with_ties(ds, window_losses, spec, f"{ctx.n_val} validation windows of the calibration text",
                              choose=True)
    seconds = time.monotonic() - t
    d = ds.items[0]
    return {"k": k, "decision": PRE_RACE, "race_first": None, "chosen": list(d.removed), "source": d.source,
            "evaluations": count["cal"] + count["val"], "calibration_evaluations": count["cal"],
            "validation_evaluations": count["val"], "seconds": round(seconds, 2), "sets_raced": d.n_measured,
            "compared": len(d.candidates), "tied": len(d.tied), "budget_hit": False, "ppl_calibration": d.ppl_measured,
            "ppl_validation": d.validation_ppl, "fresh": fresh,
            **{k_: (round(v, 2) if isinstance(v, float) else v) for k_, v in stats.items()}}


def seed_rows(ctx: Context, seed: int, ks, firsts, cache: RaceCache, fresh: bool, log=None,
              prerace: bool = True, finalists: int | None = None) -> list[dict]:
    """Every (k, first look) raced decision for sampling seed `seed`, and the pre-race decision (`prerace`),
    interleaved per k (their order rotated by the seed); the fit and contributions shared, timed once.
    `finalists`: the races' MethodSpec.race_finalists (None: the default)."""
    from bench.compare import lookup_samples
    from engine import method as method_lib
    from engine.config import MethodSpec, SamplingSpec, SurrogateSpec

    t = time.monotonic()
    samples = lookup_samples(ctx.gt, SamplingSpec(seed=seed))
    base = MethodSpec(surrogate=SurrogateSpec(seed=seed), mc_seed=seed, boot=0)
    if finalists is not None:
        base = dataclasses.replace(base, race_finalists=finalists)
    f = method_lib.fit(samples, base.surrogate, curve=False)
    c = method_lib.contributions(samples, f, base)
    fit_s = round(time.monotonic() - t, 1)
    variants = [*firsts, *([PRE_RACE] if prerace else [])]
    order = variants[seed % len(variants):] + variants[: seed % len(variants)]
    rows = []
    for k in ks:
        for v in order:
            row = (prerace_decision(ctx, f, c, base, k, cache, fresh) if v == PRE_RACE else
                   raced_decision(ctx, f, c, dataclasses.replace(base, race_first=v), k, cache, fresh))
            row = {"seed": seed, **row, "fit_and_contributions_s": fit_s}
            rows.append(row)
            cache.save()
            if log:
                log(f"seed {seed} k={k} {v}: {row['chosen']} ({row['source']}), {row['evaluations']} "
                    f"evaluations, {row['seconds']:.1f} s")
    return rows


def testall_ratios(gt: gtm.GroundTruth, rows: list[dict], near: int, path: Path) -> dict:
    """Adds `testall_ratio` (chosen set's perplexity on the 361 testall windows over the best of the `near`
    best calibration sets there) and `near_best` to each row; returns {k: the near sets' testall perplexities}."""
    from bench import validation_draws as vd

    near_sets = {k: [r for r, _ in gt.optimum(k, top=near)] for k in {r["k"] for r in rows}}
    needed = {tuple(r["chosen"]) for r in rows} | {s for v in near_sets.values() for s in v}
    d = vd.losses(gt, needed, path, splits=("testall",))
    index = vd._index(d)
    best = {}
    for k, ss in near_sets.items():
        ppl = vd._ppl(d, "testall", [index[s] for s in ss])
        best[k] = {"sets": [list(s) for s in ss], "testall_ppl": [round(float(p), 4) for p in ppl]}
    for r in rows:
        p = float(vd._ppl(d, "testall", [index[tuple(r["chosen"])]])[0])
        r["testall_ppl"], r["testall_ratio"] = round(p, 4), round(p / min(best[r["k"]]["testall_ppl"]), 4)
        r["near_rank"] = ([list(s) for s in near_sets[r["k"]]].index(r["chosen"]) + 1
                          if r["chosen"] in best[r["k"]]["sets"] else None)
    return best


def label(r: dict) -> str:
    if r["decision"] == PRE_RACE:
        return PRE_RACE
    return f"race_first={r['race_first']}" + (f" finalists={r['race_finalists']}" if "race_finalists" in r else "")


def summary(rows: list[dict], ks) -> dict:
    """Per decision (label): seeds with every k <= 1.01, evaluations and seconds per k (summed over seeds),
    the largest ratio per k; then each decision's evaluations and seconds over the first race's (same seeds
    and k, summed: a paired ratio) and how often it chose the same set."""
    names = list(dict.fromkeys(label(r) for r in sorted(rows, key=lambda r: (r["decision"] != "race",
                                                                               r["race_first"] or 0))))
    out = {}
    for name in names:
        mine = [r for r in rows if label(r) == name]
        seeds = sorted({r["seed"] for r in mine})
        ok = [all(r["testall_ratio"] <= 1.01 for r in mine if r["seed"] == s) for s in seeds]
        out[name] = {"seeds_all_k_within_1pct": f"{sum(ok)}/{len(seeds)}",
                     "evaluations": {k: sum(r["evaluations"] for r in mine if r["k"] == k) for k in ks},
                     "seconds": {k: round(sum(r["seconds"] for r in mine if r["k"] == k), 1) for k in ks},
                     "max_ratio": {k: max(r["testall_ratio"] for r in mine if r["k"] == k) for k in ks}}
    ref = {(r["seed"], r["k"]): r for r in rows if label(r) == names[0]}
    for name in names[1:]:
        pairs = [(ref[(r["seed"], r["k"])], r) for r in rows if label(r) == name and (r["seed"], r["k"]) in ref]
        out[f"{name} over {names[0]}"] = {
            "evaluations": round(sum(y["evaluations"] for _, y in pairs) / max(1, sum(x["evaluations"] for x, _ in pairs)), 3),
            "seconds": round(sum(y["seconds"] for _, y in pairs) / max(1e-9, sum(x["seconds"] for x, _ in pairs)), 3),
            "same_set": f"{sum(x['chosen'] == y['chosen'] for x, y in pairs)}/{len(pairs)}"}
    return out


def lines_for(rows: list[dict], summ: dict) -> list[str]:
    out = [f"seed {r['seed']} k={r['k']} {label(r)}: testall ratio {r['testall_ratio']:.4f}, "
           f"{r['chosen']} ({r['source']}), {r['evaluations']} set-window evaluations, {r['seconds']:.1f} s"
           + ("" if r["fresh"] else f" ({r['cached_evaluations']} read from the cache)") for r in rows]
    return out + [f"{k}: {json.dumps(v)}" for k, v in summ.items()]


def main(argv=None) -> dict:
    from bench.common import emit

    p = argparse.ArgumentParser(prog="python -m bench.validation_race", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    a = p.parse_args(argv)
    return run_race(a, emit)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ground-truth", default=str(gtm.DEFAULT_OUT))
    p.add_argument("--cache-dir", default="/tmp/validation_race", help="race_losses.npz and testall_losses.npz")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--ks", type=int, nargs="+", default=list(KS))
    p.add_argument("--firsts", type=int, nargs="+", default=[2, 4], help="race first looks (MethodSpec.race_first)")
    p.add_argument("--finalists", type=int, default=None,
                   help="the races' MethodSpec.race_finalists (default: MethodSpec's)")
    p.add_argument("--near", type=int, default=10)
    p.add_argument("--no-prerace", action="store_true", help="leave out the decision before the race")
    p.add_argument("--fresh", action="store_true", help="measure every look with the model (real wall time)")
    p.add_argument("--out", default=None, help="also write the JSON object here (after every seed)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")


def run_race(a, emit) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    gt = gtm.load(a.ground_truth)
    ctx = context(gt)
    cache_dir = Path(a.cache_dir)
    cache = RaceCache(cache_dir / "race_losses.npz", ctx.n_val + int(ctx.run.windows.input_ids.shape[0]))

    def log(s):
        print(s, file=sys.stderr, flush=True)

    t0 = time.monotonic()
    rows: list[dict] = []
    obj: dict = {}
    for seed in a.seeds:
        rows += seed_rows(ctx, seed, a.ks, a.firsts, cache, a.fresh, log, prerace=not a.no_prerace,
                          finalists=a.finalists)
        obj = {"rows": rows, "ks": a.ks, "firsts": a.firsts, "seeds": a.seeds, "fresh": a.fresh,
               "baseline_evaluations": ctx.baseline_evaluations, "pool_windows": cache.W, "validation_windows": ctx.n_val}
        if a.out:
            Path(a.out).write_text(json.dumps(obj, indent=1, default=_jsonable))
    decide_s = time.monotonic() - t0
    near = testall_ratios(gt, rows, a.near, cache_dir / "testall_losses.npz")
    summ = summary(rows, a.ks)
    obj.update(near=near, summary=summ, decide_wall_s=round(decide_s, 1),
               total_wall_s=round(time.monotonic() - t0, 1), date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if a.out:
        Path(a.out).write_text(json.dumps(obj, indent=1, default=_jsonable))
    return emit(lines_for(rows, summ), obj, a.json)


if __name__ == "__main__":
    run_script(main)
