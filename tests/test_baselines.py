"""Baselines on tiny trained models with one layer made an exact identity."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from engine import baselines as B
from engine.data import Windows
from engine.errors import WorkbenchError
from engine.evaluate import MaskEvaluator
from engine.models import wrap_model
from tests.conftest import FAMILIES

VOCAB, SEQ, N_LAYERS, IDENT = 48, 16, 4, 2


class _CountingEvaluator(MaskEvaluator):
    """The real evaluator, counting batched calls."""

    calls = 0

    def perplexities(self, masks):
        self.calls += 1
        return super().perplexities(masks)


def _bigram_batch(gen, perm, n):
    """Sequences that follow a fixed random successor table: learnable by every layer."""
    start = torch.randint(0, VOCAB, (n,), generator=gen)
    seq = [start]
    for _ in range(SEQ - 1):
        seq.append(perm[seq[-1]])
    return torch.stack(seq, dim=1)  # (n, T)


def _config(family):
    if family == "llama":
        return AutoConfig.for_model(
            "llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        )
    return AutoConfig.for_model(
        "gpt2", vocab_size=VOCAB, n_embd=32, n_layer=N_LAYERS, n_head=4, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )


def _make_identity(model, family):
    """Zero the sub-blocks that write into the residual stream: the layer returns its input."""
    if family == "llama":
        layer = model.model.layers[IDENT]
        parts = [layer.self_attn.o_proj, layer.mlp.down_proj]
    else:
        layer = model.transformer.h[IDENT]
        parts = [layer.attn.c_proj, layer.mlp.c_proj]
    with torch.no_grad():
        for part in parts:
            for p in part.parameters():
                p.zero_()
    return layer


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def setup(request):
    """A 4-layer model trained to near convergence on a bigram task, layer IDENT an exact identity.

    Near a loss minimum, removing any trained layer raises calibration perplexity (by >= 4% here),
    so the identity layer (removal changes nothing) is unambiguously the least important.
    """
    family = request.param
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(family))
    ident = _make_identity(model, family)
    frozen = {id(p) for p in ident.parameters()}
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(VOCAB, generator=gen)
    opt = torch.optim.Adam([p for p in model.parameters() if id(p) not in frozen], lr=2e-2)
    model.train()
    for _ in range(40):
        ids = _bigram_batch(gen, perm, 8)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    lm = wrap_model(model, identity=f"trained:{family}")
    ids = _bigram_batch(gen, perm, 4)
    windows = Windows(input_ids=ids, data_hash="bigram", source="bigram", n_tokens=ids.numel())
    return lm, windows, _CountingEvaluator(lm, windows)


def _is_permutation(order):
    return sorted(order) == list(range(N_LAYERS)) and len(order) == N_LAYERS


def test_identity_layer_has_zero_block_influence(setup):
    lm, windows, _ = setup
    result = B.block_influence(lm, windows)
    assert abs(result.scores[IDENT]) < 1e-6
    assert np.delete(result.scores, IDENT).min() > 1e-4
    assert result.order[0] == IDENT and _is_permutation(result.order)
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in lm.adapter.layers(lm.model))


def test_block_influence_matches_hidden_states_for_inner_layers(setup):
    # HF hidden_states[l] is the input of layer l for l < L (the last one has the final norm).
    lm, windows, _ = setup
    with torch.no_grad():
        hs = lm.model(input_ids=windows.input_ids, output_hidden_states=True, use_cache=False).hidden_states
    expected = [1 - torch.cosine_similarity(hs[l], hs[l + 1], dim=-1).mean().item() for l in range(N_LAYERS - 1)]
    result = B.block_influence(lm, windows, batch_size=3)  # uneven batches: 3 + 1 windows
    np.testing.assert_allclose(result.scores[: N_LAYERS - 1], expected, atol=1e-5)


def test_sleb_removes_identity_first(setup):
    lm, windows, ev = setup
    result = B.sleb(lm, windows, k_max=2, evaluator=ev)
    assert result.order[0] == IDENT and _is_permutation(result.order)
    assert result.details["ppl_after"][0] == pytest.approx(ev.ppl_full, rel=1e-5)
    assert result.details["ppl_after"][1] > result.details["ppl_after"][0]
    assert result.removed(2) == tuple(sorted(result.order[:2]))
    assert result.scores[result.order[0]] < result.scores[result.order[-1]]


def test_sleb_full_run_uses_one_call_per_round(setup):
    lm, windows, ev = setup
    before = ev.calls
    result = B.sleb(lm, windows, evaluator=ev)
    assert ev.calls - before == N_LAYERS - 1
    assert _is_permutation(result.order) and len(result.details["ppl_after"]) == N_LAYERS - 1
    with pytest.raises(WorkbenchError):
        B.sleb(lm, windows, k_max=N_LAYERS, evaluator=ev)


def test_sleb_progress_counts_masks_per_round(setup):
    lm, windows, ev = setup
    seen = []
    result = B.run_baseline("sleb", lm, windows, evaluator=ev, k_max=2,
                            progress=lambda done, total, words: seen.append((done, total, words)))
    total = N_LAYERS + (N_LAYERS - 1)  # round r evaluates the L - r kept layers
    assert [(d, t) for d, t, _ in seen] == [(0, total), (N_LAYERS, total), (total, total)]
    assert seen[0][2].startswith("round 1/2") and result.order[0] == IDENT
    B.run_baseline("ppl", lm, windows, evaluator=ev, progress=lambda *a: seen.append(a))  # not offered: ignored
    assert len(seen) == 3


def test_ppl_criterion_identity_least_important(setup):
    lm, windows, ev = setup
    result = B.ppl(lm, windows, evaluator=ev)
    assert abs(result.scores[IDENT]) < 1e-4 * ev.ppl_full
    assert np.delete(result.scores, IDENT).min() > 1e-2 * ev.ppl_full
    assert result.order[0] == IDENT and _is_permutation(result.order)


def test_taylor_leaves_model_untouched(setup):
    lm, windows, _ = setup
    model = lm.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = lm.adapter.layers(model)[0].parameters().__next__()
    frozen.requires_grad_(False)
    model.train()
    try:
        result = B.taylor(lm, windows, batch_size=2)
        assert model.training
        assert not frozen.requires_grad
    finally:
        frozen.requires_grad_(True)
        model.eval()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert result.scores[IDENT] == 0.0  # zero weights, or weights whose gradient is zero
    assert np.delete(result.scores, IDENT).min() > 0
    assert _is_permutation(result.order)


def test_taylor_batches_agree_and_plus_heuristic(setup):
    lm, windows, _ = setup
    one = B.taylor(lm, windows, plus=False)
    two = B.taylor(lm, windows, plus=True, batch_size=1)
    np.testing.assert_allclose(one.scores, two.scores, rtol=1e-4)
    assert one.order == B._order_from_scores(one.scores)
    protected = B.taylor_plus_protected(N_LAYERS)
    assert protected == (0,)  # 4 layers: first round(4*4/32)=1, last round(4*2/32)=0
    assert set(two.order[-len(protected):]) == set(protected)
    assert B.taylor_plus_protected(32) == (0, 1, 2, 3, 30, 31)


def test_angular_removes_a_block_whose_k1_is_the_per_layer_minimum(setup):
    lm, windows, _ = setup
    result = B.angular(lm, windows)
    assert result.removed(1) == (int(np.argmin(result.scores)),) == (IDENT,)
    assert result.scores[IDENT] < 1e-3  # arccos is steep at 1: float32 cos gives ~1e-4
    for k in range(1, N_LAYERS):
        block = result.removed(k)
        assert len(block) == k and block == tuple(range(block[0], block[0] + k))
        row = result.details["distances"][k - 1]
        assert len(row) == N_LAYERS - k + 1 and row[block[0]] == min(row)
    np.testing.assert_allclose(result.details["distances"][0], result.scores)
    last_token = B.angular(lm, windows, tokens="last")
    assert last_token.details["n_tokens"] == windows.input_ids.shape[0]


def test_random_is_seeded_and_last_is_top_down(setup):
    lm, windows, _ = setup
    orders = [B.random_order(lm, windows, seed=s).order for s in range(6)]
    assert B.random_order(lm, windows, seed=3).order == orders[3]
    assert len(set(orders)) > 1 and all(_is_permutation(o) for o in orders)
    result = B.last(lm, windows)
    assert result.order == tuple(range(N_LAYERS - 1, -1, -1))
    assert result.removed(2) == (N_LAYERS - 2, N_LAYERS - 1)
    assert int(np.argmin(result.scores)) == N_LAYERS - 1


def test_run_baseline_runs_every_registered_name(setup):
    lm, windows, ev = setup
    assert list(B.BASELINES) == ["block-influence", "angular", "ppl", "taylor", "sleb", "random", "last"]
    for name in B.BASELINES:
        result = B.run_baseline(name, lm, windows, evaluator=ev, k_max=2, seed=1)
        assert result.method == name and _is_permutation(result.order)
        assert result.scores.shape == (N_LAYERS,)
        json.dumps(result.to_json())
    assert B.run_baseline("random", lm, windows, seed=1).order == B.random_order(lm, windows, seed=1).order


def test_default_evaluator_is_built_when_none_given(setup):
    lm, windows, ev = setup
    result = B.run_baseline("ppl", lm, windows)
    np.testing.assert_allclose(result.scores, B.ppl(lm, windows, evaluator=ev).scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_stream_baselines_on_every_family(tiny_lm, tiny_windows, family):
    lm = tiny_lm(family, n_layers=3)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    for result in (B.block_influence(lm, tiny_windows), B.angular(lm, tiny_windows), B.taylor(lm, tiny_windows)):
        assert sorted(result.order) == [0, 1, 2] and np.isfinite(result.scores).all()
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in lm.model.parameters())


def test_unknown_baseline_lists_names(setup):
    lm, windows, _ = setup
    with pytest.raises(WorkbenchError, match="block-influence, angular, ppl, taylor, sleb, random, last"):
        B.run_baseline("shortgpt", lm, windows)
