"""Sampling: start, extend, cancel and watch `python -m engine sample` (a background CLI job) as the
run store fills; runs started from the CLI show up and can be watched too.

One writer per run: Start is disabled while the run's writer (its store lease) or the app's job is
alive, so a second click, tab or reload re-attaches instead of starting a second writer. The live
view polls only new rows (`store.results(since_rowid)`), and only while a writer runs.
"""

import dataclasses
import time

import plotly.express as px
import streamlit as st

from engine import jobs, pipeline, views
from engine.config import SamplingSpec
from pages import _ui

JOB = "sample"  # one sampling job per run (the store allows one writer)
# Markers: fidelity (open = partial: evaluated on the first windows only), or source when colouring by fidelity.
SYMBOLS = {"complete": "circle", "partial": "circle-open", "design": "circle", "active": "diamond"}


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
# Multi-fidelity and active rounds (SamplingSpec fields, so part of the run id when used): what is set here
# is the session's spec at once (every page's caption says it), and Start launches exactly it.
W = spec.data.n_windows
f1, f2, f3, f4 = st.columns(4)
first_windows = f1.number_input(
    "first windows", 0, max(W - 1, 0), min(spec.sampling.first_windows, max(W - 1, 0)),
    help=f"{views.option_help(SamplingSpec, 'first_windows')} (of the run's {W}; 0 = every window at once)")
complete = f2.number_input("share completed", 0.0, 1.0, float(spec.sampling.complete), 0.05, disabled=first_windows == 0,
                           help=views.option_help(SamplingSpec, "complete"))
rounds = f3.number_input("rounds", 1, 100, spec.sampling.rounds, help=views.option_help(SamplingSpec, "rounds"))
explore = f4.number_input("share drawn from the design", 0.0, 1.0, float(spec.sampling.explore), 0.05,
                          disabled=rounds == 1, help=views.option_help(SamplingSpec, "explore"))
chosen = dataclasses.replace(spec.sampling, first_windows=int(first_windows), complete=round(float(complete), 4),
                             rounds=int(rounds), explore=round(float(explore), 4))
if chosen != spec.sampling:
    spec = st.session_state.spec = dataclasses.replace(spec, sampling=chosen)
_ui.spec_caption(spec)
# The widget's value lives in session state only (a default beside it makes streamlit warn): set from the
# spec when a run's settings were just taken (its mask count too) or on first show.
if st.session_state.pop("sync_n_masks", False) or "n_masks_run" not in st.session_state:
    st.session_state.n_masks_run = spec.sampling.n_masks
c1, c2, c3 = st.columns([2, 1, 1])
n_masks = c1.number_input("masks in the run", 1, 1_000_000, key="n_masks_run",
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
        st.session_state.sync_n_masks = True
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
    if sum(r.windows or 0 for r in rows) != store.evaluated_windows():  # completions (multi-fidelity) updated
        rows[:] = store.results(0)  # rows already shown: read them again (only then)
    lease = store.lease()
    state = _state(store)
    job = jobs.state(store.dir, JOB)
    writing = lease is not None and lease.alive()
    target = lease.target if writing and lease.target else views.job_target(job.argv) if job and job.running else \
        lease.target if lease and lease.target else None
    p = views.progress([r.created for r in rows], target)
    if job and job.running and not writing:  # the job is still loading its model and windows: say so
        st.progress(0.0, text=f"loading the model and the calibration windows (started "
                              f"{views.format_seconds(time.time() - job.started)} ago); then {target or '?'} masks")
    else:
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
    progress = pipeline.sampling_progress(store)  # rounds, fidelity and work of every stored row
    W = progress["n_windows"]
    df = views.samples_frame(rows, W)
    n, rt = progress["n_masks"], views.round_table(progress)
    n_active, n_complete = int(rt["active"].sum()), progress["complete"]
    work = progress["work"]
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("rounds", len(rt), help=f"sampling rounds of the {n} stored masks (round 0: the design's first masks)")
    c2.metric("active masks", f"{n_active} / {n}",
              help="chosen by an active round where the surrogate ensemble disagreed most; the others were drawn "
                   "by the sampling design")
    c3.metric("complete masks", f"{n_complete} / {n}",
              help=f"evaluated on all {W or '?'} calibration windows; the other {n - n_complete} on their first "
                   "windows only so far (multi-fidelity)")
    c4.metric("work (token-layer calls)", views.format_count(work),
              help=f"{work:,} token-layer calls (one decoder layer, final norm or head on one token of one window) "
                   f"spent on the {n} stored masks, completions included")
    left, right = st.columns([1, 3])
    left.dataframe(views.stratum_counts(df), hide_index=True)
    log_y = right.toggle("log perplexity axis", value=True, key=f"logy:{run_id}")
    colour = right.radio("colour by", ["stratum", "round", "source", "fidelity"], horizontal=True,
                         index=1 if len(rt) > 1 else 0, key=f"colour:{run_id}")
    column = {"round": "round_label"}.get(colour, colour)
    symbol = "source" if colour == "fidelity" else "fidelity"
    orders = {"stratum": views.stratum_order(df), "round_label": [f"round {r}" for r in rt["round"]],
              "fidelity": list(views.FIDELITY), "source": ["design", "active"]}
    fig = px.scatter(df, x="kept", y="ppl", color=column, symbol=symbol, log_y=log_y,
                     hover_data=["mask", "rowid", "round", "source", "windows", "work"],
                     labels={"kept": "kept layers", "ppl": "perplexity", "stratum": "stratum", "round_label": "round"},
                     category_orders=orders, symbol_map=SYMBOLS,
                     color_discrete_map=views.stratum_colours(df) if colour == "stratum" else
                     views.round_colours(df["round_label"]) if colour == "round" else None,
                     title="Perplexity vs kept layers")
    fig.update_xaxes(dtick=1)
    right.plotly_chart(fig, key=f"scatter:{run_id}")
    if n_complete < n:
        right.caption(f"Open markers: the {n - n_complete} partial masks, whose perplexity covers their evaluated "
                      f"windows only (out of {W or '?'}).")
    st.markdown("**Rounds and fidelity**")
    a, b = st.columns([3, 2])
    a.dataframe(rt, hide_index=True, width="stretch",
                column_config={"share of work": st.column_config.NumberColumn(format="percent")})
    b.dataframe(views.fidelity_table(progress), hide_index=True, width="stretch",
                column_config={"share": st.column_config.NumberColumn(format="percent")})
    wf = views.work_frame(progress)
    fig = px.line(wf, x="masks stored", y="cumulative work", color="round", markers=True, hover_data=["fidelity"],
                  color_discrete_map=views.round_colours(wf["round"]),
                  labels={"cumulative work": "work (token-layer calls)"}, title="Cumulative work, in store order")
    fig.update_layout(height=320)
    st.plotly_chart(fig, key=f"work:{run_id}")
    st.caption(f"{work:,} token-layer calls over {n} masks. A mask's work includes its completion on the remaining "
               "windows, whenever that came.")
    latest = df.tail(20).iloc[::-1][["rowid", "mask", "kept", "ppl", "score", "round", "source", "windows", "work",
                                     "seconds"]]
    st.dataframe(latest.rename(columns={"rowid": "#", "ppl": "perplexity", "work": "work (token-layer calls)"}),
                 hide_index=True, width="stretch")


if watched:
    st.subheader(f"Run `{watched}`")
    # Polls every 3 s only while a writer runs (each poll redraws the chart); idle, it costs nothing.
    every = _live_every(watched)
    st.fragment(live, run_every=every)(watched, every is not None)
