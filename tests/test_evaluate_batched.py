"""MaskEvaluator beyond one plain device: batched sibling calls (batch_masks), layers split over
devices (layer_devices / accelerate device maps), and half-precision evaluation with a float32 loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoConfig

from engine.device_memory import max_batch_states, state_bytes
from engine.evaluate import MaskEvaluator, count_prefix_computations


def masks_for(n_layers: int, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = rng.random((n, n_layers)) < 0.6
    m[0], m[1], m[3] = True, False, m[2]  # full, empty, a duplicate
    return m


def group_counts(masks: np.ndarray, step: int) -> int:
    """Trie nodes of the batched walk: distinct sequences in trie order, counted per group of `step`."""
    seqs = sorted({tuple(np.flatnonzero(m)) for m in masks})
    rows = [np.isin(np.arange(masks.shape[1]), s) for s in seqs]
    return sum(count_prefix_computations(np.array(rows[g:g + step])) for g in range(0, len(rows), step))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "opt", "mamba"])
def test_batched_siblings_equal_depth_first(family, tiny_lm, tiny_windows):
    lm = tiny_lm(family, n_layers=6)
    masks = masks_for(6, 40)
    want = MaskEvaluator(lm, tiny_windows).perplexities(masks)
    for step in (3, None):
        ev = MaskEvaluator(lm, tiny_windows, batch_masks=True, batch_states=step)
        seen = list(ev.iter_perplexities(masks))
        assert sorted(i for i, _, _ in seen) == list(range(40))
        got = np.empty(40)
        got[[i for i, _, _ in seen]] = [p for _, p, _ in seen]
        np.testing.assert_allclose(got, want, rtol=1e-5)
        assert ev.layer_calls == group_counts(masks, ev.batch_states)
        assert ev.batched_calls < ev.layer_calls  # siblings really shared calls


def test_batched_with_window_chunks(tiny_lm, tiny_windows):
    lm = tiny_lm("llama", n_layers=5)
    masks = masks_for(5, 20, seed=4)
    want = MaskEvaluator(lm, tiny_windows).perplexities(masks)
    ev = MaskEvaluator(lm, tiny_windows, batch_size=2, batch_masks=True, batch_states=4)
    np.testing.assert_allclose(ev.perplexities(masks), want, rtol=1e-5)


def test_memory_bound_from_model_shape():
    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_attention_heads=4)
    per = state_bytes(config, n_windows=2, seq_len=16, dtype=torch.float32)
    assert per == 2 * 16 * (5 * 64 + 3 * 128) * 4 + 2 * 4 * 16 * 16 * 4
    assert max_batch_states(config, 2, 16, torch.float32, free_bytes=10 * per) == 5  # half of free memory
    assert max_batch_states(config, 2, 16, torch.float32, free_bytes=per) == 1  # never below one
    assert max_batch_states(config, 2, 16, torch.float32, free_bytes=10**15) == 64  # capped
    half = state_bytes(config, 2, 16, torch.bfloat16)
    assert half < per  # 2-byte activations


def test_default_bound_uses_free_memory(tiny_lm, tiny_windows):
    ev = MaskEvaluator(tiny_lm("llama"), tiny_windows, batch_masks=True)
    assert 1 <= ev.batch_states <= 64


@pytest.mark.parametrize("batched", [False, True])
def test_layers_split_over_devices_move_states_at_boundaries(batched, tiny_lm, tiny_windows):
    """Layers 0-2 on one device, 3-5 on another (two CPU device names, so it runs anywhere)."""
    lm = tiny_lm("llama", n_layers=6)
    a, b = torch.device("cpu"), torch.device("cpu:1")
    split = [a, a, a, b, b, b]
    masks = masks_for(6, 30, seed=2)
    want = MaskEvaluator(lm, tiny_windows).perplexities(masks)
    ev = MaskEvaluator(lm, tiny_windows, layer_devices=split, batch_masks=batched, batch_states=4 if batched else None)
    np.testing.assert_allclose(ev.perplexities(masks), want, rtol=1e-5)
    # One move per computed trie node whose layer is on b and whose parent state is on a (root: a).
    seqs = sorted({tuple(np.flatnonzero(m)) for m in masks})
    groups = [seqs[g:g + 4] for g in range(0, len(seqs), 4)] if batched else [seqs]
    expected = []
    for group in groups:
        nodes = sorted({s[: t + 1] for s in group for t in range(len(s))})
        expected += [(s[-1], "cpu", "cpu:1") for s in nodes
                     if split[s[-1]] == b and (len(s) == 1 or split[s[-2]] == a)]
    assert sorted(ev.moves) == sorted(expected) and expected
    assert all(j >= 3 for j, _, _ in ev.moves)  # only at the boundary into the second device


def test_layer_devices_are_read_from_accelerate_hooks(tiny_lm, tiny_windows):
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    lm = tiny_lm("llama", n_layers=4)
    for j, layer in enumerate(lm.adapter.layers(lm.model)):
        add_hook_to_module(layer, AlignDevicesHook(execution_device="cpu" if j < 2 else "cpu:1"))
    ev = MaskEvaluator(lm, tiny_windows)
    assert [str(d) for d in ev._layer_devices] == ["cpu", "cpu", "cpu:1", "cpu:1"]
    masks = np.array([[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 1]], dtype=bool)
    ev.perplexities(masks)
    assert sorted(ev.moves) == [(2, "cpu", "cpu:1"), (2, "cpu", "cpu:1"), (3, "cpu", "cpu:1")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_with_float32_loss(dtype, tiny_lm, tiny_windows):
    masks = masks_for(4, 12, seed=3)
    full = MaskEvaluator(tiny_lm("llama"), tiny_windows).perplexities(masks)
    lm = tiny_lm("llama")
    lm.model.to(dtype)
    ev = MaskEvaluator(lm, tiny_windows)
    assert ev._head32 is not None and ev._head32[0].dtype == torch.float32
    half = ev.perplexities(masks)
    np.testing.assert_allclose(half, full, rtol=3e-2)
    batched = MaskEvaluator(lm, tiny_windows, batch_masks=True, batch_states=3).perplexities(masks)
    np.testing.assert_allclose(batched, half, rtol=2e-2)
    indep = MaskEvaluator(lm, tiny_windows, prefix_sharing=False).perplexities(masks)
    np.testing.assert_allclose(indep, half, rtol=1e-2)
