"""Budget study on one sampled run: held-out perplexity of each method's removal sets against the real
evaluations it spent (issue 23: which mask budget at real depth makes the game's own candidates win).

    .venv/bin/python -m bench.real_budget [--model smollm2] [--data demo] [--windows 4] [--seq-len 128]
        [--masks 32,64,128] [--ks 4,6,8,10] [--swaps 2] [--n-compare 10] [--val-windows 64]
        [--baselines block-influence,angular,ppl] [--eval-data demo-test] [--eval-windows 32]
        [--cache-dir DIR] [--json]

One run store (the model, data and sampling options; sampled up to max(--masks) first, resuming what the
store holds). For each n in --masks, the first n masks OF THE DESIGN (sampling.sample_masks: the design is
prefix-stable, so the n-mask run is exactly what `engine run --masks n` would fit on) are fitted
(method.fit, the run's default surrogate), their contributions estimated and two decisions raced on the
decision's own pool (pipeline's validation + calibration windows, racing rule and swaps of MethodSpec):
- ``product``: the default decision (rank-and-cut, the beam, the baselines' sets, swap neighbours);
- ``game``: the same race without the baselines' sets (the game's own candidates only);
- ``rank-and-cut``: the paper's rule on those contributions (no decision cost);
- ``beam`` (when asked in --variants): the surrogate's best set by beam search, unmeasured (no decision cost).
Every baseline in --baselines runs once on the calibration windows. Then every distinct set is measured on
each held-out text in one prefix-shared call, and each method's set is compared, paired over the windows
(uncertainty.compare_candidates, 90%), with the best baseline's set at that k.

Cost unit: set-window evaluations (one removal set on one calibration-length window): sampling n masks on W
calibration windows = n W; the race = the pool's evaluations (counted as if alone: a memo shares measured
windows between the races of one study, so the wall time is less than a fresh run's); block influence and
angular = W (one forward), single-layer PPL = L W, SLEB to k = (L + L-1 + ... + L-k+1) W. The product's
cost includes the baselines it races (block influence + angular + PPL).

JSON (last line): rows [{method, masks, k, removed, source, evaluations {sample, decide, baselines, total},
heldout {split: ppl}, vs_best_baseline {split: [ratio, lo, hi]}, best_or_tied {split: bool}}],
baselines {name: {seconds, evaluations}}, decisions {n: {variant: {seconds, evaluations}}}, full_ppl,
command, settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time

import numpy as np

from bench.common import emit, run_script

LEVEL = 0.9


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.real_budget", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data", default="demo")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--masks", default="32,64,128", help="mask budgets studied (default %(default)s)")
    p.add_argument("--ks", default="4,6,8,10")
    p.add_argument("--swaps", type=int, default=None)
    p.add_argument("--n-compare", type=int, default=None)
    p.add_argument("--val-windows", type=int, default=None)
    p.add_argument("--variants", default="product,game", help="raced decisions per budget (default %(default)s)")
    p.add_argument("--baselines", default="block-influence,angular,ppl")
    p.add_argument("--eval-data", default="demo-test")
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def baseline_cost(name: str, L: int, W: int, k_max: int) -> int:
    """Set-window evaluations of a baseline on W calibration windows (module docstring)."""
    if name in ("block-influence", "angular"):
        return W
    if name == "ppl":
        return L * W
    if name == "sleb":
        return sum(L - r for r in range(k_max)) * W
    return W


def memo_measure(measure, L: int):
    """measure(masks, start, stop) that remembers every set's losses per pool window, so the races of one
    study measure a set on a window once; each race's own pool still counts its evaluations."""
    from engine.sampling import masks_to_strings

    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def fn(masks, start, stop):
        keys = masks_to_strings(masks)
        need = [i for i, key in enumerate(keys) if key not in cache or np.isnan(cache[key][0][start:stop]).any()]
        if need:
            nll, tok = measure(masks[need], start, stop)
            for r, i in enumerate(need):
                if keys[i] not in cache:
                    cache[keys[i]] = (np.full(stop + 4096, np.nan), np.zeros(stop + 4096))
                cache[keys[i]][0][start:stop], cache[keys[i]][1][start:stop] = nll[r], tok[r]
        return (np.stack([cache[key][0][start:stop] for key in keys]),
                np.stack([cache[key][1][start:stop] for key in keys]))

    return fn


