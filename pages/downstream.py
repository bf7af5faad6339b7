"""Downstream: zero-shot accuracy (lm-eval on LAMBADA and the 7 commonsense tasks) of the decision for
k, the full model and any stored baseline's set, with paired intervals, as the papers report it.

Evaluation runs as a background job (`python -m engine evaluate ... --against ...`); the page only
reads the stored results (engine.pipeline.zeroshot_table).
"""

import dataclasses

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from engine import pipeline
from engine.config import ZEROSHOT_TASKS, ZeroShotSpec
from pages import _ui

st.title("Downstream: zero-shot accuracy")
_ui.spec_caption()
run = _ui.analysis_run()
mspec = _ui.method_spec()
L = run.n_layers
missing = pipeline.zeroshot_data_missing(ZEROSHOT_TASKS, _ui.cache_dir())
if missing:
    st.warning(_ui.users_words(missing))
    st.stop()

c1, c2 = st.columns(2)
k = int(c1.number_input("layers removed (k)", 1, L - 1, mspec.remove or max(1, L // 4), key="ds_k"))
limit = int(c2.number_input("items per task (the first N of each split)", 1, 20000, 50, key="ds_limit"))
chosen = st.multiselect("tasks", ZEROSHOT_TASKS, default=list(ZEROSHOT_TASKS), key="ds_tasks")
others = ["full", "rank-and-cut", *pipeline.stored_baseline_names(run)]
against = st.multiselect("compare the decision with", others, default=["full"], key="ds_against",
                         help="baselines appear here once computed (Prune page or `engine baselines`)")
if not chosen:
    st.info("Choose at least one task.")
    st.stop()
zs = ZeroShotSpec(tasks=tuple(t for t in ZEROSHOT_TASKS if t in chosen), limit=limit)
mk = dataclasses.replace(mspec, remove=k)
_ui.job_panel(run, "evaluate", "Evaluate", mk, zs, extra=tuple(x for a in against for x in ("--against", a)),
              help="lm-eval on each model (background job); stored results are reused")

table = pipeline.zeroshot_table(run, mk, zs, ("decision", *against), _ui.cache_dir())
done = [r for r in table["rows"] if r["stored"]]
for r in table["rows"]:
    if r.get("problem"):
        st.caption(f"{r['label']}: {r['problem']}")
if not done:
    st.info("Nothing stored for these settings yet: press Evaluate.")
    st.stop()
st.caption(f"lm-eval accuracy on the first {limit} items of each task; ± is the standard error; the last column is "
           "the decision minus that row on the same items (paired bootstrap, 95%).")
records = []
for r in done:
    rec = {"model": r["label"], "removed": ", ".join(map(str, r["removed"])) or "none",
           "params kept": f"{r['params_kept']:.1%}"}
    for t, v in r["tasks"].items():
        rec[t] = f"{v['acc']:.3f} ± {v['stderr']:.3f} (n={v['n']})"
    rec["mean"] = f"{r['mean']:.3f} ± {r['mean_stderr']:.3f}"
    d = r.get("vs_first")
    rec["decision − this"] = "" if d is None else f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"
    records.append(rec)
st.dataframe(pd.DataFrame(records), hide_index=True, width="stretch")
fig = go.Figure(go.Scatter(x=[r["params_kept"] for r in done], y=[r["mean"] for r in done], mode="markers+text",
                           text=[r["label"] for r in done], textposition="top center",
                           error_y={"type": "data", "array": [r["mean_stderr"] for r in done]}))
fig.update_layout(title="mean zero-shot accuracy vs parameters kept", xaxis_title="parameters kept (fraction)",
                  yaxis_title="mean accuracy", height=420)
st.plotly_chart(fig, key="ds_pareto")
