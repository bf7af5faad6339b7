"""Interactions: which layer pairs are worth more (synergy) or less (redundancy) together, and the
near-optimal removal sets.

Shows the interaction map stored for the settings on screen (index, surrogate, fit); Compute starts
`python -m engine interactions` as a background job (engine.pipeline.interactions), Find starts
`python -m engine candidates`; Measure (four masks) calls engine.pipeline.measure_pair in-process.
"""

import dataclasses

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from engine import pipeline, views
from engine.config import INTERACTION_SURROGATE
from engine.estimators import ESTIMATORS
from pages import _ui

st.title("Interactions")
_ui.spec_caption()
run = _ui.analysis_run()
L = run.n_layers
mspec = _ui.method_spec()

indices = pipeline.interaction_indices()
c1, c0, c2, c3 = st.columns([2, 2, 1, 1])
index = c1.selectbox("index", list(indices), format_func=lambda k: f"{indices[k]} ({k})", key="interaction_index")
surrogate = c0.selectbox("map surrogate", [INTERACTION_SURROGATE, "same"], key="interaction_surrogate",
                         format_func=lambda k: f"{k} (recommended)" if k != "same" else
                         f"the run's surrogate ({mspec.surrogate.kind})",
                         help=f"{INTERACTION_SURROGATE}: the mean of the MLP and an exp-of-pairwise model, the closest "
                              "to the exact interactions of the demo game at 256 masks; the "
                              "run's surrogate: the one chosen on the Surrogate page")
fit_on = c2.radio("surrogate fitted on", ["all", "train"], horizontal=True, key="interaction_fit_on",
                  help="all: the ensemble refitted on every evaluated mask (more accurate maps on the demo game); "
                       "train: the fit step's ensemble (80% of the masks)")
check = c3.checkbox("bias check", key="interaction_bias_check",
                    help="also estimate every pair from the real evaluations (5 cross-fitted fits): an interval that "
                         "accounts for the surrogate's bias on the kept counts the run sampled")
_ui.job_panel(run, "interactions", "Compute interactions", mspec,
             extra=("--index", index, "--fit-on", fit_on, "--interaction-surrogate", surrogate,
                    *(("--bias-check",) if check else ())),
             help="runs `python -m engine interactions` in the background; the map is stored in the run")

result = pipeline.stored_interactions(run, mspec, index, fit_on, surrogate)
if not result:
    st.info("No interaction map stored for these settings yet: press Compute interactions.")
    st.stop()
if result["stale"]:
    st.warning(f"Computed from {result['n_masks']} masks; the run now has {run.store.count()}. Compute again.")

details = result["details"]
st.markdown(f"**Estimand:** {result.get('estimand') or result.get('name')}")
if details.get("extrapolated"):
    st.warning("These values are the surrogate's own index: most of its weight lies on kept counts no evaluated "
               "mask has, so they are extrapolated. Sample three consecutive kept counts (e.g. size-uniform masks) "
               "for an index estimated from real evaluations.")
m1, m2, m3, m4 = st.columns(4)
m1.metric("surrogate evaluations", f"{result['n_evaluations']:,}", help=result["method"])
strongest = result["pairs"][0]
m2.metric("strongest pair", f"({strongest['i']}, {strongest['j']})", f"{strongest['value']:+.4f}")
unsampled = details.get("unsampled_weight_fraction")
if unsampled is not None:
    m3.metric("index weight on unsampled sizes", f"{unsampled:.0%}",
              help="share of this index's weight on kept-layer counts the run never sampled: the surrogate "
                   "extrapolates there; the error bars include the jackknife over the masks and, for "
                   f"{INTERACTION_SURROGATE}, the disagreement of its two parts, not a bias both parts share")
if run.spec.sampling.scheme == "stratified" and unsampled:
    st.caption("This run samples the paper's strata: the strongest pairs (which draw on small coalitions) can come "
               f"out shrunk. On the demo game, {INTERACTION_SURROGATE} on 256 stratified masks ranked the pairs "
               "closest to the exact index.")
