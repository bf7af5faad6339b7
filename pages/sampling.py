"""Sampling: start / cancel / resume `python -m engine sample` as a subprocess and watch the store fill.

One writer per run: before launching, the store's lease (a live writer) and the launcher record
(a subprocess still loading its model) are checked, so a second click, tab or reload re-attaches
instead of starting a second writer.
"""

import dataclasses
import json
import os
import subprocess
import threading
import time

import plotly.express as px
import streamlit as st

from engine import pipeline, views
from engine.store import pid_alive
from pages import _ui

LAUNCHER = "launcher.json"  # {pid, started, argv} of the last subprocess the app started, in the run folder
LOG = "sample.log"
STARTUP_GRACE_S = 300.0  # a launched process that has not taken the lease yet counts as starting this long


def _launcher(store) -> dict | None:
    path = store.dir / LAUNCHER
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _state(store) -> str:
    """running | starting | idle (cancel requested still counts as running until the writer stops)."""
    lease = store.lease()
    if lease is not None and lease.alive():
        return "running"
    launch = _launcher(store)
    if (launch and pid_alive(launch["pid"]) and time.time() - launch["started"] < STARTUP_GRACE_S
            and (lease is None or lease.started < launch["started"])):
        return "starting"
    return "idle"


def _start(run, n_masks: int) -> None:
    store = run.store
    state = _state(store)
    if state != "idle":
        st.info(f"A writer is already {state} on run `{run.run_id}`; attached to it.")
        return
    spec = dataclasses.replace(run.spec, sampling=dataclasses.replace(run.spec.sampling, n_masks=n_masks))
    argv = views.sample_command(spec, store.cache_dir, _ui.threads() or None)
    env = dict(os.environ)
    if _ui.threads():
        env["OMP_NUM_THREADS"] = str(_ui.threads())
    log = open(store.dir / LOG, "ab")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            start_new_session=True)  # detached: survives a rerun or a closed tab
    log.close()
    threading.Thread(target=proc.wait, daemon=True).start()  # reap it when it exits (no zombie)
    (store.dir / LAUNCHER).write_text(json.dumps({"pid": proc.pid, "started": time.time(), "argv": argv}))
    st.toast(f"Sampling started (pid {proc.pid}).")
    st.rerun()  # redraw from the top: the runs table now lists this run


st.title("Sampling")
spec = _ui.spec()
runs = pipeline.status(_ui.cache_dir())
ids = [r["run_id"] for r in runs]



@st.fragment(run_every=3)
def runs_table() -> None:
    """The cache's runs, refreshed while the page is open (a CLI run appears without a reload)."""
    st.dataframe(views.runs_frame(pipeline.status(_ui.cache_dir())), hide_index=True, width="stretch")


st.subheader("Runs in the cache")
if runs:
    runs_table()
    watched = st.selectbox("Watch run", ids, index=ids.index(_ui.current_run_id()) if _ui.current_run_id() in ids else 0,
                           key="watch_run")
    if watched != _ui.current_run_id() and st.button(f"Use run {watched}'s settings"):
        meta = _ui.store_for(watched).meta()
        st.session_state.spec = views.spec_from_dict(meta["spec"])
        st.session_state.run_id = st.session_state.selected_run = watched
        st.rerun()
else:
    watched = None
    st.caption("No runs yet in " + _ui.cache_dir())

st.subheader("This session's run")
_ui.spec_caption(spec)
c1, c2, c3, c4 = st.columns([2, 1, 1, 1])
n_masks = c1.number_input("masks to evaluate", 1, 1_000_000, spec.sampling.n_masks, key="n_masks_run")
start = c2.button("Start", type="primary")
resume = c3.button("Resume")
cancel = c4.button("Cancel")
if start or resume:
    run = _ui.open_run(spec)
    st.session_state.selected_run = None
    st.session_state.run_id = run.run_id
    st.session_state.watch_target = int(n_masks)
    _start(run, int(n_masks))
    watched = run.run_id
if cancel:
    run_id = watched or _ui.current_run_id()
    if run_id and _ui.store_for(run_id).request_cancel():
        st.toast("Cancel requested: the writer stops after its current mask.")
    else:
        st.info("No sampling is running on this run.")

if watched is None and _ui.current_run_id():
    watched = _ui.current_run_id()


@st.fragment(run_every=2)
def live(run_id: str) -> None:
    """Poll the store for new rows only (results(since_rowid)); draw progress, counts, scatter, table."""
    store = _ui.store_for(run_id)
    key = f"rows:{run_id}"
    rows = st.session_state.setdefault(key, [])
    rows.extend(store.results(rows[-1].rowid if rows else 0))
    lease = store.lease()
    state = _state(store)
    target = lease.target if lease and lease.target else st.session_state.get("watch_target")
    p = views.progress([r.created for r in rows], target)
    st.progress(p["fraction"], text=f"{p['done']} / {target or '?'} masks · {state} · ETA "
                                    f"{views.format_seconds(p['eta_s']) if state != 'idle' else '-'}")
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("samples", p["done"])
    c2.metric("status", state if state != "idle" else (lease.status if lease else "new"))
    c3.metric("masks / s", f"{p['rate']:.2f}" if p["rate"] else "-")
    ppl_full = store.meta().get("ppl_full")
    c4.metric("full-model PPL", f"{ppl_full:.3f}" if ppl_full else "-")
    if lease and lease.status == "failed" and lease.message:
        st.error(lease.message)
    log = store.dir / LOG
    if state == "idle" and log.is_file() and lease is None:
        st.code(log.read_text(errors="replace")[-2000:], language="text")
    if not rows:
        return
    df = views.samples_frame(rows)
    left, right = st.columns([1, 3])
    left.dataframe(views.stratum_counts(df), hide_index=True)
    log_y = right.toggle("log perplexity axis", value=True, key=f"logy:{run_id}")
    fig = px.scatter(df, x="kept", y="ppl", color="stratum", log_y=log_y, hover_data=["mask", "rowid"],
                     labels={"kept": "kept layers", "ppl": "perplexity"}, title="Perplexity vs kept layers")
    right.plotly_chart(fig, key=f"scatter:{run_id}")
    st.dataframe(df.tail(20).iloc[::-1][["rowid", "mask", "kept", "ppl", "score", "seconds"]], hide_index=True,
                 width="stretch")


if watched:
    st.subheader(f"Run `{watched}`")
    live(watched)