def run(args) -> dict:
    from engine import method as method_lib
    from engine import pipeline, racing
    from engine.baselines import run_baseline
    from engine.config import DataSpec, EvalSpec, MethodSpec, ModelSpec, RunSpec, SamplingSpec
    from engine.data import make_windows
    from engine.decision import beam_search, rank_and_cut, removal_mask
    from engine.evaluate import MaskEvaluator
    from engine.sampling import masks_to_strings, sample_masks
    from engine.uncertainty import compare_candidates

    budgets = sorted(int(x) for x in args.masks.split(","))
    ks = [int(x) for x in args.ks.split(",")]
    names = [b for b in args.baselines.split(",") if b]
    variants = [v for v in args.variants.split(",") if v]
    splits = [s for s in args.eval_data.split(",") if s]
    pipeline.set_threads(args.threads or None)
    spec = RunSpec(model=ModelSpec(name=args.model),
                   data=DataSpec(source=args.data, n_windows=args.windows, seq_len=args.seq_len),
                   sampling=SamplingSpec(n_masks=max(budgets)))
    overrides = {k: v for k, v in (("swaps", args.swaps), ("n_compare", args.n_compare),
                                   ("val_windows", args.val_windows)) if v is not None}
    mspec = dataclasses.replace(MethodSpec(remove=max(ks), ks=tuple(ks)), **overrides)
    run_ = pipeline.open_run(spec, args.cache_dir, EvalSpec())
    pipeline.sample(spec, args.cache_dir, progress=True, json_mode=True, run=run_,
                    evaluation=EvalSpec(single_pass=True))
    lm, L, W = run_.lm, run_.n_layers, int(run_.windows.input_ids.shape[0])
    s_all = pipeline.samples(run_)
    row_of = {m: i for i, m in enumerate(masks_to_strings(s_all.masks))}
    design = masks_to_strings(sample_masks(spec.sampling, L))

    base_sets, base_info = {}, {}
    for name in names:
        t = time.monotonic()
        r = run_baseline(name, lm, run_.windows, k_max=max(ks))
        base_info[name] = {"seconds": round(time.monotonic() - t, 1),
                           "evaluations": baseline_cost(name, L, W, max(ks))}
        base_sets[name] = {k: tuple(int(i) for i in r.removed(k)) for k in ks}
        print(f"baseline {name}: {base_info[name]['seconds']:.0f} s", file=sys.stderr, flush=True)
    extra = {}
    for name in names:
        for k in ks:
            s = base_sets[name][k]
            have = extra.setdefault(k, {}).get(s)
            extra[k][s] = f"{have}+baseline:{name}" if have else f"baseline:{name}"
    candidate_cost = sum(base_info[n]["evaluations"] for n in names if n in pipeline.CANDIDATE_BASELINES)

    pool0, cal_cols, val_cols, on = pipeline.stages._decision_pool(run_, mspec, None) if set(variants) - {"beam"} else \
        (racing.WindowPool(L, 1, None), [], [], "")
    measure = memo_measure(pool0._measure, L)
    chosen: list[dict] = []
    decisions: dict = {}
    for n in budgets:
        rows = [row_of[m] for m in design[:n]]
        s = s_all.subset(np.array(rows))
        t = time.monotonic()
        fit = method_lib.fit(s, mspec.surrogate, curve=False)
        c = method_lib.contributions(s, fit, mspec)
        fit_s = time.monotonic() - t
        decisions[n] = {"fit_and_contributions_s": round(fit_s, 1), "r2": float(fit.headline["r2"])}
        for k in ks:
            chosen.append({"method": "rank-and-cut", "masks": n, "k": k, "removed": rank_and_cut(c.values, k),
                           "source": "rank-and-cut", "evaluations": {"sample": n * W, "decide": 0, "baselines": 0}})
        for variant in variants:
            if variant == "beam":  # the surrogate's own best set, never measured (the decision's first candidate)
                for k in ks:
                    top = beam_search(fit.predict, L, k, n_candidates=1)[0]
                    chosen.append({"method": "beam", "masks": n, "k": k, "removed": top.removed, "source": "beam",
                                   "ppl_predicted": float(s.ppl_full / top.predicted),
                                   "evaluations": {"sample": n * W, "decide": 0, "baselines": 0}})
                continue
            pool = racing.WindowPool(L, pool0.W, measure)
            t = time.monotonic()
            ds = method_lib.decide(fit, c, ks, None, None, mspec, pool=pool, calibration_cols=cal_cols,
                                   validation_cols=val_cols, extra=extra if variant == "product" else None, on=on)
            decisions[n][variant] = {"seconds": round(time.monotonic() - t, 1), "evaluations": int(pool.evaluations)}
            print(f"{n} masks, {variant}: {pool.evaluations} evaluations, {time.monotonic() - t:.0f} s",
                  file=sys.stderr, flush=True)
            for d in ds.items:
                chosen.append({"method": variant, "masks": n, "k": d.k, "removed": tuple(d.removed), "source": d.source,
                               "evaluations": {"sample": n * W, "decide": int(pool.evaluations),
                                               "baselines": candidate_cost if variant == "product" else 0}})
    for name in names:
        for k in ks:
            chosen.append({"method": name, "masks": 0, "k": k, "removed": base_sets[name][k], "source": name,
                           "evaluations": {"sample": 0, "decide": 0, "baselines": base_info[name]["evaluations"]}})
    for row in chosen:
        row["evaluations"]["total"] = sum(row["evaluations"].values())

    full_ppl = {}
    for split in splits:
        windows = make_windows(lm.tokenizer, DataSpec(source=split, n_windows=args.eval_windows, seq_len=args.seq_len))
        cands = list(dict.fromkeys([()] + [row["removed"] for row in chosen]))
        nll, tok = MaskEvaluator(lm, windows).window_losses(np.stack([removal_mask(x, L) for x in cands]))  # (c, W)
        index = {x: i for i, x in enumerate(cands)}
        ppl = np.exp(nll.sum(1) / tok.sum(1))
        full_ppl[split] = float(ppl[0])
        for k in ks:
            best = min(names, key=lambda b: ppl[index[base_sets[b][k]]])
            for row in (r for r in chosen if r["k"] == k):
                sub = [index[row["removed"]], index[base_sets[best][k]]]
                cmp = compare_candidates([row["removed"], base_sets[best][k]], nll[sub], tok[sub], level=LEVEL,
                                         chosen=0)
                row.setdefault("heldout", {})[split] = float(ppl[index[row["removed"]]])
                row.setdefault("best_baseline", {})[split] = best
                row.setdefault("vs_best_baseline", {})[split] = [cmp.ratio[1], cmp.ci_low[1], cmp.ci_high[1]]
                row.setdefault("best_or_tied", {})[split] = not cmp.ci_high[1] < 1.0
    for row in chosen:
        row["removed"] = list(row["removed"])
    return {"bench": "real_budget", "model": args.model, "n_layers": L, "calibration_windows": W,
            "pool_windows": pool0.W, "run_id": run_.run_id, "rows": chosen, "baselines": base_info,
            "decisions": decisions, "full_ppl": full_ppl, "level": LEVEL, "eval_windows": args.eval_windows,
            "settings": {"masks": budgets, "ks": ks, "variants": variants, "baselines": names,
                         "method": dataclasses.asdict(mspec)},
            "command": "python -m bench.real_budget " + " ".join(shlex.quote(a) for a in sys.argv[1:])}


def lines_for(r: dict) -> list[str]:
    out = [f"{r['model']} ({r['n_layers']} layers), {r['calibration_windows']} calibration windows, race pool "
           f"{r['pool_windows']} windows; full model held-out ppl {r['full_ppl']}"]
    for split in r["full_ppl"]:
        out.append(f"{split}: method, masks, k, evaluations, ppl, ratio to best baseline [90%]")
        for row in sorted(r["rows"], key=lambda x: (x["k"], x["method"], x["masks"])):
            v = row["vs_best_baseline"][split]
            out.append(f"  {row['method']:>16} {row['masks']:>4} k={row['k']:>2} {row['evaluations']['total']:>7} "
                       f"{row['heldout'][split]:9.2f}  x{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}] "
                       f"({row['best_baseline'][split]}) {row['source']}")
    return out


def main(argv=None) -> dict:
    args = parse(argv)
    r = run(args)
    return emit(lines_for(r), r, args.json)


if __name__ == "__main__":
    run_script(main)
