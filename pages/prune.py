"""Prune & export: decide which layers to remove, try masks by hand, export the pruned model."""

import json
from pathlib import Path

import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from engine import method, views
from engine.config import SurrogateSpec
from engine.prune import MANIFEST, zip_export
from engine.surrogate import SCORE_FLOOR
from pages import _ui

st.title("Prune & export")
_ui.spec_caption()
run = _ui.analysis_run()
L = run.n_layers

c1, c2, c3 = st.columns(3)
by = c1.radio("choose by", ["layers removed (k)", "target ratio"], horizontal=True)
if by == "target ratio":
    ratio = c2.slider("fraction of layers removed", 1 / L, (L - 1) / L, 0.25, 1 / L)
    k = max(1, min(L - 1, int(round(ratio * L))))
else:
    k = int(c2.number_input("layers to remove", 1, L - 1, max(1, L // 4)))
heldout = c3.checkbox("also measure held-out splits", value=False,
                      help="demo text: demo-test and demo-ood; costs one evaluation per k and split")
st.caption(f"removing {k} of {L} layers ({k / L:.0%})")


def _fit_and_contributions():
    fit_state = st.session_state.get("fit")
    if fit_state is None or fit_state["run_id"] != run.run_id:
        fitted = method.fit(run, SurrogateSpec(), curve=False)
        fit_state = st.session_state.fit = {"run_id": run.run_id, "n": len(fitted.samples.scores),
                                            "spec": SurrogateSpec(), "fit": fitted}
    f = fit_state["fit"]
    c = method.contributions(run, f, "paper", n_masks=20_000, seed=fit_state["spec"].seed)
    return f, c


if st.button("Decide", type="primary"):
    with _ui.shown_errors(), st.spinner("Fitting, estimating contributions and measuring candidate sets..."):
        f, c = _fit_and_contributions()
        splits = method.eval_splits_for(run.spec.data) if heldout else ()
        ds = method.decide(run, f, c, range(1, k + 1), eval_splits=splits)
    st.session_state.decisions = {"run_id": run.run_id, "k_max": k, "decisions": ds, "fit": f}

state = st.session_state.get("decisions")
if not state or state["run_id"] != run.run_id:
    st.info("Press Decide: fits the surrogate (or reuses the Surrogate page's fit), estimates contributions and "
            "measures the best candidate sets for k = 1..k.")
    st.stop()
ds, f = state["decisions"], state["fit"]
table = views.decisions_frame(ds.to_dict())
k = min(k, state["k_max"])
d = ds.for_k(k)

c1, c2, c3 = st.columns(3)
c1.metric("full-model perplexity", f"{d.ppl_full:.3f}")
c2.metric(f"measured, {k} removed", f"{d.ppl_measured:.3f}", delta=f"{d.ppl_measured - d.ppl_full:+.3f}",
          delta_color="inverse")
c3.metric("predicted", f"{d.ppl_predicted:.3f}")
st.write(f"Removed layers: **{', '.join(map(str, d.removed))}** ({d.method})")
long = table.melt(id_vars=["k"], value_vars=["ppl_predicted", "ppl_measured"], var_name="series",
                  value_name="perplexity")
fig = px.line(long, x="k", y="perplexity", color="series", markers=True, log_y=True,
              title="Perplexity vs layers removed (chosen set per k)")
ks = list(table["k"])  # a trace, not add_hline: hline shapes take log10 units on a log axis
fig.add_trace(go.Scatter(x=ks, y=[d.ppl_full] * len(ks), mode="lines", name="full model",
                         line=dict(dash="dot", color="gray")))
fig.update_xaxes(dtick=1)
st.plotly_chart(fig, key="ppl_vs_k")
st.dataframe(table, hide_index=True, width="stretch")
for name, sp in ds.splits.items():
    st.caption(f"{name}: full {sp.ppl_full:.3f} -> " + ", ".join(f"k={a}: {b:.3f}" for a, b in zip(sp.ks, sp.ppl)))

st.subheader("What-if mask editor")
removed = st.pills("layers to remove", list(range(L)), selection_mode="multi", default=list(d.removed),
                   key=f"whatif:{k}")
mask = views.mask_from_removed(removed, L)  # (L,)
score = float(f.predict(mask[None])[0])
c1, c2 = st.columns(2)
c1.metric("predicted perplexity", f"{d.ppl_full / max(score, SCORE_FLOOR):.3f}", help=f"surrogate score {score:.4f}")
if c2.button("Measure"):
    with _ui.shown_errors(), st.spinner("Evaluating the mask..."):
        st.session_state.measured = (tuple(removed), float(method.measure(run, mask)[0]))
measured = st.session_state.get("measured")
if measured and measured[0] == tuple(removed):
    c2.metric("measured perplexity", f"{measured[1]:.3f}")

st.subheader("Export")
default_out = str(Path(_ui.cache_dir()) / "exports" / f"{run.run_id}-k{k}")
out = st.text_input("export folder (must be empty or new)", value=default_out)
overwrite = st.checkbox("overwrite a previous export in this folder", value=False)
if st.button("Export pruned model"):
    with _ui.shown_errors(), st.spinner("Saving and verifying the pruned model in a fresh process..."):
        result = method.export(run, ds, k, out, f.summary, overwrite=overwrite)
    st.session_state.exported = str(result.out_dir)
exported = st.session_state.get("exported")
if exported and (Path(exported) / MANIFEST).is_file():
    manifest = json.loads((Path(exported) / MANIFEST).read_text())
    ok = (manifest.get("verification") or {}).get("ok")
    st.success(f"exported to {exported} (reload check: {'passed' if ok else 'see manifest'})")
    if st.button("Prepare zip"):
        with _ui.shown_errors():
            st.session_state.zip = str(zip_export(exported))
    if st.session_state.get("zip") and Path(st.session_state.zip).is_file():
        with open(st.session_state.zip, "rb") as fh:
            st.download_button("Download zip", fh, file_name=Path(st.session_state.zip).name,
                               mime="application/zip")
    with st.expander("manifest", expanded=False):
        st.json(manifest)
