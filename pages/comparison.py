"""Comparison: the benchmark table and the fidelity curve from `python -m bench.compare` output files.

app.py lists this page only when compare.csv exists (views.bench_results_dir())."""

import pandas as pd
import plotly.express as px
import streamlit as st

from engine import views

st.title("Comparison")
folder = views.bench_results_dir()
st.caption(f"results of `python -m bench.compare` in `{folder}`")
compare = pd.read_csv(folder / "compare.csv")
long = views.comparison_long(compare)
splits = list(dict.fromkeys(long["split"]))
c1, c2 = st.columns(2)
split = c1.selectbox("split", splits)
long["group"] = long["method"].map(views.method_group)
groups = sorted(set(long["group"]) - {"optimum"})
shown = c2.selectbox("methods", groups, help="at most a few lines per chart; the optimum is on every chart")
part = long[long["split"] == split]
chart = part[part["group"].isin([shown, "optimum"])]
st.plotly_chart(px.line(chart, x="k", y="perplexity", color="method", markers=True, log_y=True,
                        labels={"k": "layers removed", "perplexity": f"perplexity on {split} (log scale)"},
                        title=f"{shown} against the optimum: perplexity on {split}"), key="compare_chart")
table = part.pivot_table(index="method", columns="k", values="perplexity").reset_index()
table.columns = [c if c == "method" else f"k={c}" for c in table.columns]
st.dataframe(table, hide_index=True, width="stretch")

fidelity_csv = folder / "fidelity.csv"
if fidelity_csv.is_file():
    st.subheader("Estimator fidelity against exact values")
    summary = views.fidelity_summary(pd.read_csv(fidelity_csv))
    metric = st.selectbox("metric", [c.removesuffix("_mean") for c in summary.columns if c.endswith("_mean")])
    fig = px.line(summary, x="n", y=f"{metric}_mean", error_y=f"{metric}_std", color="estimator", markers=True,
                  log_x=True, labels={"n": "evaluated masks", f"{metric}_mean": metric},
                  title=f"{metric} vs evaluated masks (mean ± std over seeds)")
    st.plotly_chart(fig, key="fidelity_chart")
    st.dataframe(summary, hide_index=True, width="stretch")
