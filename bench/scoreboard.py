"""The field's scoreboard: the product's decision against every baseline, in the papers' format.

Rows: the full model, then for each k the product's decision, rank-and-cut on its contributions
and every baseline criterion (engine.baselines: block-influence, angular, ppl, taylor, sleb, last,
random). Columns: held-out (demo-test) and out-of-domain (demo-ood) perplexity, each zero-shot
task's accuracy (lm-eval, engine.zeroshot) and their mean. Within each k the best value of each
column is marked `*`, and every row tied with it (its paired interval against the best contains 0:
a bootstrap over the perplexity windows, or the paired bootstrap over the task items) is marked
`=`. Written to bench/results/<name>.md and .csv (with the command), a Pareto chart of mean accuracy
and held-out perplexity against parameters kept (<name>_pareto.png, a static image that opens
offline; <name>_pareto.html, interactive, fetches plotly.js from its CDN), and with
--json one object whose `rows` are [{method, k, heldout_ppl, mean_acc, ...}].

    python -m bench.scoreboard --model demo --ks 2,4 --limit 20 --json
    python -m bench.scoreboard --model smollm2 --ks 8 --limit 20 --masks 48 ...

Every evaluation goes through engine.pipeline (sampling, decision, baselines and zero-shot results
are stored in the cache), so a rerun with the same options only fills what is missing.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import emit, run_script
from engine.config import ZEROSHOT_TASKS, DataSpec, MethodSpec, ModelSpec, RunSpec, SamplingSpec, ZeroShotSpec

RESULTS = Path(__file__).resolve().parent / "results"
ALL_BASELINES = ("block-influence", "angular", "ppl", "taylor", "sleb", "last", "random")
SPLITS = ("demo-test", "demo-ood")  # held-out (same domain as the demo calibration text) and out of domain


def _args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.scoreboard", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--data", default="demo", help="calibration text (default %(default)s)")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--masks", type=int, default=128, help="masks sampled for the product's decision")
    p.add_argument("--ks", default=None, help="layers removed, comma-separated (default 4,6,8,10; demo 2,4,6)")
    p.add_argument("--methods", default=",".join(("decision", "rank-and-cut", *ALL_BASELINES)))
    p.add_argument("--tasks", default=",".join(ZEROSHOT_TASKS))
    p.add_argument("--limit", type=int, default=50, help="items per task (default %(default)s)")
    p.add_argument("--lm-batch-size", type=int, default=16)
    p.add_argument("--swaps", type=int, default=MethodSpec().swaps)
    p.add_argument("--n-compare", type=int, default=MethodSpec().n_compare)
    p.add_argument("--n-verify", type=int, default=MethodSpec().n_verify)
    p.add_argument("--val-windows", type=int, default=MethodSpec().val_windows)
    p.add_argument("--heldout-windows", type=int, default=16, help="windows of each held-out split (default %(default)s)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--boot", type=int, default=2000)
    p.add_argument("--name", default=None, help="output file stem in bench/results (default scoreboard[_demo])")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out-dir", default=str(RESULTS), help="where the markdown, CSV and chart go (default bench/results)")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def _window_boot(nll_a, tok_a, nll_b, tok_b, boot: int, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Paired bootstrap over windows of log(ppl_a / ppl_b): the central `level` interval."""
    rng = np.random.default_rng(seed)
    W = nll_a.shape[0]
    idx = rng.integers(0, W, size=(boot, W))  # (boot, W)
    la = nll_a[idx].sum(1) / tok_a[idx].sum(1)
    lb = nll_b[idx].sum(1) / tok_b[idx].sum(1)
    lo, hi = np.quantile(la - lb, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _mark(rows: list[dict], column: str, lower_better: bool, tied) -> None:
    """Within each k, '*' on the best row of `column` (and rows with the same set), '=' on rows tied with
    it. The full model (k = 0) is the reference, not a contender: never marked."""
    for k in sorted({r["k"] for r in rows} - {0}):
        group = [r for r in rows if r["k"] == k and r.get(column) is not None and math.isfinite(r[column])]
        if not group:
            continue
        best = (min if lower_better else max)(group, key=lambda r: r[column])
        for r in group:
            if r is best or r["removed"] == best["removed"]:
                r["marks"][column] = "*"
            elif tied(best, r):
                r["marks"][column] = "="


def main(argv=None) -> dict:
    from engine import pipeline
    from engine.data import make_windows
    from engine.evaluate import MaskEvaluator
    from engine.decision import removal_mask
    from engine.zeroshot import Progress, compare

    a = _args(argv)
    t0 = time.monotonic()
    demo = a.model == "demo"
    ks = tuple(int(x) for x in (a.ks or ("2,4,6" if demo else "4,6,8,10")).split(","))
    methods = tuple(m.strip() for m in a.methods.split(",") if m.strip())
    baselines = tuple(m for m in methods if m in ALL_BASELINES)
    name = a.name or ("scoreboard_demo" if demo else "scoreboard")
    cache = a.cache_dir
    spec = RunSpec(model=ModelSpec(name=a.model), data=DataSpec(source=a.data, n_windows=a.windows, seq_len=a.seq_len),
                   sampling=SamplingSpec(n_masks=a.masks))
    # ks named as `engine run --ks` / bench.real name them, so a decision either stored is found by the other
    method = MethodSpec(remove=max(ks), ks=ks, swaps=a.swaps, n_compare=a.n_compare, n_verify=a.n_verify,
                        val_windows=a.val_windows)
    zs = ZeroShotSpec(tasks=tuple(t.strip() for t in a.tasks.split(",") if t.strip()), limit=a.limit,
                      batch_size=a.lm_batch_size, pair_boot=a.boot)
    from engine.tasks import check_tasks

    check_tasks(zs.tasks, pipeline._cache_root(cache))  # before minutes of sampling
    stages = {}

    def stage(label, t):
        stages[label] = round(time.monotonic() - t, 1)
        print(f"[scoreboard] {label}: {stages[label]} s", file=sys.stderr, flush=True)

    t = time.monotonic()
    evaluation = pipeline.EvalSpec(threads=a.threads)
    run = pipeline.open_run(spec, cache, evaluation)
    pipeline.sample(spec, cache, progress=True, json_mode=a.json, run=run, evaluation=evaluation)
    stage("sample", t)
    decided = pipeline.stored(run, "decisions", method)
    if {"decision", "rank-and-cut"} & set(methods) and (not decided or decided["stale"]
                                                        or not set(ks) <= set(decided["ks"])):
        t = time.monotonic()
        pipeline.decide(run, method, ks=ks)
        stage("decide", t)
    missing = [b for b in baselines if run.store.get_artifact(f"baseline:{b}") is None]
    if missing:
        t = time.monotonic()
        pipeline.baseline(spec, missing, k_max=max(ks), cache_dir=cache, evaluation=evaluation)
        stage("baselines", t)

    rows = [{"method": "full", "k": 0, "removed": ()}]
    for k in ks:
        for m in methods:
            c = pipeline.resolve_choice(m, k, run, method)
            rows.append({"method": m, "k": k, "removed": tuple(c.removed)})
    sets = list(dict.fromkeys(r["removed"] for r in rows))
    L = run.n_layers

    # held-out perplexities: every distinct set in one prefix-shared pass per split
    t = time.monotonic()
    masks = np.stack([removal_mask(s, L) for s in sets])  # (n_sets, L)
    losses = {}
    for split in SPLITS:
        windows = make_windows(run.lm.tokenizer, DataSpec(source=split, n_windows=a.heldout_windows,
                                                          seq_len=spec.data.seq_len))
        nll, tok = MaskEvaluator(run.lm, windows).window_losses(masks)  # (n_sets, W) each
        losses[split] = {s: (nll[i], tok[i]) for i, s in enumerate(sets)}
    stage("heldout ppl", t)

    # zero-shot accuracy: each distinct set once (stored results are reused)
    t = time.monotonic()
    store = pipeline.zeroshot_store(run.lm, cache)
    bar = Progress(True, a.json, label="zero-shot")
    zero = {}
    for i, s in enumerate(sets):
        print(f"[scoreboard] zero-shot {i + 1}/{len(sets)}: removed {list(s) or 'none'}", file=sys.stderr, flush=True)
        zero[s] = pipeline.evaluate_choice(run.lm, pipeline.ModelChoice("set", s), zs, cache, bar, store)
    stage("zero-shot", t)

    params_full = run.lm.n_params
    for r in rows:
        z = zero[r["removed"]]
        r["removed"] = list(r["removed"])
        r["params_kept"] = z["params"] / params_full
        for split, col in zip(SPLITS, ("heldout_ppl", "ood_ppl")):
            nll, tok = losses[split][tuple(r["removed"])]
            r[col] = float(math.exp(nll.sum() / tok.sum()))
        r["acc"] = {tk: z["tasks"][tk]["acc"] for tk in zs.tasks}
        r["acc_stderr"] = {tk: z["tasks"][tk]["stderr"] for tk in zs.tasks}
        r["mean_acc"], r["mean_acc_stderr"] = z["mean"], z["mean_stderr"]
        r["marks"] = {}

    def ppl_tied(split):
        def tied(best, r):
            lo, hi = _window_boot(*losses[split][tuple(r["removed"])], *losses[split][tuple(best["removed"])], a.boot)
            return lo <= 0 <= hi
        return tied

    cmp_cache = {}

    def acc_cmp(best, r):
        key = (tuple(best["removed"]), tuple(r["removed"]))
        if key not in cmp_cache:
            cmp_cache[key] = compare(zero[key[0]], zero[key[1]], boot=a.boot)
        return cmp_cache[key]

    _mark(rows, "heldout_ppl", True, ppl_tied("demo-test"))
    _mark(rows, "ood_ppl", True, ppl_tied("demo-ood"))
    _mark(rows, "mean_acc", False, lambda b, r: not acc_cmp(b, r)["mean"]["separated"])
    for tk in zs.tasks:
        for r in rows:
            r[f"acc:{tk}"] = r["acc"][tk]
        _mark(rows, f"acc:{tk}", False, lambda b, r, tk=tk: not acc_cmp(b, r)["tasks"][tk]["separated"])
    # the decision against each other method at each k (paired, mean accuracy)
    for r in rows:
        if r["method"] not in ("full", "decision"):
            d = next((x for x in rows if x["k"] == r["k"] and x["method"] == "decision"), None)
            if d is not None:
                m = acc_cmp(d, r)["mean"]
                r["decision_minus_this"] = {"diff": m["diff"], "lo": m["lo"], "hi": m["hi"]}
    command = "python -m bench.scoreboard " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    wall = round(time.monotonic() - t0, 1)
    out = {"model": a.model, "n_layers": L, "ks": list(ks), "limit": a.limit, "tasks": list(zs.tasks),
           "masks": a.masks, "command": command, "seconds": wall, "stages": stages,
           "heldout_windows": a.heldout_windows, "rows": [{kk: v for kk, v in r.items() if not kk.startswith("acc:")}
                                                         for r in rows]}
    paths = _write(rows, out, zs.tasks, name, Path(a.out_dir))
    out["files"] = [str(p) for p in paths]
    lines = [_markdown(rows, out, zs.tasks), f"wrote {', '.join(out['files'])} in {wall} s"]
    return emit(lines, out, a.json)


def _cell(r, col, fmt) -> str:
    v = r.get(col)
    return ("n/a" if v is None else fmt.format(v)) + r["marks"].get(col, "")


def _markdown(rows, out, tasks) -> str:
    head = ["method", "k", "params kept", "held-out ppl", "OOD ppl", *tasks, "mean acc", "decision - this (95% paired)"]
    lines = [f"Zero-shot scoreboard: {out['model']} ({out['n_layers']} layers), lm-eval acc on the first "
             f"{out['limit']} items of each task, perplexity on {out['heldout_windows']} windows of demo-test / "
             f"demo-ood; `*` best in its k, `=` tied with the best (paired 95% interval contains 0); the full model is the reference (unmarked).", "",
             f"Command: `{out['command']}` ({out['seconds']} s)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        d = r.get("decision_minus_this")
        cells = [r["method"], str(r["k"]), f"{r['params_kept']:.1%}", _cell(r, "heldout_ppl", "{:.2f}"),
                 _cell(r, "ood_ppl", "{:.1f}"), *[_cell(r, f"acc:{t}", "{:.3f}") for t in tasks],
                 _cell(r, "mean_acc", "{:.3f}") + f" ± {r['mean_acc_stderr']:.3f}",
                 "" if d is None else f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write(rows, out, tasks, name, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    md, csv_path, html = folder / f"{name}.md", folder / f"{name}.csv", folder / f"{name}_pareto.html"
    _atomic_write(md, _markdown(rows, out, tasks) + "\n")
    cols = ["method", "k", "removed", "params_kept", "heldout_ppl", "ood_ppl", *[f"acc:{t}" for t in tasks],
            "mean_acc", "mean_acc_stderr"]
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([f"# {out['command']}"])
    w.writerow(cols + ["marks"])
    for r in rows:
        w.writerow([" ".join(map(str, r[c])) if c == "removed" else r[c] for c in cols]
                   + [";".join(f"{k}{v}" for k, v in r["marks"].items())])
    _atomic_write(csv_path, buf.getvalue())
    _atomic_write(html, _pareto_html(rows, out))
    png = folder / f"{name}_pareto.png"
    _pareto_png(rows, out, png)
    return [md, csv_path, html, png]


def _pareto_png(rows, out, path: Path) -> None:
    """The Pareto chart as a static image (matplotlib): opens offline, unlike the HTML's CDN plotly.js.
    Accuracy with +-1 stderr bars; perplexity on a log axis; parameters kept decreasing to the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, ppl) = plt.subplots(1, 2, figsize=(12, 4.6))
    for m in dict.fromkeys(r["method"] for r in rows):
        rs = sorted((r for r in rows if r["method"] == m), key=lambda r: -r["params_kept"])
        x = [r["params_kept"] for r in rs]
        acc.errorbar(x, [r["mean_acc"] for r in rs], yerr=[r["mean_acc_stderr"] for r in rs], marker="o",
                     capsize=3, label=m, lw=2.5 if m == "decision" else 1.2)
        ppl.plot(x, [r["heldout_ppl"] for r in rs], marker="o", label=m, lw=2.5 if m == "decision" else 1.2)
    acc.set(title="mean zero-shot accuracy (higher is better; bars: 1 stderr)", xlabel="parameters kept (fraction)",
            ylabel="mean accuracy")
    ppl.set(title="held-out perplexity (lower is better)", xlabel="parameters kept (fraction)", ylabel="perplexity",
            yscale="log")
    for ax in (acc, ppl):
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    ppl.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"{out['model']}: accuracy and perplexity vs parameters kept (limit {out['limit']} items per task)")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _pareto_html(rows, out) -> str:
    import plotly.graph_objects as go
    import plotly.io as pio
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("mean zero-shot accuracy (higher is better)",
                                                        "held-out perplexity (lower is better, log)"))
    for m in dict.fromkeys(r["method"] for r in rows):
        rs = sorted((r for r in rows if r["method"] == m), key=lambda r: -r["params_kept"])
        x = [r["params_kept"] for r in rs]
        text = [f"{m} k={r['k']}" for r in rs]
        fig.add_trace(go.Scatter(x=x, y=[r["mean_acc"] for r in rs], mode="lines+markers", name=m, legendgroup=m,
                                 text=text, error_y={"type": "data", "array": [r["mean_acc_stderr"] for r in rs]}),
                      row=1, col=1)
        fig.add_trace(go.Scatter(x=x, y=[r["heldout_ppl"] for r in rs], mode="lines+markers", name=m,
                                 legendgroup=m, showlegend=False, text=text), row=1, col=2)
    fig.update_xaxes(title_text="parameters kept (fraction of the full model)", autorange="reversed")
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_layout(title=f"{out['model']}: accuracy and perplexity vs parameters kept (limit {out['limit']})",
                      height=480, width=1100)
    return pio.to_html(fig, full_html=True, include_plotlyjs="cdn")  # 5 MB smaller; the browser fetches plotly.js


if __name__ == "__main__":
    run_script(main)
