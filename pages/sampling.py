"""Sampling: start, extend, cancel and watch `python -m engine sample` (a background CLI job) as the
run store fills; runs started from the CLI show up and can be watched too.

One writer per run: Start is disabled while the run's writer (its store lease) or the app's job is
alive, so a second click, tab or reload re-attaches instead of starting a second writer. The live
view polls only new rows (`store.results(since_rowid)`), and only while a writer runs.
"""

import dataclasses

import plotly.express as px
import streamlit as st

from engine import jobs, pipeline, views
from pages import _ui

JOB = "sample"  # one sampling job per run (the store allows one writer)


def _state(store) -> str:
    """running (a live writer or the app's job) | idle."""
    lease = store.lease()
    job = jobs.state(store.dir, JOB) if store.exists() else None
    return "running" if (lease is not None and lease.alive()) or (job and job.running) else "idle"


st.title("Sampling")
spec = _ui.spec()
runs = pipeline.status(_ui.cache_dir())
ids = [r["run_id"] for r in runs]

st.subheader("This session's run")
_ui.spec_caption(spec)
c1, c2, c3 = st.columns([2, 1, 1])
n_masks = c1.number_input("masks in the run", 1, 1_000_000, spec.sampling.n_masks, key="n_masks_run",
                          help="evaluated masks are kept: asking for more extends the run, asking again resumes it")
start = c2.button("Start / resume", type="primary")
cancel = c3.button("Cancel")
if start:
    run = _ui.open_run(spec)  # creates the run store (this is the one page that does)
    if _state(run.store) == "running":
        st.info(f"A writer is already running on run `{run.run_id}`; watching it.")
    else:
        target = dataclasses.replace(spec, sampling=dataclasses.replace(spec.sampling, n_masks=int(n_masks)))
        st.session_state.spec = target  # every page's caption now says how many masks the run asks for
        jobs.launch(run.store.dir, JOB, views.job_argv("sample", target, cache_dir=_ui.cache_dir(),
                                                       threads=_ui.threads() or None))
        st.toast(f"Sampling {int(n_masks)} masks on run {run.run_id}.")
    st.session_state.run_id = st.session_state.watch_run = run.run_id
    st.rerun()  # redraw from the top: the runs table lists this run, the live view watches it

st.subheader("Runs in the cache")
if runs:
    if st.session_state.get("watch_run") not in ids:
        st.session_state.watch_run = _ui.current_run_id() if _ui.current_run_id() in ids else ids[0]
    st.dataframe(views.runs_frame(runs), hide_index=True, width="stretch")
    st.button("Refresh the list", help="runs started elsewhere (the CLI, another tab) appear after a refresh")
    watched = st.selectbox("Watch run", ids, key="watch_run")
    if watched != _ui.current_run_id() and st.button(f"Use run {watched}'s settings"):
        meta = _ui.store_for(watched).meta()
        st.session_state.spec = views.spec_from_dict(meta["spec"])
        st.session_state.run_id = st.session_state.selected_run = watched
        st.rerun()
else:
    watched = None
    st.caption("No runs yet in " + _ui.cache_dir())

if cancel:
    store = _ui.store_for(watched) if watched else None
    if store is not None and _state(store) == "running":
        lease = store.lease()
        if lease is not None and lease.alive():
            store.request_cancel()  # the writer stops cleanly after its current mask
        else:
            jobs.cancel(store.dir, JOB)  # still loading its model: nothing to lose
        st.toast("Cancel requested: the writer stops after its current mask.")
    else:
        st.info("Nothing is sampling on the watched run.")


def _live_every(run_id: str):
    return 3.0 if _state(_ui.store_for(run_id)) == "running" else None


def live(run_id: str, polling: bool) -> None:
    """Progress, counts, the perplexity scatter and the latest rows of the watched run."""
    store = _ui.store_for(run_id)
    if polling and _state(store) == "idle":
        st.rerun()  # the writer stopped: one full redraw, then no more polling
    key = f"rows:{run_id}"
    rows = st.session_state.setdefault(key, [])
    new = store.results(rows[-1].rowid if rows else 0)
    rows.extend(new)
    lease = store.lease()
    state = _state(store)
    job = jobs.state(store.dir, JOB)
    target = lease.target if lease and lease.target else None
    p = views.progress([r.created for r in rows], target)
    st.progress(p["fraction"], text=f"{p['done']} / {target or '?'} masks · {state} · ETA "
                                    f"{views.format_seconds(p['eta_s']) if state != 'idle' else '-'}")
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("samples", p["done"])
    c2.metric("status", state if state != "idle" else (lease.status if lease else "new"))
    c3.metric("masks / s", f"{p['rate']:.2f}" if p["rate"] else "-", help="over the commits so far")
    ppl_full = store.meta().get("ppl_full")
    c4.metric("full-model PPL", f"{ppl_full:.3f}" if ppl_full else "-")
    if lease and lease.status == "failed" and lease.message:
        st.error(lease.message)
    elif job and job.status == "failed" and state == "idle":
        st.error(job.message)
    if not rows:
        return
    df = views.samples_frame(rows)
    left, right = st.columns([1, 3])
    left.dataframe(views.stratum_counts(df), hide_index=True)
    log_y = right.toggle("log perplexity axis", value=True, key=f"logy:{run_id}")
    fig = px.scatter(df, x="kept", y="ppl", color="stratum", log_y=log_y, hover_data=["mask", "rowid"],
                     labels={"kept": "kept layers", "ppl": "perplexity", "stratum": "stratum"},
                     category_orders={"stratum": views.stratum_order(df)},
                     color_discrete_map=views.stratum_colours(df), title="Perplexity vs kept layers")
    fig.update_xaxes(dtick=1)
    right.plotly_chart(fig, key=f"scatter:{run_id}")
    st.dataframe(df.tail(20).iloc[::-1][["rowid", "mask", "kept", "ppl", "score", "seconds"]], hide_index=True,
                 width="stretch")


if watched:
    st.subheader(f"Run `{watched}`")
    # Polls every 3 s only while a writer runs (each poll redraws the chart); idle, it costs nothing.
    every = _live_every(watched)
    st.fragment(live, run_every=every)(watched, every is not None)
