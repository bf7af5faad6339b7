"""keep_only: real layer skipping equals a model whose layers were really deleted, for every family."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FAMILIES, family_config
from transformers import AutoModelForCausalLM

from engine.masking import keep_only


def hf_loss(model, ids) -> float:
    with torch.inference_mode():
        return float(model(input_ids=ids, labels=ids, use_cache=False).loss)


def deleted_model(lm, kept: list[int]):
    """A fresh model built from a config with only `kept` layers, kept layers' weights renumbered.

    Independent of keep_only: this is what an exported, reloaded pruned model computes.
    """
    adapter, model = lm.adapter, lm.model
    config = family_config(lm.family, lm.n_layers)
    for k, (_, after) in adapter.config_updates(config, kept, lm.n_layers).items():
        setattr(config, k, after)
    fresh = AutoModelForCausalLM.from_config(config).eval()
    prefix = adapter.layers_path + "."
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith(prefix):
            idx, rest = name[len(prefix):].split(".", 1)
            if int(idx) not in kept:
                continue
            name = f"{prefix}{kept.index(int(idx))}.{rest}"
        state[name] = tensor
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m or "inv_freq" in m for m in missing), (missing, unexpected)
    return fresh


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_only_matches_deleted_model(family, tiny_lm, tiny_windows):
    lm = tiny_lm(family)
    ids = tiny_windows.input_ids
    full = hf_loss(lm.model, ids)
    with keep_only(lm, lm.adapter, [True] * 4):
        assert hf_loss(lm.model, ids) == pytest.approx(full, rel=1e-5)
    losses = []
    for mask in ([False, True, False, True], [True, True, False, True], [False] * 4):
        kept = [i for i, m in enumerate(mask) if m]
        with keep_only(lm, lm.adapter, mask) as model:
            assert len(lm.adapter.layers(model)) == len(kept)
            got = hf_loss(model, ids)
        assert got == pytest.approx(hf_loss(deleted_model(lm, kept), ids), rel=1e-5)
        losses.append(got)
    assert len(set(np.round(losses + [full], 6))) == 4  # masks really change the model


def test_qwen2_layer_types_fixup_matters(tiny_lm, tiny_windows):
    """Dropping layer 0 (full attention) must make position 0 a sliding layer: without the fix-up it would not."""
    lm = tiny_lm("qwen2")
    ids = tiny_windows.input_ids
    layers = lm.adapter.layers(lm.model)
    assert lm.model.config.layer_types[:2] == ["full_attention", "sliding_attention"]
    with keep_only(lm, lm.adapter, [False, True, True, True]):
        assert lm.model.config.layer_types == ["sliding_attention"] * 3
        fixed = hf_loss(lm.model, ids)
    lm.adapter.set_layers(lm.model, torch.nn.ModuleList(list(layers)[1:]))  # swap without the fix-up
    try:
        unfixed = hf_loss(lm.model, ids)
    finally:
        lm.adapter.set_layers(lm.model, layers)
    assert abs(fixed - unfixed) > 1e-4


@pytest.mark.parametrize("family", ["llama", "gpt2", "mamba"])
def test_restored_after_exception(family, tiny_lm, tiny_windows):
    lm = tiny_lm(family)
    layers = lm.adapter.layers(lm.model)
    before = dict(vars(lm.model.config))
    full = hf_loss(lm.model, tiny_windows.input_ids)
    with pytest.raises(RuntimeError, match="boom"):
        with keep_only(lm.model, lm.adapter, [True, False, False, True]):
            assert len(lm.adapter.layers(lm.model)) == 2
            raise RuntimeError("boom")
    assert lm.adapter.layers(lm.model) is layers and len(layers) == 4
    assert dict(vars(lm.model.config)) == before
    assert hf_loss(lm.model, tiny_windows.input_ids) == full


def test_wrong_mask_length(tiny_lm):
    lm = tiny_lm("llama")
    with pytest.raises(ValueError, match="3 entries, the model has 4"):
        with keep_only(lm, lm.adapter, [True, True, True]):
            pass
    assert len(lm.adapter.layers(lm.model)) == 4
