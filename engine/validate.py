"""Every option checked before any model is loaded or any mask evaluated.

Contract:
- ``check_run(spec, remove=None, out_dir=None, overwrite=False, cache_dir=None)`` raises a
  WorkbenchError (``InputError`` for options, ``ModelLoadError`` for a folder that cannot load,
  ``EnvironmentFault`` for a cache path that is a file) or returns the ``ModelFacts`` it read.
  It reads only the model's config.json (``AutoConfig``; no weights, no tokenizer), so it costs
  milliseconds; a hub id that is neither reachable nor cached is left to ``load_model``, which
  reports it. Checks: layer count vs ``--remove`` (1..L-1) and the sampling settings (strata),
  ``--seq-len`` vs the model's maximum positions, the tokenizer files of a local folder, the
  export folder (``export_checks.check_export_folder``) and the cache directory.
- ``check_cache_dir(cache_dir)``: EnvironmentFault when the path is a file.
- ``check_full_perplexity(lm, windows, ppl_full)`` raises ``NonFiniteModel`` when the full
  model's perplexity is NaN/inf, naming the parameters holding non-finite values and the first
  decoder layer whose output is non-finite: sampling such a run would only store score-0 rows.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from engine.config import LAYER_COUNT_FIELDS, ModelSpec, RunSpec
from engine.errors import EnvironmentFault, InputError, ModelLoadError, NonFiniteModel
from engine.load_checks import check_weight_files

COUNT_FIELDS = LAYER_COUNT_FIELDS
POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.tiktoken")  # fmt: skip


@dataclass(frozen=True)
class ModelFacts:
    """What the config says, read without loading weights."""

    model_type: str | None
    n_layers: int | None  # decoder layers, from the adapter's count field (None: not found)
    max_positions: int | None  # longest sequence the position embeddings allow (None: no limit known)


def model_facts(spec: ModelSpec) -> ModelFacts | None:
    """The model's layer count and maximum positions from its config.json; None if it cannot be read here."""
    from engine.models import ADAPTERS, _resolve, pretrained_args

    source, _, local_only = _resolve(spec)  # ModelLoadError for a missing folder / bad name
    folder = Path(source)
    if folder.is_dir():
        _check_tokenizer_files(spec, folder)
        check_weight_files(folder)  # a damaged or truncated safetensors file, named before any loading
    path, gguf = pretrained_args(source)  # a .gguf file: its metadata is the config, its tokenizer inside
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, revision=spec.revision, trust_remote_code=spec.trust_remote_code,
                                            local_files_only=local_only, **gguf)  # fmt: skip
    except Exception as e:  # noqa: BLE001 -- load_model reports the same failure with its own message
        if gguf:
            return None  # load_model words it (architecture / quant type)
        if folder.is_dir() and "trust_remote_code" not in str(e):
            raise ModelLoadError(f"the config.json of {spec.name!r} cannot be read ({_one_line(e)}); "
                                 "pass a folder saved with save_pretrained") from e
        return None
    model_type = getattr(config, "model_type", None)
    adapter = ADAPTERS.get(model_type) if isinstance(model_type, str) else None
    fields = (adapter.count_fields if adapter is not None else ()) + COUNT_FIELDS
    n_layers = next((v for f in fields if isinstance(v := getattr(config, f, None), int) and not isinstance(v, bool)),
                    None)  # fmt: skip
    max_pos = next((v for f in POSITION_FIELDS if isinstance(v := getattr(config, f, None), int) and v > 0), None)
    if model_type == "mamba":
        max_pos = None  # a state-space model has no position table
    return ModelFacts(model_type=model_type, n_layers=n_layers, max_positions=max_pos)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:600] or type(e).__name__


def _check_tokenizer_files(spec: ModelSpec, folder: Path) -> None:
    names = {p.name for p in folder.iterdir()}
    if not names & set(TOKENIZER_FILES) and not any(n.endswith(".tiktoken") for n in names):
        raise ModelLoadError(
            f"model folder {folder} has no tokenizer files (looked for {', '.join(TOKENIZER_FILES)}). Save the "
            "tokenizer next to the weights (tokenizer.save_pretrained(folder)) or copy the base model's tokenizer "
            "files into the folder, then run the command again."
        )


