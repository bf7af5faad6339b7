"""Surrogate: fit on the run's samples; held-out metrics, predicted vs true, residuals, learning curve.

Shows the fit stored for the settings on screen (a reload or the CLI's `engine fit` finds it);
Fit computes it through engine.pipeline.
"""

import dataclasses

import numpy as np
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from engine import pipeline, views
from engine.config import SurrogateSpec
from engine.surrogate import SURROGATES, variant_label, variants
from pages import _ui

st.title("Surrogate")
_ui.spec_caption()
run = _ui.analysis_run()
st.caption(f"run `{run.run_id}` · {run.store.count()} evaluated masks")

current = _ui.method_spec()
c1, c2, c3, c4 = st.columns(4)
options = variants()
now = f"{current.surrogate.kind}:{current.surrogate.preset}" if SURROGATES[current.surrogate.kind].presets \
    else current.surrogate.kind
variant = c1.selectbox("surrogate", options, index=options.index(now) if now in options else 0, format_func=variant_label,
                       help="; ".join(f"{k.label}: {k.help}" for k in SURROGATES.values()))
ensemble = c2.number_input("ensemble members (error bars)", 1, 20, current.surrogate.ensemble)
holdout = c3.number_input("held-out fraction", 0.05, 0.5, current.surrogate.holdout, 0.05)
seed = c4.number_input("seed", 0, 2**31 - 1, current.surrogate.seed)
compare_all = st.checkbox("also compare every surrogate kind on the same split", value=False)
kind, _, preset = variant.partition(":")
sspec = SurrogateSpec(kind=kind, preset=preset or "adam", holdout=float(holdout), ensemble=int(ensemble), seed=int(seed))
mspec = _ui.set_method_spec(dataclasses.replace(current, surrogate=sspec))

_ui.job_panel(run, "fit", "Fit", mspec, extra=() if compare_all else ("--no-compare",),
             help="runs `python -m engine fit` in the background; the result is stored in the run")

fit = _ui.stored_or_stop(run, "fit", mspec, "Fit")
st.caption(f"{variant_label(variant)} · ensemble of {sspec.ensemble} · fitted on {fit['report']['split']['n_train']} "
           f"masks, {fit['report']['split']['n_test']} held out · fit {fit['report']['fit_seconds']:.1f} s"
           + (f" · {fit['n_complete']} of {fit['n_masks']} masks evaluated on every window: the others (multi-fidelity) "
              "are fitted with their estimated score, weighted by its precision, and never held out"
              if fit.get("n_complete") is not None and fit["n_complete"] < fit["n_masks"] else ""))
pred = pipeline.heldout_predictions(run, mspec)
c1, c2, c3, c4, c5 = st.columns(5)
n_test = fit["report"]["test"]["overall"]["n"]
ri = pred.get("r2_interval")
c1.metric("held-out R²", f"{fit['r2']:.3f}",
          help=f"the ensemble's fit on {n_test} held-out masks; {ri['level']:.0%} interval [{ri['low']:.3f}, "
               f"{ri['high']:.3f}] (bootstrap over them, within kept counts). The one R² of this fit: the tables below "
               "refit single surrogates (learning curve, quality vs work, comparison) and say so." if ri else
               f"on {n_test} held-out masks")
if ri:
    c1.caption(f"{ri['level']:.0%} interval [{ri['low']:.3f}, {ri['high']:.3f}], n = {ri['n']}")
c2.metric("Spearman", f"{fit['spearman']:.3f}", help=f"rank correlation on {n_test} held-out masks")
c3.metric("MAE (score)", f"{fit['mae']:.4f}", help="mean |predicted - true| score (score = full PPL / PPL)")
c4.metric("mean relative error (PPL)", f"{fit['mape_ppl']:.1%}" if np.isfinite(fit["mape_ppl"]) else "-",
          help="mean |predicted - true| / true perplexity on the held-out masks")
worst = pred.get("worst")
if worst:
    f = worst["factor"]
    c5.metric("largest perplexity error", f"{max(f, 1 / f):.2f}x",
              help=f"the held-out mask predicted worst ({'over' if f > 1 else 'under'}-predicted perplexity), which "
                   f"removes layers {', '.join(map(str, worst['removed'])) or 'none'}: R² averages such masks away")
    c5.caption(f"{'over' if f > 1 else 'under'}estimate; removes {', '.join(map(str, worst['removed'])) or 'none'}")
df = views.fit_frames(pred["masks"], pred["true"], pred["predicted"], pred["ppl_full"])
log_axes = st.toggle("log axes", value=True)
left, right = st.columns(2)
fig = px.scatter(df, x="ppl_true", y="ppl_predicted", color="stratum", log_x=log_axes, log_y=log_axes,
                 category_orders={"stratum": views.stratum_order(df)}, color_discrete_map=views.stratum_colours(df),
                 labels={"ppl_true": "measured perplexity", "ppl_predicted": "predicted perplexity"},
                 title="Held-out: predicted vs measured")
