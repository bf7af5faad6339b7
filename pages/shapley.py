"""Shapley: per-layer contributions (choose the estimator) with error bars, ranking, baselines beside them.

Shows the contributions stored for the settings on screen (estimator, budget, seed, surrogate);
Compute runs them through engine.pipeline, so the CLI's `engine shapley` and this page agree.
"""

import dataclasses

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from engine import pipeline, views
from engine.baselines import BASELINES
from engine.estimators import ESTIMATORS
from pages import _ui

st.title("Shapley")
_ui.spec_caption()
run = _ui.analysis_run()
L = run.n_layers
current = _ui.method_spec()

c1, c2, c3 = st.columns([2, 1, 1])
names = list(ESTIMATORS)
# The widget's parameters never change with the choice (no index=, no help= that follows it): a parameter
# that changed would make a new widget on the next run, which forgets the user's switch back.
if st.session_state.get("estimator_choice") not in names:
    st.session_state["estimator_choice"] = current.estimator
estimator = c1.selectbox("estimator", names, key="estimator_choice", format_func=lambda n: ESTIMATORS[n].label)
entry = ESTIMATORS[estimator]
default_budget = entry.default_budget(L)
budget = c2.number_input("budget (surrogate evaluations per member)", 1, 10**9,
                         None if default_budget is None else current.budget or default_budget,
                         placeholder="exact: no budget",
                         disabled=default_budget is None,
                         help="exact estimators enumerate all 2^L masks and take no budget" if default_budget is None
                         else f"default {default_budget:,} = the estimator's own")
mc_seed = c3.number_input("Monte Carlo seed", 0, 2**31 - 1, current.mc_seed)
mspec = _ui.set_method_spec(dataclasses.replace(
    current, estimator=estimator, mc_seed=int(mc_seed),
    budget=None if default_budget is None or budget is None or int(budget) == default_budget else int(budget)))
st.caption(f"{entry.help}. Estimates the **{pipeline.estimand(estimator, run.spec.sampling)}** of each layer.")

_ui.job_panel(run, "shapley", "Compute contributions", mspec,
             help="runs `python -m engine shapley` in the background; the result is stored in the run")

result = _ui.stored_or_stop(run, "contributions", mspec, "Compute contributions")

df = views.contributions_frame(result["contributions"], result["stderr"], result.get("ci_low"), result.get("ci_high"))
c1, c2, c3 = st.columns(3)
c1.metric("estimator", entry.label, help=result["estimator"])
c2.metric("surrogate evaluations", f"{result['n_evaluations']:,}", help=f"from {result['n_masks']} evaluated masks")
eff = result.get("efficiency")
if eff:
    rel = abs(eff["gap"]) / max(abs(eff["grand_minus_empty"]), 1e-12)
    c3.metric("efficiency gap", f"{rel:.1%}",
              help=f"as a share of f(all kept) - f(none kept): sum of values {eff['total']:.4f} vs "
                   f"{eff['grand_minus_empty']:.4f}; "
                   "Shapley values share this out exactly; other semivalues need not")

stderr_is = (result.get("details") or {}).get("stderr_is", "Monte Carlo standard error")
if result.get("ci_low") is not None:  # the interval: sampling noise and the surrogate's estimated bias
    stderr_is = f"{result['level']:.0%} interval for the {result.get('interval_estimand')}"
    bars = dict(type="data", array=(df.ci_high - df.contribution).to_numpy(),
                arrayminus=(df.contribution - df.ci_low).to_numpy(), visible=True)
else:
    bars = dict(type="data", array=df.stderr.fillna(0).to_numpy(), visible=True)
dominant = views.dominant_layer(df.contribution.to_numpy())
hide = dominant is not None and st.checkbox(
    f"leave layer {dominant} out of the charts (its contribution, {df.contribution[dominant]:.4f}, is more than 3x "
    "any other layer's and flattens their bars)", value=False, key="hide_dominant")
plotted = df[df.layer != dominant] if hide else df
shown_bars = {k: (v[plotted.index.to_numpy()] if isinstance(v, np.ndarray) else v) for k, v in bars.items()}
fig = go.Figure(go.Bar(x=plotted.layer, y=plotted.contribution, name="contribution", error_y=shown_bars))
fig.update_layout(title=dict(text=f"Per-layer contribution ({result['n_masks']} masks)<br><sup>error bars: {stderr_is}"
                                  + (f"; layer {dominant} left out" if hide else "") + "</sup>"),
                  xaxis_title="layer", yaxis_title="contribution to the score", xaxis=dict(dtick=1))
st.plotly_chart(fig, key="contributions_chart")

left, right = st.columns([1, 2])
level = f"{result['level']:.0%}" if result.get("level") else "90%"
left.dataframe(df.sort_values("rank").rename(columns={"stderr": "std. error", "ci_low": f"{level} low",
                                                      "ci_high": f"{level} high"}), hide_index=True)
left.download_button("Download CSV", df.to_csv(index=False).encode(), file_name=f"contributions-{run.run_id}.csv",
                     mime="text/csv")

with right:
    st.markdown("**Baselines beside the contributions**")
    # The choice outlives a run of this page that stops before the widget (another estimator, nothing stored
    # yet): Streamlit drops a widget's state then, so it is restored from a key of our own.
    if "baselines" not in st.session_state:
        st.session_state["baselines"] = st.session_state.get(  # first visit: the baselines this run has stored
            "baselines_kept", [n for n in BASELINES if run.store.get_artifact(f"baseline:{n}") is not None])
    picked = st.multiselect("static criteria", list(BASELINES), key="baselines")
    st.session_state["baselines_kept"] = picked
    missing = [n for n in picked if run.store.get_artifact(f"baseline:{n}") is None]
    if missing:
        _ui.job_panel(run, "baselines", f"Run {len(missing)} baseline(s)", extra=("--criterion", ",".join(missing)),
                      help="runs `python -m engine baselines` in the background, one criterion after another")
    shown = {n: run.store.get_artifact(f"baseline:{n}") for n in picked}
    shown = {n: r for n, r in shown.items() if r}
    if shown:
        norm = lambda v: np.asarray(v, float) / (np.nanmax(np.abs(v)) or 1.0)  # noqa: E731 (same scale per method)
        ours = f"contribution ({entry.label})"
        keep = df.layer != dominant if hide else np.ones(len(df), dtype=bool)
        long = [pd.DataFrame({"layer": df.layer, "method": ours, "normalised importance": norm(df.contribution)})[keep]]
        rows = []
        for n, r in shown.items():
            scores = [np.nan if x is None else x for x in r["scores"]]
            long.append(pd.DataFrame({"layer": df.layer, "method": n, "normalised importance": norm(scores)})[keep])
            rows.append({"baseline": n, f"rank agreement with the contributions (Spearman, {L} layers)":
                         views.rank_agreement(df.contribution, scores)})
        bfig = px.bar(pd.concat(long), x="layer", y="normalised importance", color="method", barmode="group")
        bfig.update_xaxes(dtick=1)
        bfig.update_layout(legend=dict(orientation="h", y=-0.25))
        st.plotly_chart(bfig, key="baselines_chart")
        st.dataframe(pd.DataFrame(rows), hide_index=True)
