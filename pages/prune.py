"""Prune & export: decide which layers to remove, try masks by hand, export exactly the set on screen.

Decisions are stored per stage-2 settings (surrogate, estimator chosen on the Shapley page,
decision rule); the page shows the stored decision for the settings on screen and exports the
set in the what-if editor, all through engine.pipeline.
"""

import dataclasses
import json
from pathlib import Path

import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from engine import pipeline, views
from engine.config import ExportSpec, spec_argv
from engine.decision import removal_mask
from engine.estimators import ESTIMATORS
from engine.export import MANIFEST, zip_export
from pages import _ui

st.title("Prune & export")
_ui.spec_caption()
run = _ui.analysis_run()
L = run.n_layers
current = _ui.method_spec()

c1, c2, c3 = st.columns(3)
by = c1.radio("choose by", ["layers removed (k)", "target ratio"], horizontal=True)
if by == "target ratio":
    ratio = c2.slider("fraction of layers removed", 1 / L, (L - 1) / L, 0.25, 1 / L)
    k = max(1, min(L - 1, int(round(ratio * L))))
else:
    k = int(c2.number_input("layers to remove", 1, L - 1, current.remove or max(1, L // 4)))
rule = c3.radio("decision rule", ["verified", "rank-and-cut"], index=["verified", "rank-and-cut"].index(current.decision),
                horizontal=True, help="verified: measure rank-and-cut and the surrogate's best sets, keep the best "
                                      "measured; rank-and-cut: the paper's rule")
heldout = st.text_input("held-out text (files or presets, comma separated)", value="",
                        help="measured before and after pruning for each k; with the demo text, demo-test and "
                             "demo-ood are always measured")
mspec = _ui.set_method_spec(dataclasses.replace(current, remove=k, decision=rule))
st.caption(f"removing {k} of {L} layers ({k / L:.0%}) · contributions: {ESTIMATORS[mspec.estimator].label} "
           f"(chosen on the Shapley page) · surrogate {mspec.surrogate.kind}")

eval_data = tuple(spec_argv(ExportSpec(eval_data=tuple(n.strip() for n in heldout.split(",") if n.strip()))))
_ui.job_panel(run, "prune", "Decide", mspec, extra=eval_data,
              help=f"runs `python -m engine prune` in the background: fit, contributions, and the candidate sets "
                   f"for k = {k} (rank-and-cut, the surrogate's best, the baselines', swaps) raced on real windows; "
                   f"stored in the run")

state = pipeline.stored(run, "decisions", mspec)
if not state or k not in state["ks"]:
    st.info(f"No decision stored for k = {k} with these settings: press Decide (races the candidate sets for "
            f"k = {k} on real windows).")
    st.stop()
if state["stale"]:
    st.warning(f"Decided from {state['n_masks']} masks; the run now has {run.store.count()}. Decide again.")
d = next(x for x in state["decisions"] if x["k"] == k)
table = views.decisions_frame(state)

c1, c2, c3 = st.columns(3)
c1.metric("full-model perplexity", f"{d['ppl_full']:.3f}", help=f"{run.spec.data.n_windows} calibration windows")
c2.metric(f"measured, {k} removed", f"{d['ppl_measured']:.3f}", delta=f"{d['ppl_measured'] - d['ppl_full']:+.3f}",
          delta_color="inverse")
c3.metric("predicted by the surrogate", f"{d['ppl_predicted']:.3f}")
finished = sum(c.get("outcome", "finished") in ("", "finished") for c in d["candidates"])
st.write(f"Chosen for k = {k}: remove layers **{', '.join(map(str, d['removed']))}** ({d['method']}"
         + (f", from {d['source']}" if d.get("source") else "")
         + f"; {d.get('n_measured') or len(d['candidates'])} sets measured, {finished} on every window"
         + (f", {d['evaluations']} set-window evaluations" if d.get("evaluations") else "")
         + ("; the decision budget was hit" if d.get("budget_hit") else "") + ")")
if d.get("tied_on"):
    tied = "; ".join("{" + ", ".join(map(str, t)) + "}" for t in d.get("tied") or []) or "none"
    st.write(f"Statistically tied with it ({d['tie_level']:.0%} paired bootstrap over windows, on {d['tied_on']}): "
             f"{tied}")
if any("ppl_raced" in c for c in d["candidates"]):
    with st.expander(f"How the set was chosen: the race of the {len(d['candidates'])} candidate sets", expanded=False):
        st.dataframe(views.race_frame(d, tuple(d["removed"])), hide_index=True, width="stretch", key="race_table")
        st.caption("The choice compares the perplexity on the raced windows (validation windows of the calibration "
                   "text, then the calibration windows), which the finishers all saw; a set can measure lower on the "
                   f"{run.spec.data.n_windows} calibration windows alone and still lose there. Sets that left early "
                   "were shown worse by the paired bound or cut by halving.")
long = table.melt(id_vars=["k"], value_vars=["ppl_predicted", "ppl_measured"], var_name="series",
                  value_name="perplexity")
long["series"] = long["series"].map({"ppl_predicted": "predicted", "ppl_measured": "measured"})
fig = px.line(long, x="k", y="perplexity", color="series", markers=True, log_y=True,
              labels={"k": "layers removed"}, title="Calibration perplexity vs layers removed (chosen set per k)")
ks = list(table["k"])  # a trace, not add_hline: hline shapes take log10 units on a log axis
fig.add_trace(go.Scatter(x=ks, y=[d["ppl_full"]] * len(ks), mode="lines", name="full model",
                         line=dict(dash="dot", color="gray")))
fig.update_xaxes(dtick=1)
st.plotly_chart(fig, key="ppl_vs_k")
st.dataframe(table.rename(columns=views.DECISION_COLUMNS), hide_index=True, width="stretch")
for name, sp in state["splits"].items():
    st.caption(f"held-out text {name}: full {sp['ppl_full']:.3f} -> "
               + ", ".join(f"k={a}: {b:.3f} ({b / sp['ppl_full'] - 1:+.1%})" for a, b in zip(sp["ks"], sp["ppl"]))
               + " (the Summary page measures the change with its paired interval over the windows)")

st.subheader("What-if mask editor")
removed = st.pills("layers to remove", list(range(L)), selection_mode="multi", default=list(d["removed"]),
                   key=f"whatif:{k}:{state['n_masks']}")
mask = removal_mask(removed, L)  # (L,)
c1, c2 = st.columns(2)
outside = views.extrapolation_label(pipeline.samples(run).masks, mask)  # None inside the sampled kept counts
c1.metric("predicted perplexity", f"{pipeline.predict_ppl(run, mspec, mask)[0]:.3f}",
          delta=outside, delta_color="off",
          help="the surrogate's prediction" + (f"; {outside}: no evaluated mask keeps this many layers, so the "
                                                "surrogate extrapolates and the number may be off by factors; "
                                                "press Measure" if outside else ""))
if outside:
    st.warning(f"Predicted perplexity {outside}: the surrogate extrapolates here. Measure the mask to know its "
               "perplexity.")
if c2.button("Measure"):
    with _ui.shown_errors(), st.spinner("Evaluating the mask..."):
        st.session_state.measured = (run.run_id, tuple(sorted(removed)), pipeline.measure(run, mask)[0])
measured = st.session_state.get("measured")
if measured and measured[:2] == (run.run_id, tuple(sorted(removed))):
    c2.metric("measured perplexity", f"{measured[2]:.3f}")

st.subheader("Export")
chosen = tuple(sorted(int(i) for i in removed))
st.write(f"Exports the model without layers **{', '.join(map(str, chosen)) or 'none'}** (the editor's selection).")
default_out = str(Path(_ui.cache_dir()) / "exports" / f"{run.run_id}-{'-'.join(map(str, chosen)) or 'full'}")
# Keyed by the set: after a what-if edit the suggested folder names the new set, never the old one.
out = st.text_input("export folder (must be empty or new)", value=default_out,
                    key=f"export_out:{run.run_id}:{'-'.join(map(str, chosen))}")
overwrite = st.checkbox("overwrite a previous export in this folder", value=False)
if chosen and len(chosen) < L:
    job = _ui.job_panel(run, "export", "Export pruned model", mspec,
                        extra=("--removed", ",".join(map(str, chosen)),
                               *spec_argv(ExportSpec(out=out, overwrite=overwrite))),
                        help="runs `python -m engine export` in the background: saves, then reloads the folder in a "
                             "fresh process and checks perplexity and generation")
    if job and job.status == "finished":
        st.session_state.exported = job.result["out"]
elif not chosen:
    st.info("Select at least one layer to remove in the what-if editor to export a pruned model.")
else:
    st.info(f"Every one of the {L} layers is selected: keep at least one layer to export a model.")
exported = st.session_state.get("exported")
if exported and (Path(exported) / MANIFEST).is_file():
    manifest = json.loads((Path(exported) / MANIFEST).read_text())
    ok = (manifest.get("verification") or {}).get("ok")
    st.success(f"exported to {exported}: layers {manifest.get('removed_layers')} removed "
               f"(reload check: {'passed' if ok else 'see manifest'})")
    if st.button("Prepare zip"):
        with _ui.shown_errors():
            st.session_state.zip = str(zip_export(exported))
    if st.session_state.get("zip") and Path(st.session_state.zip).is_file():
        with open(st.session_state.zip, "rb") as fh:
            st.download_button("Download zip", fh, file_name=Path(st.session_state.zip).name,
                               mime="application/zip")
    with st.expander("manifest", expanded=False):
        st.json(manifest)
