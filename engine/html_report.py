"""The stakeholder summary of a run: pure functions from the stored summary record to charts and
one self-contained HTML file (plotly.js inlined once: it opens with no network).

The record (built and stored by `pipeline.summarize`, artifact ``summary:<hash>``) holds: model
and run facts, the layers removed, perplexity before and after on calibration and held-out
text, the footprint of the full and the pruned model measured on this machine, perplexity
against layers removed for the method and for each stored baseline, and one greedy generation
by each model. No model is touched here.
"""

from __future__ import annotations

import html
import math

import plotly.graph_objects as go
import plotly.io as pio

# Fixed colours per method family on every chart (the app's pages use the same).
METHOD_COLOURS = {"method": "#1f77b4", "full model": "#7f7f7f", "block-influence": "#ff7f0e", "angular": "#2ca02c",
                  "ppl": "#d62728", "taylor": "#9467bd", "sleb": "#8c564b", "random": "#e377c2", "last": "#bcbd22"}


def layer_strip(n_layers: int, removed) -> go.Figure:
    """One cell per layer: kept (blue) or removed (red), layer index on hover."""
    removed = set(removed)
    z = [[0 if i in removed else 1 for i in range(n_layers)]]
    fig = go.Figure(go.Heatmap(z=z, x=list(range(n_layers)), y=["layers"], zmin=0, zmax=1, showscale=False,
                               colorscale=[[0, "#d62728"], [1, "#1f77b4"]], xgap=3,
                               hovertemplate="layer %{x}: %{customdata}<extra></extra>",
                               customdata=[["removed" if i in removed else "kept" for i in range(n_layers)]]))
    fig.update_layout(height=140, margin=dict(l=10, r=10, t=50, b=30), xaxis=dict(dtick=1, title="layer"),
                      title=f"{n_layers - len(removed)} of {n_layers} layers kept (red: removed)")
    return fig


def contribution_bars(contributions, removed, ci_low=None, ci_high=None, label: str = "contribution") -> go.Figure:
    """Each layer's contribution, removed layers in red, kept in blue, with its interval when given."""
    v = list(contributions)
    removed = set(removed)
    err = None
    if ci_low is not None and ci_high is not None:
        err = dict(type="data", array=[h - x for h, x in zip(ci_high, v)], arrayminus=[x - lo for lo, x in zip(ci_low, v)])
    fig = go.Figure(go.Bar(x=list(range(len(v))), y=v, error_y=err,
                           marker_color=["#d62728" if i in removed else "#1f77b4" for i in range(len(v))],
                           hovertemplate="layer %{x}: %{y:.4f}<extra></extra>"))
    fig.update_layout(height=260, margin=dict(l=10, r=10, t=40, b=30), xaxis=dict(dtick=1, title="layer"),
                      yaxis=dict(title=label), title="Each layer's contribution (red: removed)")
    return fig


CURVE_NAMES = {"method": "this workbench (game-theoretic decision)"}  # the summary's key for its own curve, in words


def ppl_curve(summary: dict) -> go.Figure:
    """Calibration perplexity against layers removed: the method's chosen sets and each baseline."""
    fig = go.Figure()
    curves = summary["curves"]
    for name, points in curves.items():
        fig.add_trace(go.Scatter(x=[p["k"] for p in points], y=[p["ppl"] for p in points], mode="lines+markers",
                                 name=CURVE_NAMES.get(name, name),
                                 line=dict(color=METHOD_COLOURS.get(name), width=3 if name == "method" else 1.5)))
    ks = sorted({p["k"] for points in curves.values() for p in points})
    if ks:
        fig.add_trace(go.Scatter(x=ks, y=[summary["ppl"]["calibration"]["before"]] * len(ks), mode="lines",
                                 name="full model", line=dict(dash="dot", color=METHOD_COLOURS["full model"])))
    fig.update_layout(title="Calibration perplexity vs layers removed", xaxis=dict(title="layers removed", dtick=1),
                      yaxis=dict(title="perplexity (log scale)", type="log"), legend=dict(orientation="h", y=-0.25))
    return fig


def default_prompt(texts, words: int = 8) -> str:
    """The first `words` words of the first prose line in `texts` (decoded windows): a line of at least
    `words` words, mostly letters, not markup (headings, directives, code). Falls back to the first
    words of the first text."""
    import re

    for text in texts:
        for line in text.splitlines():
            tokens = line.split()
            letters = sum(c.isalpha() or c.isspace() for c in line) / max(len(line), 1)
            if (len(tokens) >= words and letters > 0.85 and tokens[0][:1].isalpha() and tokens[0][:1].isupper()
                    and not re.match(r"^\s*(\.\.|:|#|>>>|\$)", line)):
                return " ".join(tokens[:words])
    first = next((t for t in texts if t.strip()), "")
    return " ".join(first.split()[:words])


def _pct(x: float) -> str:
    return f"{x:+.0%}" if abs(x) >= 0.01 else f"{x:+.1%}"