def check_run(spec: RunSpec, remove: int | None = None, out_dir=None, overwrite: bool = False,
              cache_dir=None) -> ModelFacts | None:
    """Refuse bad options before any model is loaded (see the module contract)."""
    check_cache_dir(cache_dir)
    from engine.data import check_source

    check_source(spec.data.source)  # a folder or a missing file, before the model is read
    first = spec.sampling.first_windows
    if first and first >= spec.data.n_windows:
        raise InputError(f"--first-windows {first}: the run has {spec.data.n_windows} calibration windows, so a first "
                         f"evaluation on fewer windows needs 1..{spec.data.n_windows - 1} (0: every window at once).")
    if out_dir is not None:
        from engine.export_checks import check_export_folder

        check_export_folder(out_dir, overwrite)
    facts = model_facts(spec.model)
    if facts is None:
        return None
    L = facts.n_layers
    if remove is not None and L is not None and not 1 <= remove <= L - 1:
        raise InputError(
            f"--remove {remove}: the model has {L} decoder layers, so the number of layers to remove must be in "
            f"1..{L - 1}."
        )
    if remove is not None and L is None and remove < 1:
        raise InputError(f"--remove {remove}: remove at least 1 layer.")
    if facts.max_positions is not None and spec.data.seq_len > facts.max_positions:
        raise InputError(
            f"--seq-len {spec.data.seq_len} is longer than the model allows ({facts.max_positions} positions, "
            f"from its config); pass --seq-len {facts.max_positions} or less."
        )
    if L is not None:
        from engine.sampling import sample_masks

        sample_masks(dataclasses.replace(spec.sampling, n_masks=0), L)  # SamplingError for bad strata
    return facts


def check_removed(removed, n_layers: int | None) -> None:
    """InputError unless every id of `removed` (None: nothing to check) is a layer 0..n_layers-1, once each,
    and at least one layer is kept; with `n_layers` None only negative ids and duplicates are refused."""
    if removed is None:
        return
    ids = [int(i) for i in removed]
    top = f"0..{n_layers - 1}" if n_layers else "0 or more"
    bad = [i for i in ids if i < 0 or (n_layers is not None and i >= n_layers)]
    if bad:
        raise InputError(f"--removed {','.join(map(str, ids))}: layer {', '.join(map(str, bad))} does not exist; the "
                         f"model's layers are {top} (0-based).")
    if len(set(ids)) != len(ids):
        raise InputError(f"--removed {','.join(map(str, ids))} names a layer twice; list each layer once.")
    if n_layers is not None and len(ids) >= n_layers:
        raise InputError(f"--removed {','.join(map(str, ids))} removes all {n_layers} layers; keep at least one.")


def check_cache_dir(cache_dir) -> None:
    """EnvironmentFault when the cache directory path (or, without one, $LAYERPRUNE_CACHE) is a file."""
    if cache_dir is None:
        import os

        from engine.config import default_cache_dir

        if "LAYERPRUNE_CACHE" in os.environ and default_cache_dir().is_file():
            raise EnvironmentFault(f"$LAYERPRUNE_CACHE {default_cache_dir()} is a file; point it at a folder or "
                                   "pass --cache-dir FOLDER (it is created if missing).")
        return
    if Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        raise EnvironmentFault(f"--cache-dir {cache_dir} is a file; pass a folder (it is created if missing).")
    from engine.atomic import existing_ancestor

    above = existing_ancestor(Path(cache_dir))
    if not Path(cache_dir).exists() and not above.is_dir():
        raise EnvironmentFault(f"--cache-dir {cache_dir}: {above} is a file, so the folder cannot be created; "
                               "pass a folder path.")


def check_full_perplexity(lm, windows, ppl_full: float) -> None:
    """NonFiniteModel (naming the cause) unless the full model's perplexity is finite."""
    if ppl_full is not None and math.isfinite(ppl_full):
        return
    import torch

    bad_params = []
    for name, p in lm.model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            bad_params.append(f"{name} ({int((~torch.isfinite(p)).sum())} non-finite values)")
    first = _first_nonfinite_layer(lm, windows)
    cause = (
        f"the weights hold NaN/inf values: {', '.join(bad_params[:5])}{' ...' if len(bad_params) > 5 else ''}"
        if bad_params else
        "no weight is NaN/inf, so the activations overflow (try --dtype float32 or bfloat16)"
    )  # fmt: skip
    where = (
        "the embeddings already give non-finite values" if first == -1 else
        f"the first decoder layer whose output is non-finite is layer {first}" if first is not None else
        "every decoder output is finite, so the head or the loss overflows"
    )  # fmt: skip
    raise NonFiniteModel(
        f"the full model's perplexity on the calibration windows is {ppl_full}: {cause}; {where}. Every mask "
        "score would be meaningless, so nothing was sampled. Repair or re-download the checkpoint (or choose "
        "another dtype) and run the command again."
    )


def _first_nonfinite_layer(lm, windows) -> int | None:
    """Index of the first decoder layer with a non-finite output (-1: the embeddings), or None."""
    import torch

    ids = windows.input_ids if hasattr(windows, "input_ids") else windows
    layers = lm.adapter.layers(lm.model)
    seen: list[int] = []

    def hook(index):
        def fn(module, args, output):
            if index == 0 and args and torch.is_tensor(args[0]) and not bool(torch.isfinite(args[0]).all()):
                seen.append(-1)
            out = output[0] if isinstance(output, tuple) else output
            if torch.is_tensor(out) and not bool(torch.isfinite(out).all()):
                seen.append(index)
        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.inference_mode():
            lm.model(input_ids=ids[:1].to(lm.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return min(seen) if seen else None
