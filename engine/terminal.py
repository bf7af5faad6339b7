"""Plain-text summaries of the CLI's JSON results (what a person reads in a terminal).

Pure functions from the result dicts of engine.pipeline to strings; no computation.
"""

from __future__ import annotations

import math
from typing import Callable

from engine.registry import Registry


def _num(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a" if x is None else str(x)
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _bar(value: float, top: float, width: int = 30) -> str:
    if not (top > 0 and math.isfinite(value)):
        return ""
    return "#" * max(0, round(width * max(value, 0.0) / top))


def contributions_table(values, stderr=None, ci_low=None, ci_high=None, level=None) -> str:
    """One line per layer: index, value, error bar, interval (when given), rank (1 = least important), a bar."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    rank = {i: r + 1 for r, i in enumerate(order)}
    top = max((abs(v) for v in values), default=0.0)
    ci = ci_low is not None and ci_high is not None
    head = f"{f'{level:.0%} interval':>21} " if ci and level else (f"{'interval':>21} " if ci else "")
    lines = [f"{'layer':>5} {'value':>10} {'± err':>9} {head}{'rank':>5}"]
    for i, v in enumerate(values):
        err = "" if stderr is None or stderr[i] is None else f"{stderr[i]:9.4f}"
        iv = f"[{ci_low[i]:9.4f}, {ci_high[i]:9.4f}] " if ci else ""
        lines.append(f"{i:>5} {v:10.4f} {err:>9} {iv}{rank[i]:>5}  {_bar(v, top)}")
    return "\n".join(lines)


def fit_summary(r: dict) -> str:
    rep = r["report"]
    spec, test = rep["spec"], rep["test"]["overall"]
    lines = [
        f"surrogate {spec['kind']}" + (f"/{spec['preset']}" if spec["kind"] == "mlp" else "")
        + f", ensemble of {spec['ensemble']}, fitted on {rep['split']['n_train']} of {r['n_masks']} masks",
        f"held-out ({test['n']} masks): R² {_num(test['r2'])}  Spearman {_num(test['spearman'])}  "
        f"MAE {_num(test['mae'], 4)} (score)  MAE {_num(test['mae_ppl'], 2)} (perplexity, "
        f"{_num(100 * test['mape_ppl'], 1)}% relative)",
        "per stratum (kept layers): "
        + ", ".join(f"{k}: R² {_num(m['r2'], 2)} (n={m['n']})" for k, m in sorted(rep["test"]["per_stratum"].items(),
                                                                     key=lambda kv: -int(kv[0]))),
    ]
    if "learning_curve" in r:
        lc = r["learning_curve"]
        pts = ", ".join(f"{n}: {_num(m['r2'], 3)}" for n, m in zip(lc["sizes"], lc["metrics"]))
        lines.append(f"learning curve (training masks: held-out R²): {pts}")
    wc = r.get("work_curve") or {}
    if wc.get("points"):
        pts = ", ".join(f"{p['work']:,}: {_num(p['spearman'], 3)}" for p in wc["points"])
        lines.append(f"quality vs work (token-layer calls, store order: held-out Spearman, n={wc['n_test']}): {pts}")
    elif wc.get("note"):
        lines.append(f"quality vs work: {wc['note']}")
    if "comparison" in r:
        lines.append("comparison on the same split:")
        for row in r["comparison"]["rows"]:
            name = row["kind"] + (f"/{row['preset']}" if row.get("preset") else "")
            lines.append(f"  {name:16} R² {_num(row['r2'])}  Spearman {_num(row['spearman'])}  "
                         f"MAE {_num(row['mae'], 4)}  fit {_num(row['fit_seconds'], 2)} s")
    return "\n".join(lines)


def shapley_summary(r: dict) -> str:
    lines = [f"{r['estimator']}  ({r['n_evaluations']:,} surrogate evaluations, {r.get('n_masks', '?')} evaluated "
             f"masks)", f"estimates the {r.get('estimand') or 'contribution'} of each layer; ± err: "
             + (r.get("details") or {}).get("stderr_is", "Monte Carlo standard error"),
             contributions_table(r["contributions"], r.get("stderr"), r.get("ci_low"), r.get("ci_high"),
                                 r.get("level"))]
    if r.get("ci_low") is not None:
        lines.append(f"interval: {r.get('interval_estimand')}; sampling noise and the surrogate's estimated bias "
                     "(python -m bench.uncertainty measures its coverage)")
    eff = r.get("efficiency")
    if eff:
        lines.append(f"efficiency: sum of values {eff['total']:.4f} vs f(all kept) - f(none kept) "
                     f"{eff['grand_minus_empty']:.4f} (gap {eff['gap']:.2e}; Shapley values close this gap, "
                     "other semivalues need not)")
    lines.append("least important first: " + " ".join(map(str, r["ranking"])))
    return "\n".join(lines)


def run_summary(r: dict) -> str:
    lines = [
        f"run {r['run_id']}: {r['n_masks']} masks ({r['evaluated']} evaluated now); surrogate held-out "
        f"R² {_num(r['r2'])}, Spearman {_num(r['spearman'])}",
        f"contributions: {r['estimator']}",
        contributions_table(r["contributions"], r.get("contributions_stderr"), r.get("ci_low"), r.get("ci_high"),
                            r.get("level")),
        "",
        f"{'k':>3}  {'removed':24} {'predicted':>10} {'measured':>10} {'sets':>5}  method",
    ]
    for d in r["by_k"]:
        lines.append(f"{d['k']:>3}  {str(d['removed']):24} {_num(d['ppl_predicted'], 2):>10} "
                     f"{_num(d['ppl_measured'], 2):>10} {d.get('n_measured', ''):>5}  {d['method']}"
                     + (f", from {d['source']}" if d.get("source") else "")
                     + (" (budget hit)" if d.get("budget_hit") else "")
                     + (f"; tied: {', '.join(map(str, d['tied']))}" if d.get("tied") else ""))
    if r.get("decide_evaluations") is not None:
        cost = r.get("decide_cost") or {}
        hit = (f"; the budget of {cost.get('budget')} was hit, so the race was cut short" if cost.get("budget_hit")
               else "")
        lines.append(f"sets = removal sets raced for that k (rank-and-cut, the surrogate's beam, the baselines' sets, "
                     f"swaps); the decision spent {r['decide_evaluations']} set-window evaluations{hit}")
    elif r.get("tied_on"):
        lines.append("sets = removal sets measured on the calibration windows for that k (verification and swaps)")
    if r.get("tied_on"):
        lines.append(f"tied = paired bootstrap interval ({_num(r.get('tie_level'), 2)}) of the perplexity ratio "
                     f"to the chosen set contains 1, on {r['tied_on']}")
    lines.append(f"calibration perplexity: full {_num(r['ppl_full'], 2)} -> pruned {_num(r['ppl_measured'], 2)} "
                 f"(predicted {_num(r['ppl_predicted'], 2)}), removing {list(r['removed'])}")
    for name, h in r.get("heldout", {}).items():
        lines.append(f"{name}: full {_num(h['ppl_full'], 2)} -> pruned {_num(h['ppl_pruned'], 2)}")
    if r.get("out"):
        v = r.get("verification") or {}
        lines.append(f"exported to {r['out']} (reloaded in a fresh process: ppl {_num(v.get('ppl_reloaded'), 4)}, "
                     f"generate with KV cache {'ok' if v.get('ok') else 'FAILED'})")
    lines.append(f"{_num(r['seconds'], 1)} s")
    return "\n".join(lines)


def baseline_summary(r: dict) -> str:
    results = r.get("results") or {r["method"]: r}
    blocks = [
        "\n".join([f"{b['method']} on {r['model']} / {r['data']} ({_num(b['seconds'], 1)} s); higher score = more "
                   "important", contributions_table(b["scores"]), "removal order: " + " ".join(map(str, b["order"]))])
        for b in results.values()
    ]
    if r.get("run_id"):
        blocks.append(f"stored in run {r['run_id']}")
    return "\n\n".join(blocks)


def _work(x) -> str:
    """Token-layer calls, short: 1.2e+09."""
    return "-" if not x else f"{float(x):.2g}"


def status_summary(result: dict) -> str:
    runs = result["runs"]
    if not runs:
        return "no runs yet (python -m engine sample ...)"
    head = f"{'run_id':14} {'status':10} {'samples':>9} {'L':>3} {'work':>8}  model / data"
    rows = [
        f"{r['run_id']:14} {r['status']:10} {r['n_samples']:>5}/{r['target'] or '-':<4}"
        f"{r['n_layers'] or '-':>3} {_work(r.get('work')):>8}  {r['model'] or '?'} / {r['data'] or '?'}"
        + (f"\n    {r['partial']} partial rows" if r.get("partial") else "")
        + (f"\n    rounds: " + ", ".join(f"{k}: {v['masks']} ({v['active']} active)" for k, v in r["rounds"].items())
           if len(r.get("rounds") or {}) > 1 else "")
        + (f"\n    {r['problem']}" if r.get("problem") else "")  # damaged / unreadable / empty run folders
        for r in runs
    ]
    return "\n".join([head, *rows])


def sample_summary(r: dict) -> str:
    line = (f"run {r['run_id']}: evaluated {r['evaluated']} masks in {r['seconds']:.1f} s; "
            f"{r['total']}/{r['target']} done; PPL(full) {_num(r['ppl_full'])}; store {r['store']}")
    if r.get("work"):
        line += f"\nwork: {_work(r['work'])} token-layer calls now, {_work(r.get('work_total'))} over the stored rows"
    if r.get("completed") or r.get("partial"):
        line += (f"\nmulti-fidelity: {r.get('completed', 0)} masks completed now; {r.get('partial', 0)} stay "
                 "evaluated on their first windows only")
    if len(r.get("rounds") or {}) > 1:
        line += "\nrounds: " + ", ".join(f"{k}: {v['masks']} ({v['active']} active)" for k, v in r["rounds"].items())
    if r["nonfinite"]:
        line += f"\n{r['nonfinite']} masks gave a non-finite perplexity (score 0)."
    if r["stopped"]:
        line += f"\nstopped ({r['stopped']}); run the same command again to resume."
    return line


def info_summary(r: dict) -> str:
    return (f"{r['model']}: {r['family']} ({r['model_class']}), {r['n_layers']} layers, {r['n_params'] / 1e6:.2f} M "
            f"parameters, {r['dtype']} on {r['device']}\n"
            f"perplexity {_num(r['ppl'])} on {r['n_windows']} x {r['seq_len']} tokens of {r['data']} "
            f"(hash {r['data_hash']})")


def export_summary(r: dict) -> str:
    v = r.get("verification") or {}
    if r.get("format") == "gguf":
        fallback = f"; {len(r['fallback_tensors'])} tensors kept f16 (rows not a multiple of 32)" if r.get("fallback_tensors") else ""
        return (f"exported to {r['out']} (GGUF {r['quant']}, {r['size_bytes'] / 2**20:.1f} MiB{fallback}): layers "
                f"{r['removed']} removed; calibration perplexity {_num(r['ppl_full'], 2)} -> {_num(r['ppl_measured'], 2)} "
                f"in memory; read back in a fresh process with transformers' GGUF loader: ppl "
                f"{_num(v.get('ppl_reloaded'), 4)} (relative difference {v.get('ppl_rel_diff', float('nan')):.2e}, "
                f"allowed {r['reload_rtol']:.0e}), generate with KV cache {'ok' if v.get('ok') else 'FAILED'}; "
                f"manifest {r['manifest']}")
    return (f"exported to {r['out']}: layers {r['removed']} removed; calibration perplexity {_num(r['ppl_full'], 2)} -> "
            f"{_num(r['ppl_measured'], 2)}; reloaded in a fresh process: ppl {_num(v.get('ppl_reloaded'), 4)}, "
            f"generate with KV cache {'ok' if v.get('ok') else 'FAILED'}")


def heal_summary(r: dict) -> str:
    """Layers, budget, perplexity full / pruned / healed per text with the paired ratio interval, export."""
    resumed = f", resumed from step {r['resumed_from']}" if r["resumed_from"] else ""
    lines = [f"healed {r['model']} without layers {r['removed']} of {r['n_layers']} ({r['rule']}): {r['steps']} LoRA "
             f"steps on {r['heal_data']} ({r['n_train_windows']} training windows){resumed}, {r['train_seconds']:.0f} s; "
             f"training loss {_num(r['loss_first'], 3)} -> {_num(r['loss_last'], 3)}"]
    rows = {f"{r['heal_data']} (held back)": r["held_back"], **r["heldout"]}
    for name, v in rows.items():
        rec = "" if v.get("recovered") is None else f", {v['recovered']:.0%} of the loss recovered"
        lines.append(f"perplexity {name}: full {_num(v['ppl_full'], 2)}, pruned {_num(v['ppl_before'], 2)} -> healed "
                     f"{_num(v['ppl_after'], 2)} (x{v['ratio']:.3f}, {v['level']:.0%} interval {v['ratio_low']:.3f}-"
                     f"{v['ratio_high']:.3f}, {v['n_windows']} windows){rec}")
    lines += [f"warning: {w}" for w in r.get("warnings", [])]
    if r.get("out"):
        v = r.get("verification") or {}
        lines.append(f"exported to {r['out']}: reloaded in a fresh process, ppl {_num(v.get('ppl_reloaded'), 4)}, "
                     f"check {'passed' if r.get('verified') else 'FAILED'}")
    else:
        lines.append("not exported (give --out FOLDER to write the healed model)")
    return "\n".join(lines)


def report_summary(r: dict) -> str:
    f, p = r["footprint"]["full"], r["footprint"]["pruned"]
    lines = [f"{r['model']}: removed layers {r['removed']} of {r['n_layers']} ({r['rule']})"]
    lines += [f"perplexity {name}: {_num(v['before'], 2)} -> {_num(v['after'], 2)}" for name, v in r["ppl"].items()]
    lines.append(f"parameters {f['n_params'] / 1e6:.2f} M -> {p['n_params'] / 1e6:.2f} M; forward {f['forward_ms']:.0f} ms "
                 f"-> {p['forward_ms']:.0f} ms; generation {f['tokens_per_s']:.1f} -> {p['tokens_per_s']:.1f} tokens/s")
    if r.get("html"):
        lines.append(f"report written to {r['html']}")
    return "\n".join(lines)


def interactions_summary(r: dict, n_pairs: int = 10) -> str:
    """Header, what the diagonal holds, the strongest pairs with standard errors, the bias note."""
    d = r["details"]
    surrogate = f"{r['surrogate']} " if r.get("surrogate") else ""
    lines = [f"{r['name']} ({r['index']}) of {r['n_layers']} layers on the surrogate ({r['method']}; "
             f"{r['n_evaluations']:,} evaluations; {surrogate}ensemble of {d['n_members']} fitted on {r['fit_on']} masks)",
             f"diagonal: {r['diagonal']}",
             f"± err: {d['stderr_is']}" + (f"; {d['interval']['level']:.0%} interval = value ± "
                                          f"{_z(d['interval']['level']):.3f} err" if d.get("interval") else ""),
             f"{'pair':>9} {'value':>10} {'± err':>9}  (+ synergy: worth more together; - redundancy)"]
    for p in r["pairs"][:n_pairs]:
        lines.append(f"{'(%d, %d)' % (p['i'], p['j']):>9} {p['value']:+10.4f} {_num(p['stderr'], 4):>9}")
    if (d.get("unsampled_weight_fraction") or 0.0) >= 0.005:
        lines.append(f"{d['unsampled_weight_fraction']:.0%} of this index's weight is on kept-layer counts the run "
                     "never sampled: there the surrogate extrapolates, and the errors do not include that bias"
                     + (" beyond the surrogate parts' disagreement." if d.get("interval", {}).get("bias_allowance")
                        is not None and r.get("surrogate") == "mlp+log-pairwise" else "."))
    chk = r.get("bias_check")
    if chk:
        n_pairs = len(r["pairs"])
        se = sorted(chk["stderr"][p["i"]][p["j"]] for p in r["pairs"])
        lines.append(f"bias check on the real evaluations ({chk['folds']} cross-fitted folds, {chk['covered_weight']:.0%} "
                     f"of the index weight covered): {chk['outside']} of {n_pairs} pair values lie outside its "
                     f"2-stderr interval (median stderr {_num(se[len(se) // 2], 4)})")
    if r.get("csv"):
        lines.append(f"CSV: {r['csv']}")
    return "\n".join(lines)


def _z(level: float) -> float:
    """Two-sided standard normal quantile of a `level` interval."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + level / 2)


def candidates_summary(r: dict) -> str:
    """Per k: the best sets with predicted (and measured) perplexity, frequent layers, swaps."""
    lines = [f"near-optimal removal sets ({r['top']} per k; full-model perplexity {_num(r['ppl_full'])})"]
    for c in r["candidates"]:
        lines.append(f"k={c['k']} ({c['search']}):")
        for s in c["sets"]:
            meas = "" if s["ppl_measured"] is None else f"  measured {_num(s['ppl_measured'], 2)}"
            band = "" if s["ppl_low"] is None else f" [{_num(s['ppl_low'], 2)}, {_num(s['ppl_high'], 2)}]"
            lines.append(f"  remove {tuple(s['removed'])}: predicted PPL {_num(s['ppl_predicted'], 2)}{band}{meas}")
        freq = sorted(enumerate(c["layer_frequency"]), key=lambda x: -x[1])
        lines.append("  most removed: " + ", ".join(f"{i} ({f:.0%})" for i, f in freq if f > 0)[:200])
        if c["swaps"]:
            lines.append("  interchangeable: " + ", ".join(f"{s['a']}<->{s['b']} (x{s['count']})" for s in c["swaps"][:6]))
    return "\n".join(lines)


def zeroshot_summary(r: dict) -> str:
    """Per task accuracy ± stderr (n), the mean, then each paired comparison with its interval."""
    what = "full model" if not r["removed"] else f"{r['label']}: layers {','.join(map(str, r['removed']))} removed"
    limit = f"first {r['limit']} items per task" if r.get("limit") else "every item of each split"
    lines = [f"zero-shot accuracy (lm-eval) of {r['model']} ({what}; {r['n_kept']}/{r['n_layers']} layers kept), "
             f"{limit}{' (stored result)' if r.get('cached') else ''}",
             f"{'task':15} {'split':12} {'acc':>7} {'± se':>7} {'n':>6}  extra"]
    for t, v in r["tasks"].items():
        extra = []
        if v.get("acc_norm") is not None:
            extra.append(f"acc_norm {_num(v['acc_norm'])}")
        if v.get("perplexity") is not None:
            extra.append(f"ppl {_num(v['perplexity'], 2)}")
        lines.append(f"{t:15} {v['split'][:12]:12} {_num(v['acc']):>7} {_num(v['stderr']):>7} {v['n']:>6}  "
                     + ", ".join(extra))
    lines.append(f"{'mean':28} {_num(r['mean']):>7} {_num(r['mean_stderr']):>7}")
    for c in r.get("comparisons", []):
        m = c["mean"]
        b = c["b"] if c["b"] != "removed" else f"layers {','.join(map(str, c['b_removed']))} removed"
        verdict = "separated" if m["separated"] else "not separated"
        lines.append(f"vs {b}: mean acc difference {m['diff']:+.3f}, {m['level']:.0%} paired interval "
                     f"[{m['lo']:+.3f}, {m['hi']:+.3f}] ({verdict}); per task: "
                     + ", ".join(f"{t} {d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]" for t, d in c["tasks"].items()))
    scored = "" if r.get("cached") or not r.get("scorer") else f"scored by the {r['scorer']} scorer; "
    lines.append(f"{scored}stored in {r['store']}" + (f"; lm-eval results JSON: {r['out']}" if r.get("out") else ""))
    return "\n".join(lines)


SUMMARIES: Registry[Callable] = Registry("summary", {
             "report": report_summary, "export": export_summary, "status": status_summary, "sample": sample_summary,
             "info": info_summary, "fit": fit_summary, "shapley": shapley_summary, "run": run_summary, "prune": run_summary,
             "baselines": baseline_summary, "interactions": interactions_summary, "candidates": candidates_summary,
             "heal": heal_summary,
             "evaluate": zeroshot_summary})
