"""Adapters, load_model from folders, and every load failure a user can cause."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from conftest import FAMILIES, byte_tokenizer

from engine import config as cfg
from engine.config import ModelSpec
from engine.errors import ModelLoadError, UnsupportedArchitecture
from engine.models import adapter_for, load_model


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_per_family(family, tiny_lm):
    lm = tiny_lm(family, n_layers=3)
    assert adapter_for(lm.model).family == lm.family == family
    assert lm.n_layers == 3 == len(lm.adapter.layers(lm.model))
    assert not lm.model.training
    updates = lm.adapter.config_updates(lm.model.config, [0, 2], 3)
    assert (3, 2) in updates.values()  # some layer count goes from 3 to 2


def test_unsupported_architecture_names_class_type_and_paths():
    from transformers import BertConfig, BertForMaskedLM

    bert = BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32))
    with pytest.raises(UnsupportedArchitecture) as e:
        adapter_for(bert)
    msg = str(e.value)
    for part in ("BertForMaskedLM", "'bert'", "model.layers", "transformer.h", "ADAPTERS"):
        assert part in msg
    with pytest.raises(UnsupportedArchitecture, match="Sequential"):
        adapter_for(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_llama_base_model_without_head_is_unsupported(tiny_lm):
    lm = tiny_lm("llama")
    with pytest.raises(UnsupportedArchitecture, match="LlamaModel"):
        adapter_for(lm.model.model)  # the base model has .layers, not .model.layers


@pytest.fixture
def saved_llama(tmp_path, tiny_lm):
    lm = tiny_lm("llama", n_layers=2)
    folder = tmp_path / "tiny-llama"
    lm.model.save_pretrained(folder)
    tok = byte_tokenizer()
    tok.save_pretrained(folder)
    return folder


def test_load_local_folder(saved_llama, tmp_path):
    lm = load_model(ModelSpec(name=str(saved_llama)))
    assert lm.family == "llama" and lm.n_layers == 2 and not lm.model.training
    assert lm.identity.startswith("local:") and lm.tokenizer.pad_token == lm.tokenizer.eos_token
    assert lm.n_params == sum(p.numel() for p in lm.model.parameters()) and lm.device.type == "cpu"
    copy = shutil.copytree(saved_llama, tmp_path / "copy")
    assert load_model(ModelSpec(name=str(copy))).identity == lm.identity  # content, not path or mtime
    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (copy / "config.json").write_text(json.dumps(config))
    assert load_model(ModelSpec(name=str(copy))).identity != lm.identity
    bf16 = load_model(ModelSpec(name=str(saved_llama), dtype="bfloat16"))
    assert next(bf16.model.parameters()).dtype == torch.bfloat16


def test_offline_hub_id_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError, match="could not reach the Hugging Face hub for 'someone/no-such-model'"):
        load_model(ModelSpec(name="someone/no-such-model"))
    assert time.perf_counter() - t0 < 10


def test_unreachable_hub_without_offline_env_fails_fast(monkeypatch):
    import engine.models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(engine.models, "hub_reachable", lambda: False)
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError, match="pass a local folder or --model demo"):
        load_model(ModelSpec(name="gpt2", revision="v1"))
    assert time.perf_counter() - t0 < 10


@pytest.mark.parametrize("name", ["./no/such/folder", "/nonexistent/model", "a/b/c"])
def test_missing_local_folder(name):
    with pytest.raises(ModelLoadError, match="no such folder"):
        load_model(ModelSpec(name=name))


def test_remote_code_refused(tmp_path):
    config = {"model_type": "my_custom_arch", "auto_map": {"AutoConfig": "configuration_x.XConfig",
                                                            "AutoModelForCausalLM": "modeling_x.XModel"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="--trust-remote-code"):
        load_model(ModelSpec(name=str(tmp_path)))


def test_demo_missing_is_clear(tmp_path, monkeypatch):
    monkeypatch.setattr(cfg, "DEMO_MODEL_DIR", tmp_path / "demo-lm")
    with pytest.raises(ModelLoadError, match="demo model is not built yet"):
        load_model(ModelSpec(name="demo"))


def test_bad_dtype_and_device(saved_llama):
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model(ModelSpec(name=str(saved_llama), dtype="float8"))
    with pytest.raises(ModelLoadError, match="unknown device"):
        load_model(ModelSpec(name=str(saved_llama), device="tpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            load_model(ModelSpec(name=str(saved_llama), device="cuda:0"))


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(ModelSpec(name=str(tmp_path)))
