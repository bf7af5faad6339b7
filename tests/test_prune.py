"""Export round-trip: tiny random models of every family, pruned, saved, reloaded in a fresh process."""

import json
import zipfile

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from engine import _verify_export
from engine.errors import ExportError
from engine.masking import keep_only
from engine.models import wrap_model
from engine.export import (
    MANIFEST,
    MODEL_CARD,
    judge,
    prune_model,
    pruned_view,
    verify_exports,
    zip_export,
)

VOCAB = 64
L = 4
REMOVED = (1, 2)  # kept 0, 3 -> layer 3 becomes layer 1
SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a layer of the model is a player in a cooperative game",
    "pruning removes the layers that contribute least to the score",
    "we save the pruned model and load it again in a fresh process",
]

FAMILIES = {
    "llama": dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2),
    # Sliding window on layers >= 2: after pruning, kept layer 3 must stay a sliding layer.
    "qwen2": dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2,
                  use_sliding_window=True, sliding_window=4, max_window_layers=2),
    "qwen3": dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2, head_dim=16),
    "gpt2": dict(n_embd=32, n_head=2, n_positions=64, bos_token_id=1, eos_token_id=1),
    "opt": dict(hidden_size=32, ffn_dim=64, num_attention_heads=2, word_embed_proj_dim=32,
                max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=1),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, max_position_embeddings=64,
                     bos_token_id=1, eos_token_id=1),
    "mamba": dict(hidden_size=32, state_size=4, expand=2, conv_kernel=4, pad_token_id=0, bos_token_id=1, eos_token_id=1),
}  # fmt: skip


