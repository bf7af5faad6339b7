"""Run a model with only some of its decoder layers (real skipping, nothing copied or zeroed).

`keep_only(lm_or_model, adapter, mask)` swaps the decoder `ModuleList` for a `ModuleList` of the
kept layers (the same module objects) and applies the family's config fix-ups (layer counts,
per-layer lists such as Qwen2's `layer_types`), restoring both in `finally`.

Inside, run the model with `use_cache=False`: transformers 5 sizes its caches from the config
and each kept layer keeps its original `layer_idx`, so a cache would be indexed past its end. Checked per
family (transformers 5.23): Llama/Mistral/Gemma/Phi-3 loop over `layers[:num_hidden_layers]`;
Qwen2/Qwen3 read `config.layer_types[position]` (fixed up); GPT-2 and OPT enumerate their
lists but use the index for nothing else; GPT-NeoX has no per-position state; Mamba's
`layer_types` is derived from `num_hidden_layers` and its `cache_params` is unused without
cache. Per-layer attributes fixed at construction (GPT-2's `scale_attn_by_inverse_layer_idx`
uses the layer's own `layer_idx`) stay with their layer, as they would in a deleted model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
from torch import nn

from engine import _verify_export
from engine.models import Adapter, LoadedModel


def kept_indices(mask, n_layers: int) -> list[int]:
    """Indices of True entries of a bool mask of length n_layers (ValueError on a wrong length)."""
    m = np.asarray(mask, dtype=bool).reshape(-1)
    if m.shape[0] != n_layers:
        raise ValueError(f"mask has {m.shape[0]} entries, the model has {n_layers} layers")
    return [int(i) for i in np.flatnonzero(m)]


# Per-layer index attributes set at construction (Llama/Qwen `self_attn.layer_idx`, GPT-2 `attn`,
# NeoX `attention`, OPT `self_attn`, Mamba block and `mixer`): renumbered for export. Defined in
# the standalone reload-check script, which checks them in a process without the engine.
LAYER_INDEX_ATTRS = _verify_export.LAYER_INDEX_ATTRS


@contextlib.contextmanager
def swapped_layers(model: nn.Module, adapter: Adapter, layers: nn.ModuleList, config_updates: dict,
                   renumber: Sequence[int] | None = None) -> Iterator[int]:
    """Temporarily install `layers` as the decoder list and set `config_updates` ({field: (before,
    after)}); with `renumber` (the original index of each installed layer) the layers' index
    attributes become 0..k-1. Yields the number of renumbered attributes; always restored."""
    original = adapter.layers(model)
    config = model.config
    saved = {k: vars(config)[k] for k in config_updates}
    touched: list[tuple[nn.Module, str, int]] = []
    adapter.set_layers(model, layers)
    try:
        for k, (_, after) in config_updates.items():
            setattr(config, k, after)
        for j, i in enumerate(renumber or ()):
            for mod in layers[j].modules():
                for attr in LAYER_INDEX_ATTRS:
                    v = mod.__dict__.get(attr)
                    if isinstance(v, int) and not isinstance(v, bool):
                        touched.append((mod, attr, v))
                        setattr(mod, attr, v - i + j)  # keeps any offset (1-based numbering)
        yield len(touched)
    finally:
        for mod, attr, v in touched:
            setattr(mod, attr, v)
        for k, v in saved.items():
            setattr(config, k, v)
        adapter.set_layers(model, original)


@contextlib.contextmanager
def keep_only(lm_or_model: LoadedModel | nn.Module, adapter: Adapter, mask, renumber: bool = False
              ) -> Iterator[nn.Module]:
    """Inside the block the model runs only the layers where `mask` is True; yields the model.

    `renumber=True` also renumbers the kept layers' index attributes: the model is then exactly
    the pruned model an export saves (engine.export uses this; evaluation does not need it)."""
    model = lm_or_model.model if isinstance(lm_or_model, LoadedModel) else lm_or_model
    layers = adapter.layers(model)
    kept = kept_indices(mask, len(layers))
    sub = nn.ModuleList([layers[i] for i in kept])
    updates = adapter.config_updates(model.config, kept, len(layers))
    with swapped_layers(model, adapter, sub, updates, renumber=kept if renumber else None):
        yield model
