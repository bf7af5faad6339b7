"""Shared page plumbing: the session's spec, cached model/run handles, error display.

No model logic here: everything computational is an engine.pipeline / engine.method call.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import streamlit as st

from engine import pipeline
from engine.config import EvalSpec, MethodSpec, RunSpec, default_cache_dir, stable_hash
from engine.errors import WorkbenchError
from engine.store import RunStore


def cache_dir():
    """$LAYERPRUNE_CACHE (or ./cache), fixed for the session."""
    if "cache_dir" not in st.session_state:
        st.session_state.cache_dir = str(default_cache_dir())
    return st.session_state.cache_dir


def threads() -> int:
    """CPU threads for torch in the app and in the sampling subprocess (0 = torch's choice)."""
    if "threads" not in st.session_state:
        st.session_state.threads = int(os.environ.get("LAYERPRUNE_THREADS", "0") or 0)
    return st.session_state.threads


def spec() -> RunSpec:
    if "spec" not in st.session_state:
        st.session_state.spec = RunSpec()
    return st.session_state.spec


def method_spec() -> MethodSpec:
    """Stage-2 settings shared by the Surrogate, Shapley and Prune pages (each page edits its part)."""
    if "method" not in st.session_state:
        st.session_state.method = MethodSpec()
    return st.session_state.method


def set_method_spec(m: MethodSpec) -> MethodSpec:
    st.session_state.method = m
    return m


@contextmanager
def shown_errors():
    """Show a WorkbenchError as st.error(message) (no traceback) and stop the script."""
    try:
        yield
    except WorkbenchError as e:
        st.error(str(e))
        st.stop()


@st.cache_resource(show_spinner="Loading model and calibration windows...", max_entries=2)
def _open_run(key: str, _spec: RunSpec, cache: str, n_threads: int) -> pipeline.OpenRun:
    return pipeline.open_run(_spec, cache, EvalSpec(threads=n_threads or None))


def open_run(s: RunSpec | None = None) -> pipeline.OpenRun:
    """The loaded model, windows and store of a spec (cached per spec; n_masks is not part of it)."""
    s = s or spec()
    key = stable_hash({"model": s.model, "data": s.data, "sampling": {**s.sampling.__dict__, "n_masks": 0}})
    with shown_errors():
        run = _open_run(key, s, cache_dir(), threads())
    return run if run.spec == s else pipeline.OpenRun(s, run.lm, run.windows, run.run_id, run.store)


def current_run_id() -> str | None:
    """The run the session works on: selected on Sampling, or opened from the Setup spec."""
    return st.session_state.get("run_id")


def analysis_run() -> pipeline.OpenRun:
    """The opened run for the analysis pages; stops the page with a hint when it has no samples."""
    run = open_run()
    chosen = st.session_state.get("selected_run")
    if chosen and chosen != run.run_id:
        st.warning(f"Run `{chosen}` was selected, but its model or data files have changed since it was made, so "
                   f"these settings now identify run `{run.run_id}`. Sample this run, or restore the files.")
    st.session_state.run_id = run.run_id
    n = run.store.count()
    if n < 8:
        st.info(f"Run `{run.run_id}` has {n} evaluated masks; at least 8 are needed. "
                "Start sampling on the Sampling page first.")
        st.stop()
    return run


def store_for(run_id: str) -> RunStore:
    return RunStore(cache_dir(), run_id)


def spec_caption(s: RunSpec | None = None) -> None:
    s = s or spec()
    st.caption(f"model **{s.model.name}** ({s.model.dtype}, {s.model.device}) · data **{s.data.source}** "
               f"({s.data.n_windows}×{s.data.seq_len} tokens) · {s.sampling.scheme} sampling, "
               f"{s.sampling.n_masks} masks, seed {s.sampling.seed}")
