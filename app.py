"""The workbench app: `streamlit run app.py`. Pages live in pages/; engine/ does the work.

Every page reads the chosen RunSpec from st.session_state (set on Setup, or by selecting a run on
Sampling; a new session restores it from the run in the URL or the latest run, engine.session);
long jobs run as `python -m engine ...` subprocesses.
"""

import streamlit as st

from engine.views import bench_results_dir
from pages import _ui

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

_ui.restore_session()  # a reload or a new tab opens on the run in the URL (or the latest) with its settings
if note := st.session_state.pop("restore_note", None):
    st.warning(note)
page = st.navigation(PAGES)
_ui.sync_url()  # before the page too: a page that stops early (st.stop) may not get its final write through
try:
    page.run()
finally:  # also when a page stops early (st.stop): the URL always names what is on screen
    _ui.sync_url()
