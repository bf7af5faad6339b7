"""Shapley: per-layer contributions (choose the estimator) with error bars, ranking, baselines beside them."""

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from engine import method, views
from engine.baselines import BASELINES, run_baseline
from engine.config import SurrogateSpec
from pages import _ui

LABELS = {
    "paper": "restricted-strata semivalue (paper)",
    "exact": "exact Shapley",
    "permutation": "permutation sampling",
    "regression-adjusted": "regression-adjusted",
    "banzhaf": "exact Banzhaf",
}

st.title("Shapley")
_ui.spec_caption()
run = _ui.analysis_run()

c1, c2 = st.columns([2, 1])
estimator = c1.selectbox("estimator", list(LABELS), format_func=LABELS.get, help=method.ESTIMATORS["paper"])
budget = c2.number_input("Monte Carlo masks / permutations", 100, 1_000_000, 20_000, 100)
st.caption(method.ESTIMATORS[estimator])

fit_state = st.session_state.get("fit")
if fit_state is None or fit_state["run_id"] != run.run_id:
    st.caption("No surrogate fitted on the Surrogate page for this run: the default (mlp, adam, 5 members) is used.")

if st.button("Compute contributions", type="primary"):
    with _ui.shown_errors(), st.spinner("Fitting the surrogate and estimating contributions..."):
        if fit_state is None or fit_state["run_id"] != run.run_id:
            fitted = method.fit(run, SurrogateSpec(), curve=False)
            fit_state = st.session_state.fit = {"run_id": run.run_id, "n": len(fitted.samples.scores),
                                                "spec": SurrogateSpec(), "fit": fitted}
        c = method.contributions(run, fit_state["fit"], estimator, n_masks=int(budget),
                                 n_permutations=max(1, int(budget) // run.n_layers), seed=fit_state["spec"].seed)
    st.session_state.contributions = {"run_id": run.run_id, "key": estimator, **c.to_dict()}

result = st.session_state.get("contributions")
if not result or result["run_id"] != run.run_id:
    saved = run.store.get_artifact(f"contributions:{estimator}")
    if saved is None:
        st.info("Press Compute contributions.")
        st.stop()
    result = {"run_id": run.run_id, **saved}  # the artifact holds "key" (the estimator name) too
    st.caption("showing the contributions saved in the run store")

df = views.contributions_frame(result["values"], result["stderr"])
st.caption(result["estimator"])
c1, c2, c3 = st.columns(3)
c1.metric("estimator", LABELS.get(result["key"], result["key"]), help=result["estimator"])
c2.metric("surrogate evaluations", f"{result['n_evaluations']:,}")
eff = (result.get("details") or {}).get("efficiency")
if eff:
    c3.metric("efficiency gap", f"{eff['gap']:.2e}",
              help=f"sum of values {eff['total']:.4f} vs f(all) - f(none) {eff['grand_minus_empty']:.4f}")
else:
    c3.metric("sum of values", f"{df.contribution.sum():.4f}")

fig = go.Figure(go.Bar(x=df.layer, y=df.contribution, name="contribution",
                       error_y=dict(type="data", array=df.stderr.fillna(0).to_numpy(), visible=True)))
fig.update_layout(title="Per-layer contribution (error bars: ensemble spread / Monte Carlo s.e.)",
                  xaxis_title="layer", yaxis_title="contribution to the score", xaxis=dict(dtick=1))
st.plotly_chart(fig, key="contributions_chart")

left, right = st.columns([1, 2])
left.dataframe(df.sort_values("rank"), hide_index=True)
left.download_button("Download CSV", df.to_csv(index=False).encode(), file_name=f"contributions-{run.run_id}.csv",
                     mime="text/csv")

with right:
    st.markdown("**Baselines beside the contributions**")
    picked = st.multiselect("static criteria", list(BASELINES), default=[], key="baselines")
    cache = st.session_state.setdefault("baseline_results", {})
    if st.button("Run baselines", disabled=not picked):
        with _ui.shown_errors(), st.spinner("Running baselines on the calibration windows..."):
            for name in picked:
                if (run.run_id, name) not in cache:
                    cache[(run.run_id, name)] = run_baseline(name, run.lm, run.windows).to_json()
    shown = [n for n in picked if (run.run_id, n) in cache]
    if shown:
        norm = lambda v: np.asarray(v, float) / (np.nanmax(np.abs(v)) or 1.0)  # noqa: E731 (same scale per method)
        long = [pd.DataFrame({"layer": df.layer, "method": "shapley", "normalised importance": norm(df.contribution)})]
        rows = []
        for n in shown:
            scores = [np.nan if x is None else x for x in cache[(run.run_id, n)]["scores"]]
            long.append(pd.DataFrame({"layer": df.layer, "method": n, "normalised importance": norm(scores)}))
            rows.append({"baseline": n, "spearman vs shapley": views.rank_agreement(df.contribution, scores)})
        st.plotly_chart(px.bar(pd.concat(long), x="layer", y="normalised importance", color="method",
                               barmode="group"), key="baselines_chart")
        st.dataframe(pd.DataFrame(rows), hide_index=True)
