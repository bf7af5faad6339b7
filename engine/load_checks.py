"""Checks that a loaded checkpoint is the model its config describes, before any mask is evaluated.

transformers loads a folder whose weights do not cover its config with a printed report and
randomly initialised tensors; the engine would then sample (and export) a silently wrong model.
Contract (every failure is a ``ModelLoadError``, exit 4, naming the folder or file and what to do):
- ``check_weight_files(folder)``: every ``*.safetensors`` file opens (``safetensors.safe_open``
  validates the header and that the data is as long as the header says), so a corrupt or
  truncated file is named before anything is loaded. Reads headers only (milliseconds).
- ``check_loading_info(name, folder, info)``: `info` is what ``from_pretrained(...,
  output_loading_info=True)`` returns; any missing key (a tensor the config needs that the
  weights lack), unexpected key (a tensor the config has no place for) or mismatched shape is
  refused. Tied weights (lm_head = embeddings) are not reported by transformers, so they pass;
  stored copies of computed buffers (rotary ``inv_freq`` in older checkpoints) are ignored.
- ``check_tokenizer_fits(name, tokenizer, model)``: every id the tokenizer can produce
  (``len(tokenizer)``) must index the input embedding; else the first window would fail with
  an IndexError (or, on GPU, an assert) mid-sampling.
- ``loading_failure(name, source, e)``: the ModelLoadError for an exception raised while
  transformers read the weights (safetensors header errors, truncated pickles, shape
  mismatches), or None when `e` is not one of those (then it is a bug).
"""

from __future__ import annotations

import pickle
from pathlib import Path

from engine.errors import ModelLoadError

_SHOWN = 6  # keys listed in a message


def _keys(keys) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def check_weight_files(folder) -> None:
    """ModelLoadError naming the first safetensors file under `folder` that cannot be opened."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    from safetensors import safe_open

    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as st:
                st.keys()
        except Exception as e:  # noqa: BLE001 -- SafetensorError has no stable import path across versions
            raise ModelLoadError(
                f"the weight file {f} is damaged or truncated ({' '.join(str(e).split())[:300]}); "
                f"re-copy or re-download the model into {folder} and run the command again."
            ) from e


def check_loading_info(name: str, folder, info: dict, model=None) -> None:
    """ModelLoadError when the weights do not cover the config exactly (see the module contract).
    With `model`, unexpected keys named like one of its buffers (rotary ``inv_freq``, which older
    checkpoints stored) are ignored: the model computes them, they are not weights."""
    missing = set(info.get("missing_keys") or ())
    unexpected = set(info.get("unexpected_keys") or ())
    if model is not None:
        buffers = {n.rsplit(".", 1)[-1] for n, _ in model.named_buffers()}
        unexpected = {k for k in unexpected if k.rsplit(".", 1)[-1] not in buffers}
    mismatched = list(info.get("mismatched_keys") or ())
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensors the config needs are missing from the weights ({_keys(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} tensors in the weights have no place in the config ({_keys(unexpected)})")
    if mismatched:
        shown = ", ".join(f"{m[0]} {tuple(m[1])} vs {tuple(m[2])}" if isinstance(m, (tuple, list)) and len(m) == 3
                          else str(m) for m in mismatched[:_SHOWN])
        parts.append(f"{len(mismatched)} tensors have other shapes than the config says ({shown})")
    raise ModelLoadError(
        f"the weights in {folder} do not match its config.json: " + "; ".join(parts) + ". Loading it "
        "would leave those tensors at random values. Use the config.json saved with these weights (e.g. "
        "num_hidden_layers equal to the layers in the weights) or re-save the model with save_pretrained."
    )


def check_tokenizer_fits(name: str, tokenizer, model) -> None:
    """ModelLoadError when the tokenizer can produce ids the model's input embedding does not have."""
    if tokenizer is None:
        return
    rows = embedding_rows(model)
    n_ids = len(tokenizer)
    # Added special tokens past the embedding that the engine never uses (GGUF tokenizers gain an
    # <|endoftext|> this way) are allowed: text that spells one out is refused by `check_ids_fit`.
    used = {getattr(tokenizer, f"{t}_token_id", None) for t in ("pad", "eos", "bos", "unk")} - {None}
    special = set(getattr(tokenizer, "all_special_ids", []) or []) | {
        i for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items() if getattr(t, "special", False)}
    beyond = set(range(rows, n_ids)) if rows is not None else set()
    if rows is not None and n_ids > rows and (len(beyond - special) or beyond & used):
        raise ModelLoadError(
            f"the tokenizer of {name!r} has {n_ids} token ids but the model's embedding has {rows} rows "
            f"(config vocab_size {getattr(model.config, 'vocab_size', '?')}): ids {rows}..{n_ids - 1} would fail "
            "mid-evaluation. Use the tokenizer saved with this model (copy its tokenizer files into the folder)."
        )


def embedding_rows(model) -> int | None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return getattr(emb, "num_embeddings", None)


def check_ids_fit(name: str, input_ids, model, source: str) -> None:
    """ModelDataError when tokenised text holds an id the embedding lacks (an added token spelled out in it)."""
    from engine.errors import DataError

    rows = embedding_rows(model)
    top = int(input_ids.max()) if input_ids.numel() else -1
    if rows is not None and top >= rows:
        raise DataError(f"the text {source!r} tokenises to id {top}, past the {rows} rows of {name!r}'s embedding "
                        "(it spells out a special token the model was not trained with); remove that token from "
                        "the text or use the tokenizer saved with this model.")


def loading_failure(name: str, source, e: BaseException) -> ModelLoadError | None:
    """The ModelLoadError for a weight-reading failure inside from_pretrained, or None (a bug)."""
    text = " ".join(str(e).split())[:400]
    kind = type(e).__name__
    if kind == "SafetensorError" or isinstance(e, (pickle.UnpicklingError, EOFError)) or (
            isinstance(e, RuntimeError) and ("PytorchStreamReader" in text or "zip archive" in text)):
        return ModelLoadError(f"the weights of {name!r} in {source} cannot be read ({kind}: {text}); the files are "
                              "damaged or truncated: re-copy or re-download the model and run the command again.")
    if isinstance(e, RuntimeError) and ("size mismatch" in text or "ignore_mismatched_sizes" in text):
        return ModelLoadError(
            f"the weights in {source} have other shapes than its config.json says (transformers lists the tensors "
            "in its load report above). Use the config.json saved with these weights, or re-save the model with "
            "save_pretrained."
        )
    return None
