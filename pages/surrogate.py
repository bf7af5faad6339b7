"""Surrogate: fit on the run's samples; held-out metrics, predicted vs true, residuals, learning curve."""

import numpy as np
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from engine import method, views
from engine.config import SurrogateSpec
from pages import _ui

KINDS = {"mlp (adam)": ("mlp", "adam"), "mlp (paper schedule)": ("mlp", "paper"),
         "ridge-pairwise": ("ridge-pairwise", "adam"), "gbt": ("gbt", "adam")}
COMPARE = ("mlp:adam", "mlp:paper", "ridge-pairwise", "gbt")

st.title("Surrogate")
_ui.spec_caption()
run = _ui.analysis_run()
st.caption(f"run `{run.run_id}` · {run.store.count()} evaluated masks")

c1, c2, c3, c4 = st.columns(4)
label = c1.selectbox("surrogate", list(KINDS))
ensemble = c2.number_input("ensemble members (error bars)", 1, 20, 5)
holdout = c3.number_input("held-out fraction", 0.05, 0.5, 0.2, 0.05)
seed = c4.number_input("seed", 0, 2**31 - 1, 0)
compare_all = st.checkbox("also compare all surrogate kinds on the same split", value=False)
kind, preset = KINDS[label]
sspec = SurrogateSpec(kind=kind, preset=preset, holdout=float(holdout), ensemble=int(ensemble), seed=int(seed))

if st.button("Fit", type="primary"):
    with _ui.shown_errors(), st.spinner("Fitting..."):
        fitted = method.fit(run, sspec, curve=True, compare_kinds=COMPARE if compare_all else ())
    st.session_state.fit = {"run_id": run.run_id, "n": fitted.summary["n_masks"], "spec": sspec, "fit": fitted}

state = st.session_state.get("fit")
if not state or state["run_id"] != run.run_id:
    st.info("Choose a surrogate and press Fit.")
    st.stop()
f = state["fit"]
st.caption(f"fitted {f.fitted.report.spec.kind} ({f.fitted.report.spec.preset}) on {state['n']} masks "
           f"in {f.fitted.report.fit_seconds:.1f} s")
head = method.fit_headline(f)
c1, c2, c3, c4 = st.columns(4)
c1.metric("held-out R²", f"{head['r2']:.3f}")
c2.metric("Spearman", f"{head['spearman']:.3f}")
c3.metric("MAE (score)", f"{head['mae']:.4f}")
c4.metric("MAE (perplexity)", f"{head['mae_ppl']:.2f}")

test = f.fitted.report.split.test
s = f.samples
df = views.fit_frames(s.masks[test], s.scores[test], f.predict(s.masks[test]), s.ppl_full)
log_axes = st.toggle("log axes", value=True)
left, right = st.columns(2)
fig = px.scatter(df, x="ppl_true", y="ppl_predicted", color="stratum", log_x=log_axes, log_y=log_axes,
                 labels={"ppl_true": "measured perplexity", "ppl_predicted": "predicted perplexity"},
                 title="Held-out: predicted vs measured")
lo, hi = float(np.nanmin(df[["ppl_true", "ppl_predicted"]].values)), float(np.nanmax(df[["ppl_true", "ppl_predicted"]].values))
fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x", line=dict(dash="dash", color="gray")))
left.plotly_chart(fig, key="pred_vs_true")
right.plotly_chart(px.box(df, x="stratum", y="log_residual", points="all",
                          labels={"log_residual": "log(predicted / measured perplexity)"},
                          title="Residuals by stratum"), key="residuals")

lc = f.summary.get("learning_curve")
if lc:
    lcf = views.learning_curve_frame(lc)
    left, right = st.columns(2)
    left.plotly_chart(px.line(lcf, x="train_masks", y=["r2", "spearman"], markers=True,
                              title=f"Learning curve (held-out, {lc['n_test']} masks)"), key="learning_curve")
    right.dataframe(lcf, hide_index=True)
comparison = f.summary.get("comparison")
if comparison:
    st.subheader("Surrogate comparison (same split)")
    st.dataframe(views.comparison_frame(comparison), hide_index=True, width="stretch")
per = f.summary["report"]["test"]["per_stratum"]
st.subheader("Held-out metrics per stratum")
st.dataframe([{"kept": k, **m} for k, m in per.items()], hide_index=True, width="stretch")
