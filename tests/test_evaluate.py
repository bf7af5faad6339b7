"""MaskEvaluator: perplexity definition, prefix sharing == independent evaluation, NaN handling."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from conftest import FAMILIES

from engine.evaluate import MaskEvaluator, count_prefix_computations, scores


def random_masks(n_layers: int, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    masks = rng.random((n, n_layers)) < 0.6
    masks[0], masks[1] = True, False  # all-ones and all-zeros
    masks[2] = masks[3]  # a duplicate
    return masks


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_sharing_equals_independent(family, tiny_lm, tiny_windows):
    lm = tiny_lm(family)
    ids = tiny_windows.input_ids
    with torch.inference_mode():
        hf = math.exp(float(lm.model(input_ids=ids, labels=ids, use_cache=False).loss))
    masks = random_masks(4, 20)
    shared = MaskEvaluator(lm, tiny_windows)
    assert shared.ppl_full == pytest.approx(hf, rel=1e-5)
    got = shared.perplexities(masks)
    assert shared.layer_calls == count_prefix_computations(masks) < int(masks.sum())
    indep = MaskEvaluator(lm, tiny_windows, prefix_sharing=False)
    want = indep.perplexities(masks)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got[0] == pytest.approx(hf, rel=1e-5)
    assert np.all(np.isfinite(got)) and np.unique(np.round(got, 4)).size >= 10


def test_batch_size_and_loss_chunks_do_not_change_results(tiny_lm, tiny_windows):
    lm = tiny_lm("llama")
    masks = random_masks(4, 8, seed=1)
    ref = MaskEvaluator(lm, tiny_windows).perplexities(masks)
    small = MaskEvaluator(lm, tiny_windows, batch_size=2, loss_chunk_elems=260 * 7)
    np.testing.assert_allclose(small.perplexities(masks), ref, rtol=1e-5)
    np.testing.assert_allclose(MaskEvaluator(lm, tiny_windows, batch_size=1).ppl_full, ref[0], rtol=1e-5)


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_layers_give_the_same_perplexities(tiny_lm, tiny_windows):
    lm = tiny_lm("llama")
    masks = random_masks(4, 6, seed=2)
    eager = MaskEvaluator(lm, tiny_windows).perplexities(masks)
    compiled = MaskEvaluator(lm, tiny_windows, compile=True)
    np.testing.assert_allclose(compiled.perplexities(masks), eager, rtol=1e-4)
    assert compiled.layer_calls == count_prefix_computations(masks)


def test_iter_yields_every_index_once(tiny_lm, tiny_windows):
    lm = tiny_lm("gpt2")
    masks = random_masks(4, 12, seed=2)
    ev = MaskEvaluator(lm, tiny_windows)
    seen = list(ev.iter_perplexities(masks))
    assert sorted(i for i, _, _ in seen) == list(range(12))
    assert all(sec >= 0 for _, _, sec in seen)
    by_index = {i: p for i, p, _ in seen}
    np.testing.assert_allclose([by_index[i] for i in range(12)], ev.perplexities(masks), rtol=1e-6)
    assert by_index[2] == by_index[3]


def test_count_prefix_computations():
    masks = np.array([[1, 1, 1], [1, 1, 0], [0, 1, 1], [0, 1, 1], [0, 0, 0]], dtype=bool)
    # distinct non-empty prefixes: (0) (0,1) (0,1,2) (1) (1,2)
    assert count_prefix_computations(masks) == 5
    all_masks = np.array([[(k >> i) & 1 for i in range(4)] for k in range(16)], dtype=bool)
    assert count_prefix_computations(all_masks) == 15  # every non-empty subset is one trie node


def test_scores_keep_order_and_flag_nonfinite():
    score, flag = scores([10.0, np.nan, 20.0, np.inf, 5.0], ppl_full=5.0)
    np.testing.assert_allclose(score, [0.5, 0.0, 0.25, 0.0, 1.0])
    assert flag.tolist() == [False, True, False, True, False]


@pytest.mark.parametrize("sharing", [True, False])
def test_nan_layer_gives_flag_in_place(sharing, tiny_lm, tiny_windows):
    lm = tiny_lm("llama")
    ev = MaskEvaluator(lm, tiny_windows, prefix_sharing=sharing)
    layer = lm.adapter.layers(lm.model)[2]
    handle = layer.register_forward_hook(lambda mod, args, out: out * float("nan"))
    try:
        masks = np.array([[1, 1, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 1, 0]], dtype=bool)
        ppl = ev.perplexities(masks)
    finally:
        handle.remove()
    score, flag = scores(ppl, ev.ppl_full)
    assert flag.tolist() == [False, True, False, True]
    assert score[1] == 0 and score[3] == 0 and np.all(score[[0, 2]] > 0)


def test_bad_mask_shape(tiny_lm, tiny_windows):
    ev = MaskEvaluator(tiny_lm("llama"), tiny_windows)
    with pytest.raises(ValueError, match=r"shape \(n, 4\)"):
        ev.perplexities(np.ones((2, 3), dtype=bool))
