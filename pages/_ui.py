"""Shared page plumbing: the session's spec, cached model/run handles, error display.

No model logic here: everything computational is an engine.pipeline / engine.method call.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

import streamlit as st

from engine import jobs, pipeline, session, views
from engine.config import MIN_MASKS, EvalSpec, MethodSpec, RunSpec, default_cache_dir, stable_hash
from engine.errors import EstimationError, WorkbenchError
from engine.store import RunStore


def _run_through_the_app() -> None:
    """Streamlit runs a file of pages/ on its own (its legacy multipage mode: no app.py, so no restored
    session, no navigation, `_ui` listed as a page) when the first request a fresh server gets is a deep link
    (/summary?run=...), because a `pages/` folder exists and app.py has not called st.navigation yet. Leave
    that mode once and rerun: the rerun goes through app.py's st.navigation to the same page."""
    from streamlit.runtime.pages_manager import PagesManager  # streamlit is pinned (requirements.txt)

    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        st.rerun()


_run_through_the_app()


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


def restore_session() -> None:
    """Once per session (a reload or a new tab is a new session): open on the run the URL names, or the
    latest run in the cache, with its stored settings (engine.session). Nothing is restored over
    settings this session already has."""
    if st.session_state.get("_restored") or "spec" in st.session_state:
        return
    st.session_state._restored = True
    try:
        got = session.restore(cache_dir(), st.query_params.to_dict())
    except WorkbenchError as e:  # an unreadable cache: start from the defaults, say why
        st.session_state.restore_note = users_words(str(e))
        return
    if got is None:
        return
    st.session_state.spec, st.session_state.method = got.spec, got.method
    st.session_state.run_id = st.session_state.selected_run = st.session_state.watch_run = got.run_id
    st.session_state.sync_n_masks = True  # the Sampling page's mask count follows the restored run
    if got.notes:
        st.session_state.restore_note = "; ".join(got.notes) + "."


def sync_url() -> None:
    """Write the run and the result-identifying settings on screen into the URL (engine.session.URL_KEYS),
    so a reload, a second tab or a shared link shows the same thing."""
    run_id = current_run_id()
    if not run_id:
        return
    want = session.url_params(run_id, method_spec())
    if st.query_params.to_dict() != want:
        st.query_params.from_dict(want)


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
        st.error(users_words(str(e)))
        st.stop()


def users_words(message: str) -> str:
    """A message with uploads named as the user named them and settings by their labels here."""
    return views.in_users_words(message, st.session_state.get("uploads"))


@st.cache_resource(show_spinner="Loading model and calibration windows...", max_entries=2)
def _load(key: str, _spec: RunSpec, n_threads: int) -> tuple:
    return pipeline.load(_spec, EvalSpec(threads=n_threads or None))


def open_run(s: RunSpec | None = None, create: bool = True) -> pipeline.OpenRun:
    """The run of a spec, its model and windows loaded once per model/data/sampling (n_masks is not
    part of it). create=False only looks: nothing is written to the cache for a run never sampled."""
    s = s or spec()
    key = stable_hash({"model": s.model, "data": s.data, "sampling": {**s.sampling.__dict__, "n_masks": 0}})
    try:
        return pipeline.open_run(s, cache_dir(), create=create, loaded=_load(key, s, threads()))
    except EstimationError as e:  # only looking, and the run was never sampled
        st.info(users_words(str(e)))
        st.stop()
    except WorkbenchError as e:
        st.error(users_words(str(e)))
        st.stop()


def current_run_id() -> str | None:
    """The run the session works on: selected on Sampling, or opened from the Setup spec."""
    return st.session_state.get("run_id")


def analysis_run() -> pipeline.OpenRun:
    """The opened run for the analysis pages; stops the page with a hint when it has no samples."""
    run = open_run(create=False)
    chosen = st.session_state.get("selected_run")
    if chosen and chosen != run.run_id:
        st.warning(f"Run `{chosen}` was selected, but its model or data files have changed since it was made, so "
                   f"these settings now identify run `{run.run_id}`. Sample this run, or restore the files.")
    st.session_state.run_id = run.run_id
    st.session_state.run_layers = run.n_layers  # the captions' strata counts from now on
    n = run.store.count()
    if n < MIN_MASKS:
        st.info(f"Run `{run.run_id}` has {n} evaluated masks; at least {MIN_MASKS} are needed. "
                "Start sampling on the Sampling page first.")
        st.stop()
    return run