def story(summary: dict) -> str:
    """The decision in one sentence with its numbers and their uncertainty (the app's and the report's
    headline): layers removed, parameters kept, held-out perplexity change with its paired interval,
    and the speed change with its spread over interleaved repeats."""
    L, k = summary["n_layers"], len(summary["removed"])
    full, pruned = summary["footprint"]["full"], summary["footprint"]["pruned"]
    order = summary.get("splits_order") or list(summary["ppl"])  # the held-out texts in the order they were asked
    held = [n for n in order if n in summary["ppl"] and n != "calibration"]
    name = held[0] if held else "calibration"
    p = summary["ppl"][name]
    parts = [f"Removing {k} of {L} layers ({k / L:.0%}) keeps {pruned['n_params'] / full['n_params']:.0%} of the "
             f"parameters"]
    if "ratio" in p:
        parts.append(f"changes {'held-out' if held else 'calibration'} perplexity ({name}, {p['n_windows']} windows) "
                     f"by {_pct(p['ratio'] - 1)} [{p['level']:.0%} interval {_pct(p['ratio_low'] - 1)} to "
                     f"{_pct(p['ratio_high'] - 1)}], from {_fmt(p['before'])} to {_fmt(p['after'])}")
    else:
        parts.append(f"changes {name} perplexity from {_fmt(p['before'])} to {_fmt(p['after'])}")
    sp = summary.get("speed")
    if sp:
        parts.append(f"and runs a forward pass {sp['forward_speedup']:.2f}x as fast as the full model (range "
                     f"{sp['forward_low']:.2f}-{sp['forward_high']:.2f}x over {sp['repeats']} interleaved repeats)")
    return ", ".join(parts[:-1]) + (", " if len(parts) > 2 else " ") + parts[-1] + "."


def speed_warning(summary: dict) -> str | None:
    """Why the speed figures may be noise (a loaded machine), or None."""
    sp = summary.get("speed")
    if not sp or not sp["busy"]:
        return None
    return (f"Timings are noisy: the machine was busy (load average {sp['load_average']:.1f} on {sp['cores']} cores; "
            f"the full model's own times spread by {sp['full_spread']:.0%}). Compare the ratios, not the absolute "
            "times, and repeat on an idle machine.")


def _fmt(x, digits=2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:,.{digits}f}"


def rows(summary: dict) -> list[tuple[str, str, str]]:
    """(what, full model, pruned model) rows of the headline table."""
    full, pruned = summary["footprint"]["full"], summary["footprint"]["pruned"]
    out = [(f"perplexity, {name} ({p.get('n_windows', '?')} windows)" if name == "calibration" else f"perplexity, {name}",
            _fmt(p["before"]), _fmt(p["after"])) for name, p in summary["ppl"].items()]
    out = [(a, b, c + (f" ({_pct(p['ratio'] - 1)}, {p['level']:.0%} interval {_pct(p['ratio_low'] - 1)} to "
                        f"{_pct(p['ratio_high'] - 1)})" if "ratio" in p else ""))
           for (a, b, c), p in zip(out, summary["ppl"].values())]
    share = pruned["n_params"] / full["n_params"]
    out += [("decoder layers", str(full["n_layers"]), str(pruned["n_layers"])),
            ("parameters", f"{full['n_params'] / 1e6:,.2f} M", f"{pruned['n_params'] / 1e6:,.2f} M ({share:.0%})"),
            ("weight memory", f"{full['weight_mib']:,.1f} MiB", f"{pruned['weight_mib']:,.1f} MiB"),
            (f"forward pass over the windows (median of {full['repeats']})", f"{full['forward_ms']:,.0f} ms",
             f"{pruned['forward_ms']:,.0f} ms"),
            ("generation (greedy, KV cache)", f"{full['tokens_per_s']:,.1f} tokens/s",
             f"{pruned['tokens_per_s']:,.1f} tokens/s")]
    sp = summary.get("speed")
    if sp:
        out += [(f"speed, pruned vs full ({sp['repeats']} interleaved repeats: median, range)", "1.00x",
                 f"forward {sp['forward_speedup']:.2f}x ({sp['forward_low']:.2f}-{sp['forward_high']:.2f}), "
                 f"generation {sp['generation_speedup']:.2f}x ({sp['generation_low']:.2f}-{sp['generation_high']:.2f})")]
    return out


def zeroshot_rows(z: dict) -> list[tuple[str, str, str, str]]:
    """(task, full acc ± se, pruned acc ± se, pruned - full [95% paired interval]) rows, mean last."""
    def diff(d):
        return f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"

    out = [(f"{t} (n={v['n']})", f"{v['full']:.3f} ± {v['full_stderr']:.3f}", f"{v['pruned']:.3f} ± {v['pruned_stderr']:.3f}",
            diff(v["diff"])) for t, v in z["tasks"].items()]
    m = z["mean"]
    out.append(("mean", f"{m['full']:.3f}", f"{m['pruned']:.3f}", diff(m["diff"])))
    return out


