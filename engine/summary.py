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
    fig.update_layout(height=120, margin=dict(l=10, r=10, t=30, b=30), xaxis=dict(dtick=1, title="layer"),
                      title=f"{n_layers - len(removed)} of {n_layers} layers kept (red: removed)")
    return fig


def ppl_curve(summary: dict) -> go.Figure:
    """Calibration perplexity against layers removed: the method's chosen sets and each baseline."""
    fig = go.Figure()
    curves = summary["curves"]
    for name, points in curves.items():
        fig.add_trace(go.Scatter(x=[p["k"] for p in points], y=[p["ppl"] for p in points], mode="lines+markers",
                                 name=name, line=dict(color=METHOD_COLOURS.get(name), width=3 if name == "method" else 1.5)))
    ks = sorted({p["k"] for points in curves.values() for p in points})
    if ks:
        fig.add_trace(go.Scatter(x=ks, y=[summary["ppl"]["calibration"]["before"]] * len(ks), mode="lines",
                                 name="full model", line=dict(dash="dot", color=METHOD_COLOURS["full model"])))
    fig.update_layout(title="Calibration perplexity vs layers removed", xaxis=dict(title="layers removed", dtick=1),
                      yaxis=dict(title="perplexity (log scale)", type="log"), legend=dict(orientation="h", y=-0.25))
    return fig


def _fmt(x, digits=2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:,.{digits}f}"


def rows(summary: dict) -> list[tuple[str, str, str]]:
    """(what, full model, pruned model) rows of the headline table."""
    full, pruned = summary["footprint"]["full"], summary["footprint"]["pruned"]
    out = [(f"perplexity, {name} ({p.get('n_windows', '?')} windows)" if name == "calibration" else f"perplexity, {name}",
            _fmt(p["before"]), _fmt(p["after"])) for name, p in summary["ppl"].items()]
    out += [("decoder layers", str(full["n_layers"]), str(pruned["n_layers"])),
            ("parameters", f"{full['n_params'] / 1e6:,.2f} M", f"{pruned['n_params'] / 1e6:,.2f} M"),
            ("weight memory", f"{full['weight_mib']:,.1f} MiB", f"{pruned['weight_mib']:,.1f} MiB"),
            (f"forward pass over the windows (median of {full['repeats']})", f"{full['forward_ms']:,.0f} ms",
             f"{pruned['forward_ms']:,.0f} ms"),
            ("generation (greedy, KV cache)", f"{full['tokens_per_s']:,.1f} tokens/s",
             f"{pruned['tokens_per_s']:,.1f} tokens/s")]
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


def to_html(summary: dict) -> str:
    """One self-contained HTML page (plotly.js inlined in the first chart)."""
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
<p>Model <b>{esc(summary['model'])}</b> ({esc(summary['family'])}, {summary['n_layers']} layers), run
<code>{esc(summary['run_id'])}</code>, {summary['n_masks']} evaluated masks. Removed layers
<b>{esc(', '.join(map(str, summary['removed'])))}</b> ({esc(summary['rule'])}; contributions: {esc(summary['estimator'])};
surrogate held-out R² {_fmt(summary.get('r2'), 3)} on {summary.get('n_heldout', '?')} masks).
Figures measured on {esc(summary['machine'])}.</p>
{parts[0]}
<table><tr><th></th><th>full model</th><th>pruned model</th></tr>{table}</table>
{parts[1]}
{zeroshot_html(summary.get("zeroshot"))}
<h2>Generation (greedy) for: <i>{esc(gen.get('prompt', ''))}</i></h2>
<h3>full model</h3><pre>{esc(gen.get('full', ''))}</pre><h3>pruned model</h3><pre>{esc(gen.get('pruned', ''))}</pre>
</body></html>"""
