"""The workbench app: `streamlit run app.py`. Pages live in pages/; engine/ does the work.

Every page reads the chosen RunSpec from st.session_state (set on Setup, or by selecting a run on
Sampling); long jobs (sampling) run as `python -m engine sample` subprocesses.
"""

import streamlit as st

from engine.views import bench_results_dir

st.set_page_config(page_title="Layer pruning workbench", page_icon=":scissors:", layout="wide")

PAGES = [
    st.Page("pages/setup.py", title="Setup", icon=":material/tune:", default=True),
    st.Page("pages/sampling.py", title="Sampling", icon=":material/play_circle:"),
    st.Page("pages/surrogate.py", title="Surrogate", icon=":material/model_training:"),
    st.Page("pages/shapley.py", title="Shapley", icon=":material/bar_chart:"),
    st.Page("pages/interactions.py", title="Interactions", icon=":material/grid_on:"),
    st.Page("pages/prune.py", title="Prune & export", icon=":material/content_cut:"),
    st.Page("pages/summary.py", title="Summary", icon=":material/summarize:"),
    st.Page("pages/downstream.py", title="Downstream", icon=":material/checklist:"),
]
if (bench_results_dir() / "compare.csv").is_file():  # only when bench.compare has written its results
    PAGES.append(st.Page("pages/comparison.py", title="Comparison", icon=":material/leaderboard:"))

st.navigation(PAGES).run()
