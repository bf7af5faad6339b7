"""Summary: one screen for a demo. The model, the layers removed, perplexity before and after on
calibration and held-out text, size and speed of the full and the pruned model on this machine,
perplexity against layers removed for the method and the stored baselines, the HTML report, and
side-by-side generation for a prompt typed here.

Reads the summary stored for the settings on screen (`python -m engine report`, or Build summary
here, a background job); generation runs in this process, streamed. Healing: the `heal` record stored
for the decided set (`python -m engine heal --remove K`, or Heal here, a background job) shows the
perplexity of the pruned and the healed model side by side.
"""

import dataclasses
from pathlib import Path

import pandas as pd
import streamlit as st

from engine import html_report, pipeline, views
from engine.config import HEAL_STEPS, ExportSpec, HealSpec, spec_argv
from engine.estimators import ESTIMATORS
from pages import _ui

def _stream_plain(pieces) -> None:
    """Generated text as it arrives, as plain text (never Markdown: '====' or '#' stay literal)."""
    box, text = st.empty(), ""
    for piece in pieces:
        text += piece
        box.text(text)


st.title("Summary")
_ui.spec_caption()
run = _ui.analysis_run()
mspec = _ui.method_spec()
L = run.n_layers
k = mspec.remove or max(1, L // 4)
st.caption(f"the decision for k = {k} with {ESTIMATORS[mspec.estimator].label} contributions and the "
           f"{mspec.decision} rule (change them on the Shapley and Prune pages)")
report_path = Path(run.store.dir) / f"report-k{k}.html"
_ui.job_panel(run, "report", "Build summary", mspec, extra=("--out", str(report_path)),
              help="measures the full and the pruned model here and writes the HTML report (background job)")

s = _ui.stored_or_stop(run, "summary", mspec, f"Build summary (after Decide on the Prune page for k = {k})")

st.markdown(f"**{html_report.story(s)}**")
if warning := html_report.speed_warning(s):
    st.warning(warning)
st.plotly_chart(html_report.layer_strip(L, s["removed"]), key="layer_strip")
contrib = pipeline.stored(run, "contributions", mspec)
if contrib:
    st.plotly_chart(html_report.contribution_bars(contrib["contributions"], s["removed"], contrib.get("ci_low"),
                                              contrib.get("ci_high"), label=f"contribution ({ESTIMATORS[mspec.estimator].label})"),
                    key="contribution_bars")
cal = s["ppl"]["calibration"]
full, pruned = s["footprint"]["full"], s["footprint"]["pruned"]
c1, c2, c3, c4 = st.columns(4)
c1.metric("layers removed", f"{len(s['removed'])} of {L}", help=f"layers {', '.join(map(str, s['removed']))}")
c2.metric("calibration perplexity", f"{cal['after']:.2f}", delta=f"{cal['after'] - cal['before']:+.2f}",
          delta_color="inverse", help=f"full model {cal['before']:.2f}, on {cal.get('n_windows', '?')} windows")
share = pruned["n_params"] / full["n_params"]
c3.metric("parameters", f"{pruned['n_params'] / 1e6:.2f} M",
          delta=f"{(pruned['n_params'] - full['n_params']) / 1e6:+.2f} M ({share - 1:+.0%})", delta_color="inverse")
speed = s.get("speed")
if speed:
    c4.metric("forward-pass speed", f"{speed['forward_speedup']:.2f}x",
              help=f"pruned vs full model, median of {speed['repeats']} interleaved repeats (range "
                   f"{speed['forward_low']:.2f}-{speed['forward_high']:.2f}x) on {s['machine']}")
else:  # a summary stored before interleaved timing
    c4.metric("generation speed", f"{pruned['tokens_per_s']:.1f} tok/s",
              delta=f"{pruned['tokens_per_s'] - full['tokens_per_s']:+.1f}", help=f"one measurement on {s['machine']}")
st.dataframe(pd.DataFrame(html_report.rows(s), columns=["measured", "full model", "pruned model"]), hide_index=True,
             width="stretch")
st.plotly_chart(html_report.ppl_curve(s), key="ppl_curve")
if s.get("zeroshot"):
    st.subheader("Zero-shot accuracy (lm-eval)")
    st.dataframe(pd.DataFrame(html_report.zeroshot_rows(s["zeroshot"]),
                              columns=["task", "full model", "pruned model", "pruned − full (95% paired)"]),
                 hide_index=True, width="stretch")
else:
    st.caption("Zero-shot accuracy: evaluate on the Downstream page (with 'full' ticked), then Build summary.")
healed = run.store.get_artifact(pipeline.heal_name(s["removed"], L))
if report_path.is_file():  # with the healing stored since the report was built (the file has the one of then)
    report = html_report.to_html(s, healing=healed).encode() if healed is not None else report_path.read_bytes()
    st.download_button("Download the HTML report", report, file_name=f"pruning-{run.run_id}.html", mime="text/html")

st.subheader("After healing (LoRA)")
heal_out = Path(run.store.dir) / f"healed-k{k}"
h1, h2 = st.columns(2)
heal_steps = h1.number_input("healing steps", min_value=1, max_value=10000, value=HEAL_STEPS, step=50, key="heal_steps",
                             help=views.option_help(HealSpec, "steps"))
heal_sampled = h2.number_input("windows sampled from the full model", min_value=0, max_value=100000,
                               value=HealSpec().generated, step=64, key="heal_generated",
                               help=views.option_help(HealSpec, "generated"))
healing = HealSpec(steps=int(heal_steps), generated=int(heal_sampled))
_ui.job_panel(run, "heal", "Heal", dataclasses.replace(mspec, remove=k), healing,
              extra=tuple(spec_argv(ExportSpec(out=str(heal_out), overwrite=True))),
              help=f"LoRA on every linear layer of the kept layers ({html_report.HEAL_HELP}), then a verified export "
                   f"to {heal_out} (background job; resumes after a cancel)")
if healed is None:
    st.caption("No healing stored for this set yet.")
else:
    st.dataframe(pd.DataFrame(html_report.heal_rows(healed), columns=html_report.HEAL_COLUMNS), hide_index=True,
                 width="stretch")
    st.caption(html_report.heal_caption(healed))

st.subheader("Side by side")
prompt = st.text_input("prompt", value=(s.get("generation") or {}).get("prompt", ""), key="summary_prompt")
n_new = st.slider("new tokens", 8, 128, 40, 8)
if st.button("Generate") and prompt:
    left, right = st.columns(2)
    with left:
        st.markdown("**full model**")
        _stream_plain(pipeline.generate(run, prompt, (), n_new))
    with right:
        st.markdown(f"**pruned model** (without {', '.join(map(str, s['removed']))})")
        _stream_plain(pipeline.generate(run, prompt, s["removed"], n_new))