chk = result.get("bias_check")
if chk:
    m4.metric("pairs outside the bias check", f"{chk['outside']} of {len(result['pairs'])}",
              help=f"pairs whose surrogate value lies outside the 2-stderr interval estimated from the real "
                   f"evaluations ({chk['folds']} cross-fitted folds; {chk['covered_weight']:.0%} of the index weight "
                   "on sampled kept counts)")
interval = details.get("interval")
st.caption(f"Map of {result.get('surrogate', mspec.surrogate.kind)} fitted on {result['fit_on']} masks. Diagonal (not "
           f"drawn in the heatmap): {result['diagonal']}. Error bars: how far the values move when the evaluated "
           "masks are resampled, plus the surrogate's own noise"
           + (f"; {interval['level']:.0%} intervals" + ("" if details.get("restricted") else
                                                       f" from {interval['folds']} groups of masks") if interval
              else "") + ".")
with st.expander("How the errors are computed"):
    st.write(details["stderr_is"])

M, se = np.array(result["matrix"], float), np.array(result["stderr"], float)
Z = views.off_diagonal(M)
bound, clipped = views.colour_bound(Z)
if clipped and not st.checkbox(f"clip the colour scale at ±{bound:.4f} (95% of pairs lie within it; the strongest pairs, up to "
                               f"{float(np.nanmax(np.abs(Z))):.4f}, saturate)", value=True, key="interaction_clip"):
    bound = float(np.nanmax(np.abs(Z))) or 1.0
heat = go.Figure(go.Heatmap(
    z=Z, x=list(range(L)), y=list(range(L)), customdata=se, colorscale="RdBu_r", zmid=0, zmin=-bound, zmax=bound,
    hovertemplate="layers %{y} × %{x}<br>value %{z:+.4f} ± %{customdata:.4f}<extra></extra>",
    colorbar=dict(title="interaction")))
heat.update_layout(title=f"{indices[index]}: red = synergy, blue = redundancy", xaxis_title="layer",
                   yaxis_title="layer", xaxis=dict(dtick=1), yaxis=dict(dtick=1, autorange="reversed"), height=560)
st.plotly_chart(heat, key="interaction_heatmap")

left, right = st.columns(2)
with left:
    layer = st.selectbox("layer profile", list(range(L)), key="interaction_layer")
    prof = views.interaction_profile(result, layer)
    bars = go.Figure(go.Bar(x=prof.partner, y=prof.value, marker_color=np.where(prof.value >= 0, "#b2182b", "#2166ac"),
                            error_y=dict(type="data", array=prof.stderr.to_numpy(), visible=True)))
    if chk:
        others = prof.partner.to_numpy()
        bars.add_trace(go.Scatter(x=others, y=np.array(chk["corrected"])[layer, others], mode="markers",
                                  name="bias check (real evaluations)", marker=dict(color="black", symbol="diamond"),
                                  error_y=dict(type="data", array=2 * np.array(chk["stderr"])[layer, others])))
    bars.update_layout(title=f"layer {layer} with every other layer (diagonal value {M[layer, layer]:+.4f})",
                       xaxis_title="partner layer", yaxis_title="interaction", xaxis=dict(dtick=1))
    st.plotly_chart(bars, key="interaction_profile")
with right:
    pairs = views.interaction_pairs_frame(result)
    n_show = st.number_input("pairs shown", 3, max(3, len(pairs)), min(8, len(pairs)), key="interaction_n")
    st.markdown("**Top synergistic pairs**")
    st.dataframe(pairs[pairs.value > 0].head(int(n_show)), hide_index=True, key="synergy_table")
    st.markdown("**Top redundant pairs**")
    st.dataframe(pairs[pairs.value < 0].head(int(n_show)), hide_index=True, key="redundancy_table")
    st.download_button("Download CSV", pairs.to_csv(index=False).encode(), file_name=f"interactions-{index}.csv",
                       mime="text/csv")

st.subheader("Per-layer contributions by estimator")
st.caption("Every contribution estimate stored for this surrogate (default budget and seed; compute more on the "
           "Shapley page), next to this index's order-1 values (the diagonal).")