def zeroshot_html(z: dict | None) -> str:
    """The zero-shot table of the report ('' when none was stored)."""
    if not z:
        return ""
    limit = f"first {z['limit']} items of each task" if z.get("limit") else "every item"
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in zeroshot_rows(z))
    return (f"<h2>Zero-shot accuracy (lm-eval, {limit})</h2><table><tr><th>task</th><th>full model</th>"
            f"<th>pruned model</th><th>pruned - full (95% paired)</th></tr>{body}</table>")


def to_html(summary: dict, healing: dict | None = None) -> str:
    """One self-contained HTML page (plotly.js inlined in the first chart). `healing`: a `heal` record of
    the same set (default: the one stored in the summary), shown as perplexity before/after healing."""
    healing = healing or summary.get("healing")
    charts = [layer_strip(summary["n_layers"], summary["removed"]), ppl_curve(summary)]
    parts = [pio.to_html(fig, full_html=False, include_plotlyjs=(i == 0)) for i, fig in enumerate(charts)]
    table = "".join(f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td><td>{html.escape(c)}</td></tr>"
                    for a, b, c in rows(summary))
    gen = summary.get("generation") or {}
    esc = html.escape
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Pruning summary: {esc(summary['model'])}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}
td:first-child{{text-align:left}}pre{{white-space:pre-wrap;background:#f6f6f6;padding:8px}}</style></head><body>
<h1>Layer pruning summary</h1>
<p><b>{esc(story(summary))}</b></p>{f"<p><i>{esc(speed_warning(summary))}</i></p>" if speed_warning(summary) else ""}
<p>Model <b>{esc(summary['model'])}</b> ({esc(summary['family'])}, {summary['n_layers']} layers), run
<code>{esc(summary['run_id'])}</code>, {summary['n_masks']} evaluated masks. Removed layers
<b>{esc(', '.join(map(str, summary['removed'])))}</b> ({esc(summary['rule'])}; contributions: {esc(summary['estimator'])};
surrogate held-out R² {_fmt(summary.get('r2'), 3)} on {summary.get('n_heldout', '?')} masks).
Figures measured on {esc(summary['machine'])}.</p>
{parts[0]}
<table><tr><th></th><th>full model</th><th>pruned model</th></tr>{table}</table>
{parts[1]}
{zeroshot_html(summary.get("zeroshot"))}
{heal_html(healing) if healing and list(healing.get("removed", ())) == list(summary["removed"]) else ""}
<h2>Generation (greedy) for: <i>{esc(gen.get('prompt', ''))}</i></h2>
<h3>full model</h3><pre>{esc(gen.get('full', ''))}</pre><h3>pruned model</h3><pre>{esc(gen.get('pruned', ''))}</pre>
</body></html>"""


# ---------------------------------------------------------------- healing (the `heal` record, pipeline.heal)

HEAL_HELP = ("the defaults of engine heal: r = 8, 300 steps distilled from the full model on the calibration text "
             "and 512 windows sampled from it")
HEAL_COLUMNS = ["text", "full model", "pruned", "healed", "healed / pruned (interval)", "recovered"]


def heal_rows(record: dict) -> list[tuple[str, str, str, str, str, str]]:
    """One row per text of a `heal` record: perplexity full / pruned / healed, the paired ratio, recovery."""
    texts = {f"{record['heal_data']} (held back)": record["held_back"], **record["heldout"]}
    out = []
    for name, v in texts.items():
        rec = "n/a" if v.get("recovered") is None else f"{v['recovered']:.0%}"
        out.append((f"{name} ({v['n_windows']} windows)", _fmt(v["ppl_full"]), _fmt(v["ppl_before"]),
                    _fmt(v["ppl_after"]), f"{v['ratio']:.3f} ({v['ratio_low']:.3f}-{v['ratio_high']:.3f}, "
                    f"{v['level']:.0%})", rec))
    return out


def heal_caption(record: dict) -> str:
    where = f"exported to {record['out']} (reload check {'passed' if record.get('verified') else 'FAILED'})" \
        if record.get("out") else "not exported"
    cfg = record["settings"]
    how = {"distill": "distilled from the full model", "lm": "next-token loss"}.get(cfg.get("objective", "lm"), "")
    gen = f" + {cfg['generated']} windows sampled from the full model" if cfg.get("generated") else ""
    return (f"{record['steps']} LoRA steps (r = {cfg['rank']}, lr {cfg['lr']:g}, {how}) on "
            f"{record['heal_data']}{gen}, {record['train_seconds']:.0f} s of training; {where}.")


def heal_html(record: dict) -> str:
    """The report's healing table: perplexity full / pruned / healed per text, with the paired ratio."""
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in HEAL_COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in heal_rows(record))
    return f"<h2>After healing (LoRA)</h2><table><tr>{head}</tr>{body}</table><p>{esc(heal_caption(record))}</p>"