lo, hi = float(np.nanmin(df[["ppl_true", "ppl_predicted"]].values)), float(np.nanmax(df[["ppl_true", "ppl_predicted"]].values))
fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x", line=dict(dash="dash", color="gray")))
left.plotly_chart(fig, key="pred_vs_true")
right.plotly_chart(px.box(df, x="stratum", y="log_residual", points="all", color="stratum",
                          category_orders={"stratum": views.stratum_order(df)},
                          color_discrete_map=views.stratum_colours(df),
                          labels={"log_residual": "log(predicted / measured perplexity)"},
                          title="Residuals by stratum"), key="residuals")

lc = fit.get("learning_curve")
if lc:
    lcf = views.learning_curve_frame(lc)
    left, right = st.columns(2)
    long = lcf.melt(id_vars=["train_masks"], value_vars=["r2", "spearman"], var_name="metric", value_name="held-out value")
    long["metric"] = long["metric"].map(views.METRIC_WORDS)
    left.plotly_chart(px.line(long, x="train_masks", y="held-out value", color="metric", markers=True,
                              labels={"train_masks": "training masks"},
                              title=f"Learning curve (held-out, {lc['n_test']} masks)"), key="learning_curve")
    right.dataframe(lcf.rename(columns=views.METRIC_WORDS), hide_index=True)
    right.caption("Each row: a surrogate refitted on that many training masks, scored on the same held-out masks.")
st.subheader("Quality against evaluation work")
wc = fit.get("work_curve")
if not wc:
    st.info("This fit was stored without its quality-vs-work curve (by `engine run` or another stage, or before the "
            "curve existed): press Fit to compute it.")
elif wc.get("n_masks") != fit["n_masks"] or wc.get("n_windows_evaluated") != fit.get("n_windows_evaluated"):
    st.warning(f"The stored quality-vs-work curve saw {wc.get('n_masks')} masks, this fit {fit['n_masks']}: press Fit.")
elif not wc["points"]:
    st.info(f"No quality-vs-work curve for this run: {wc['note']}.")
else:
    wcf = views.work_curve_frame(wc)
    fig = go.Figure()
    for metric, name in (("r2", "R²"), ("spearman", "Spearman")):
        fig.add_trace(go.Scatter(
            x=wcf["work"], y=wcf[metric], mode="lines+markers", name=f"held-out {name}",
            error_y=dict(type="data", symmetric=False, array=wcf[f"{metric}_high"] - wcf[metric],
                         arrayminus=wcf[metric] - wcf[f"{metric}_low"]),
            customdata=wcf[["train_masks", "n_test", "work_fitted"]],
            hovertemplate=(f"{name} %{{y:.3f}} on %{{customdata[1]}} held-out masks<br>fitted on %{{customdata[0]}} "
                           "masks<br>work %{x:,} token-layer calls (fitted rows: %{customdata[2]:,})<extra></extra>")))
    low = float(min(wcf[["r2", "spearman", "r2_low", "spearman_low"]].min().min(), 0.0))
    fig.update_layout(title=f"Held-out quality vs work ({wc['level']:.0%} intervals, {wc['n_test']} held-out masks)",
                      xaxis_title="work spent so far (token-layer calls, store order)", yaxis_title="held-out value",
                      yaxis_range=[max(low, -1.0) - 0.05, 1.05])  # R² intervals can reach far below -1: cut there
    st.plotly_chart(fig, key="work_curve")
    st.dataframe(views.work_curve_table(wc, wc["level"]), hide_index=True, width="stretch")
    st.caption(f"Each point: one {variant_label(variant)} surrogate fitted on the run's first training masks in store "
               f"order (the order they were evaluated in), scored on the fit's {wc['n_test']} held-out masks; x = the "
               f"work the run had spent when the last of them was stored (all {wc['work_total']:,} token-layer calls "
               "at the end; a mask's completion counts with it). Intervals: bootstrap over the held-out masks (an interval "
               "below -1 is cut there in the chart; the table has it whole).")
comparison = fit.get("comparison")
if comparison:
    st.subheader("Surrogate comparison (same split, one fit each)")
    st.caption("One fit per kind (no ensemble), so its R² differs a little from the ensemble's headline R² above.")
    st.dataframe(views.comparison_frame(comparison), hide_index=True, width="stretch")
per = fit["report"]["test"]["per_stratum"]
st.subheader("Held-out metrics per stratum")
st.caption(f"R² and Spearman are shown only for strata with at least {views.MIN_STRATUM_N} held-out masks.")
st.dataframe(views.per_stratum_frame(per), hide_index=True, width="stretch")