def tiny_tokenizer():
    """WordLevel tokenizer trained on a few sentences; saves and reloads offline."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["<pad>", "<eos>", "<unk>"]))
    assert tok.get_vocab_size() <= VOCAB
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


def tiny_lm(model_type):
    torch.manual_seed(0)
    layers = {"gpt2": {"n_layer": L}}.get(model_type, {"num_hidden_layers": L})
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, **layers, **FAMILIES[model_type])
    model = AutoModelForCausalLM.from_config(config).float()
    return wrap_model(model, tiny_tokenizer())


def windows():
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, VOCAB, (3, 16), generator=g)  # (n, T)


def masked_ppl(lm, removed, ids):
    mask = [i not in removed for i in range(L)]
    with keep_only(lm, lm.adapter, mask) as model:
        return _verify_export.perplexity(model, ids)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Every family exported without verification, then ALL reloaded in one fresh process."""
    ids = windows()
    out = {}
    for family in FAMILIES:
        lm = tiny_lm(family)
        with pruned_view(lm.model, lm.adapter, [0, 3]):
            ppl_pruned = _verify_export.perplexity(lm.model, ids)
        res = prune_model(lm, REMOVED, tmp_path_factory.mktemp(family) / "export", verify=False)
        out[family] = dict(lm=lm, result=res, ppl_pruned=ppl_pruned, ppl_masked=masked_ppl(lm, REMOVED, ids))
    raws = verify_exports([(v["result"].out_dir, ids) for v in out.values()])
    for v, raw in zip(out.values(), raws):
        v["raw"] = raw
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_reloads_with_same_perplexity_and_working_kv_cache(exports, family):
    e = exports[family]
    raw = e["raw"]
    assert "error" not in raw, raw.get("traceback")
    # The in-memory pruned model is the masked model of the search, and the reload matches both.
    assert e["ppl_pruned"] == pytest.approx(e["ppl_masked"], rel=1e-5)
    v = judge(raw, e["ppl_pruned"], n_kept=2, expected_ppl=e["ppl_masked"])
    assert v.ok, v.problems
    assert raw["ppl"] == pytest.approx(e["ppl_masked"], rel=1e-4)
    assert raw["generated_tokens"] == 4 and raw["kv_max_rel_diff"] < 1e-4
    assert raw["n_layers_config"] == 2 and raw["layer_indices"] == [0, 1]
    assert raw["tokenizer_ok"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_config_fields_and_original_model_restored(exports, family):
    e = exports[family]
    lm, res = e["lm"], e["result"]
    cfg = json.loads((res.out_dir / "config.json").read_text())
    count_field = "n_layer" if family == "gpt2" else "num_hidden_layers"
    assert cfg[count_field] == 2
    assert res.config_changes[count_field] == {"before": L, "after": 2}
    assert (res.kept, res.removed) == ((0, 3), REMOVED)
    assert not res.manifest["unhandled_per_layer_fields"]
    if family == "qwen2":
        assert cfg["layer_types"] == ["full_attention", "sliding_attention"]
        assert cfg["max_window_layers"] == 1
    elif "layer_types" in cfg:
        assert len(cfg["layer_types"]) == 2
    # The caller's model is untouched: all layers back, original indices, original config.
    assert len(lm.adapter.layers(lm.model)) == L
    assert lm.model.config.num_hidden_layers == L
    assert _verify_export.layer_indices(lm.model) == list(range(L))
    assert any(f.endswith(".safetensors") for f in res.files)
    assert {"config.json", "tokenizer.json", MANIFEST, MODEL_CARD} <= set(res.files)


def test_prune_model_verifies_and_writes_manifest_and_card(tmp_path):
    lm = tiny_lm("llama")
    ids = windows()
    expected = masked_ppl(lm, (2,), ids)
    extra = {"estimator": "exact Shapley (surrogate)", "method": "rank-and-cut", "contributions": [0.5, 0.2, 0.01, 0.3],
             "data_hash": "abc123", "seeds": {"sampling": 0}, "perplexities": {"calibration": {"before": 9.0, "after": 9.5}}}  # fmt: skip
    res = prune_model(lm, [2], tmp_path / "out", manifest_extra=extra, verify_windows=ids, expected_ppl=expected)
    assert res.verification.ok and res.verification.expected_rel_diff < 1e-4
    m = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert m["kept_layers"] == [0, 1, 3] and m["removed_layers"] == [2] and m["mask"] == "1101"
    assert m["n_layers_original"] == 4 and m["n_layers"] == 3
    assert m["verification"]["ok"] and m["verification"]["ppl_reloaded"] == pytest.approx(expected, rel=1e-4)
    assert m["data_hash"] == "abc123" and m["contributions"] == extra["contributions"]
    assert set(m["versions"]) >= {"torch", "transformers", "engine"}
    assert sorted(m["files"]) == m["files"] and MANIFEST in m["files"]
    card = (tmp_path / "out" / MODEL_CARD).read_text()
    assert card.startswith("---\n") and "- layer-pruning" in card and "- pruned" in card
    assert "base_model" not in card  # an in-memory model has no hub id
    assert "| 2 | 0.01 | yes |" in card and "| calibration | 9 | 9.5 |" in card
    assert "AutoModelForCausalLM.from_pretrained" in card

    with pytest.raises(ValueError, match="may not set"):
        prune_model(lm, [2], tmp_path / "other", manifest_extra={"removed_layers": [0]}, verify=False)


def test_folder_policy(tmp_path):
    lm = tiny_lm("gpt2")
    out = tmp_path / "out"
    prune_model(lm, [0], out, verify=False)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        prune_model(lm, [1], out, verify=False)
    res = prune_model(lm, [1, 2], out, overwrite=True, verify=False)
    assert res.removed == (1, 2) and (out / "notes.txt").read_text() == "mine"
    assert "notes.txt" not in res.files
    assert json.loads((out / "config.json").read_text())["n_layer"] == 2

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.bin").write_bytes(b"x")
    with pytest.raises(ExportError, match="not a previous export"):
        prune_model(lm, [1], foreign, overwrite=True, verify=False)
    assert (foreign / "data.bin").exists()

    for bad, msg in [([4], "do not exist"), ([1, 1], "duplicates"), ([0, 1, 2, 3], "at least one")]:
        with pytest.raises(ExportError, match=msg):
            prune_model(lm, bad, tmp_path / "bad", verify=False)
    with pytest.raises(ExportError, match="verify_windows"):
        prune_model(lm, [1], tmp_path / "bad", verify=True)

    z = zip_export(out)
    with zipfile.ZipFile(z) as zf:
        names = set(zf.namelist())
    assert {f"out/{MANIFEST}", "out/config.json", "out/model.safetensors"} <= names


def test_judge_reports_every_failed_check_with_numbers():
    raw = {"ppl": 11.0, "kv_max_rel_diff": 0.5, "generated_tokens": 4, "layer_indices": [0, 2],
           "n_layers_config": 3, "tokenizer_ok": True, "tokenizer_error": None, "seconds": 1.0}  # fmt: skip
    v = judge(raw, ppl_in_memory=10.0, n_kept=2, expected_ppl=10.0)
    assert not v.ok
    text = " ".join(v.problems)
    for needle in ["11", "10", "KV cache", "3 layers", "[0, 2]", "masked perplexity"]:
        assert needle in text
    assert not judge({"error": "OSError: no config"}, 10.0, 2).ok