def store_for(run_id: str) -> RunStore:
    return RunStore(cache_dir(), run_id)


def spec_caption(s: RunSpec | None = None, n_layers: int | None = None) -> None:
    """One line: model, data (an upload by the name it was given), windows, sampling and its strata."""
    s = s or spec()
    if n_layers is None:
        n_layers = ((st.session_state.get("info") or {}).get("n_layers") or st.session_state.get("run_layers")
                    or views.config_layer_count(s.model))
    data = (st.session_state.get("uploads") or {}).get(s.data.source, s.data.source)
    st.caption(f"model **{s.model.name}** ({s.model.dtype}, {s.model.device}) · data **{data}** "
               f"({s.data.n_windows}×{s.data.seq_len} tokens) · {s.sampling.scheme} sampling, "
               f"{s.sampling.n_masks} masks, seed {s.sampling.seed} · {views.strata_caption(s.sampling, n_layers)}"
               + views.adaptive_caption(s.sampling, s.data.n_windows))


# ---------------------------------------------------------------- background CLI jobs


def job_name(command: str, argv: list[str]) -> str:
    """One job per command and settings: a job for other inputs never shows as this one."""
    return f"{command}-{stable_hash(argv[3:], n=10)}"


def job_panel(run: pipeline.OpenRun, command: str, label: str, *specs, extra: tuple[str, ...] = (),
              help: str | None = None) -> jobs.JobState | None:
    """Start `python -m engine <command>` for the settings on screen as a background job, show its
    progress with a Cancel button while it runs, and rerun the page when it ends (its results are
    artifacts in the run store, which the page then shows)."""
    argv = views.job_argv(command, run.spec, *specs, cache_dir=cache_dir(), threads=threads() or None, extra=extra)
    name = job_name(command, argv)
    state = jobs.state(run.store.dir, name)
    c1, c2 = st.columns([1, 3])
    if c1.button(label, type="primary", disabled=bool(state and state.running), key=f"start:{command}", help=help):
        jobs.launch(run.store.dir, name, argv)
        st.rerun()
    if state and state.running:
        _job_progress(run.store.dir, name, c2)
    elif state and state.status == "failed":
        c2.error(users_words(state.message))
    elif state and state.status == "cancelled":
        c2.info("Cancelled; nothing partial was stored.")
    return state


def _job_progress(run_dir, name: str, where) -> None:
    with where:
        _watch_job(str(run_dir), name)


@st.fragment(run_every=1.0)
def _watch_job(run_dir: str, name: str) -> None:
    state = jobs.state(run_dir, name)
    if state is None or not state.running:
        st.rerun()  # the job ended: redraw the page with its stored results
    p = state.progress or {}
    done, total = p.get("done"), p.get("total")
    text = f"running for {views.format_seconds(time.time() - state.started)}"
    if p.get("stage") and p.get("step"):  # engine.pipeline.StepProgress: the step in words, what is left, ETA
        text += f" · {p['stage']}: {p['step']}"
    elif done is not None and total:
        text += f" · {done}/{total}" + (f" ({p['step']})" if p.get("step") else "")
        if p.get("eta_s") is not None:
            text += f" · ETA {views.format_seconds(p['eta_s'])}"
    st.progress(min(1.0, (done or 0) / total) if total else 0.0, text=text)
    if st.button("Cancel", key=f"cancel:{name}"):
        jobs.cancel(run_dir, name)
        st.rerun()


def stored_or_stop(run: pipeline.OpenRun, stage: str, method: MethodSpec, button: str) -> dict:
    """The `stage` result stored for the settings on screen; stops the page with a hint when there is
    none, and warns when it was computed from fewer masks than the run holds now."""
    result = pipeline.stored(run, stage, method)
    if not result:
        st.info(f"Nothing stored for these settings yet: press {button}.")
        st.stop()
    if result["stale"]:
        st.warning(f"Computed from {result['n_masks']} masks; the run now has {run.store.count()}. Press {button} "
                   "to bring it up to date.")
    return result