overlay = [pd.DataFrame({"layer": range(L), "value": np.diag(M), "error": np.diag(se),
                         "estimator": f"{index} diagonal"})]
for name, entry in ESTIMATORS.items():
    c = pipeline.stored(run, "contributions", dataclasses.replace(mspec, estimator=name, budget=None, mc_seed=0))
    if c:
        err = [0.0 if x is None else x for x in (c["stderr"] or [None] * L)]
        overlay.append(pd.DataFrame({"layer": range(L), "value": c["contributions"], "error": err,
                                     "estimator": entry.label}))
ov = pd.concat(overlay)
st.plotly_chart(px.bar(ov, x="layer", y="value", error_y="error", color="estimator", barmode="group")
                .update_xaxes(dtick=1), key="estimator_overlay")

st.subheader("Measure a pair")
st.caption("Real evaluations on the calibration windows: removing both layers against removing each. Stored with "
           "the run (not among the samples).")
p1, p2, p3 = st.columns([1, 1, 2])
a = p1.selectbox("layer a", list(range(L)), index=strongest["i"], key="measure_a")
b = p2.selectbox("layer b", list(range(L)), index=strongest["j"], key="measure_b")
if p3.button("Measure", disabled=a == b):
    with _ui.shown_errors(), st.spinner("Evaluating four masks..."):
        pipeline.measure_pair(run, a, b)
measured = (run.store.get_artifact("pair_measurements") or {}).get("items", [])
if measured:
    rows = [{**m, "predicted_at_full": pipeline.predicted_pair_at_full(run, mspec, m["i"], m["j"])} for m in measured]
    st.dataframe(pd.DataFrame(rows).rename(columns=views.PAIR_WORDS), hide_index=True, key="pair_measurements")
    st.caption(f"The measured and the surrogate's interaction at the full model are the same quantity (scores, "
               f"s = full PPL / PPL) and should agree; the map's {indices[index]} of a pair averages that quantity over "
               "coalitions of every size, so it differs from both.")

st.subheader("Near-optimal removal sets")
e1, e2 = st.columns(2)
k_max = e1.number_input("remove up to k layers", 1, L - 1, min(max(1, L // 4), L - 1), key="near_k")
top = e2.number_input("sets per k", 1, 50, 10, key="near_top")
cspec = dataclasses.replace(mspec, remove=int(k_max))
_ui.job_panel(run, "candidates", "Find near-optimal sets", cspec, extra=("--top", str(int(top))),
             help="runs `python -m engine candidates` in the background; the sets are stored in the run")
near = pipeline.stored_candidates(run, cspec, int(top))
if not near:
    st.info("Press Find near-optimal sets: the best removal sets per k by surrogate prediction, how often each "
            "layer appears among them, and which layers swap between them.")
    st.stop()
by_k = {c["k"]: c for c in near["candidates"]}
k = st.select_slider("k (layers removed)", options=sorted(by_k), value=max(by_k), key="near_show_k")
chosen = by_k[k]
st.caption(f"{chosen['search']}; interval: ensemble mean ± 2 std of the predicted score, as perplexity; measured "
           "where the run evaluated that set.")
outside = views.extrapolation_label(pipeline.samples(run).masks, np.arange(L) >= k)  # any set keeping L - k layers
if outside:
    st.warning(f"Every set here keeps {L - k} of {L} layers: {outside}. The surrogate extrapolates, so the predicted "
               "perplexities and their intervals can be far off; measure a set (Prune page, what-if editor) before "
               "trusting it.")
n1, n2 = st.columns([3, 2])
n1.dataframe(views.near_sets_frame(chosen), hide_index=True, key="near_sets")
freq = pd.DataFrame({"layer": list(range(L)), "share of near-optimal sets": chosen["layer_frequency"]})
n2.plotly_chart(px.bar(freq, x="layer", y="share of near-optimal sets").update_xaxes(dtick=1), key="near_frequency")
if chosen["swaps"]:
    st.markdown("**Interchangeable layers** (sets S + a and S + b both near-optimal)")
    st.dataframe(pd.DataFrame(chosen["swaps"]), hide_index=True, key="near_swaps")
