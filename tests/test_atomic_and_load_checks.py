"""engine/atomic.py (whole files or none, up-front path checks) and engine/load_checks.py (the weights
are the model the config describes) on their own; the CLI cases are in tests/faults/test_outside.py."""

import errno
import json
import os
import subprocess
import sys

import pytest

from conftest import byte_tokenizer, family_config
from engine.atomic import check_output_file, open_atomic, sweep_dead_temps, write_atomic
from engine.errors import DiskFull, InputError, ModelLoadError


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_write_atomic_replaces_whole_and_leaves_nothing_beside(tmp_path):
    target = tmp_path / "r.html"
    write_atomic(target, "old")
    write_atomic(target, b"new bytes")
    assert target.read_bytes() == b"new bytes" and [p.name for p in tmp_path.iterdir()] == ["r.html"]


def test_a_failed_write_keeps_the_previous_file_and_names_the_path(tmp_path, monkeypatch):
    target = tmp_path / "pairs.csv"
    write_atomic(target, "i,j\n0,1\n")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DiskFull) as e:
        with open_atomic(target, "w") as fh:
            fh.write("i,j\n" * 1000)
    assert str(target) in str(e.value) and e.value.exit_code == 5
    assert target.read_text() == "i,j\n0,1\n" and [p.name for p in tmp_path.iterdir()] == ["pairs.csv"]


def test_an_exception_in_the_writer_discards_the_temporary_file(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with open_atomic(tmp_path / "x.txt") as fh:
            fh.write("half")
            1 / 0
    assert list(tmp_path.iterdir()) == []


def test_sweep_removes_only_dead_writers_temporaries(tmp_path):
    target = tmp_path / "report.html"
    dead = tmp_path / f".report.html.tmp-{_dead_pid()}-0123abcd"
    live = tmp_path / f".report.html.tmp-{os.getpid()}-89abcdef"
    other = tmp_path / f".other.html.tmp-{_dead_pid()}-0123abcd"
    odd = tmp_path / ".report.html.tmp-notapid-0123abcd"
    for p in (dead, live, other, odd):
        p.write_text("x")
    assert sweep_dead_temps(target) == [dead]
    assert not dead.exists() and live.exists() and other.exists() and odd.exists()


@pytest.mark.parametrize("make, words", [
    (lambda t: (t / "d").mkdir() or t / "d", ["is a directory"]),
    (lambda t: os.symlink(t / "nowhere", t / "l") or t / "l", ["symbolic link", "does not exist"]),
    (lambda t: t / ("y" * 300), ["ENAMETOOLONG"]),
    (lambda t: (t / "f").write_text("x") and t / "f" / "out.csv", ["is a file"]),
])
def test_check_output_file_refuses_before_writing(make, words, tmp_path):
    path = make(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(InputError) as e:
        check_output_file(path, "--csv")
    assert e.value.exit_code == 2 and "--csv" in str(e.value)
    assert all(w in str(e.value) for w in words), str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_check_output_file_accepts_a_new_file_and_an_existing_one(tmp_path):
    check_output_file(tmp_path / "new" / "r.html", "--out")  # a missing folder is created at write time
    (tmp_path / "r.html").write_text("previous")
    check_output_file(tmp_path / "r.html", "--out")


# ------------------------------------------------------------------ load checks
def _save(folder, n_layers=4, tie=False, tokenizer=None):
    import torch
    from transformers import AutoModelForCausalLM

    cfg = family_config("llama", n_layers)
    cfg.tie_word_embeddings = tie
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    (tokenizer or byte_tokenizer()).save_pretrained(folder)
    return folder


def test_tied_embeddings_load_and_a_full_checkpoint_passes(tmp_path):
    from engine.config import ModelSpec
    from engine.models import load_model

    folder = _save(tmp_path / "tied", tie=True)
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as st:
        assert "lm_head.weight" not in st.keys()  # the tied head is not stored: it must not count as missing
    lm = load_model(ModelSpec(name=str(folder)))
    assert lm.n_layers == 4


def test_missing_layers_are_refused_naming_the_folder_and_keys(tmp_path):
    from engine.config import ModelSpec
    from engine.models import load_model

    folder = _save(tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 6}))
    with pytest.raises(ModelLoadError) as e:
        load_model(ModelSpec(name=str(folder)))
    assert str(folder) in str(e.value) and "model.layers.4." in str(e.value) and "missing" in str(e.value)


def test_tokenizer_with_more_ids_than_embedding_rows_is_refused(tmp_path):
    from engine.config import ModelSpec
    from engine.models import load_model

    tok = byte_tokenizer()
    tok.add_tokens([f"<t{i}>" for i in range(10)])  # 267 ids, 260 rows
    folder = _save(tmp_path / "m", tokenizer=tok)
    with pytest.raises(ModelLoadError, match="267 token ids but the model's embedding has 260 rows"):
        load_model(ModelSpec(name=str(folder)))


def test_check_weight_files_names_the_damaged_file(tmp_path):
    from engine.load_checks import check_weight_files

    folder = _save(tmp_path / "m")
    check_weight_files(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match="truncated") as e:
        check_weight_files(folder)
    assert str(weights) in str(e.value)


def test_a_stored_rotary_buffer_is_not_an_unexpected_weight():
    from engine.load_checks import check_loading_info
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(family_config("llama", 2))
    assert any(n.endswith("inv_freq") for n, _ in model.named_buffers())
    check_loading_info("m", "/f", {"unexpected_keys": ["model.layers.0.self_attn.rotary_emb.inv_freq"]}, model)
    with pytest.raises(ModelLoadError, match="no place in the config"):
        check_loading_info("m", "/f", {"unexpected_keys": ["model.layers.2.mlp.up_proj.weight"]}, model)


def test_added_special_tokens_past_the_embedding_pass_but_text_that_spells_them_is_refused():
    """GGUF tokenizers gain an <|endoftext|> past the vocabulary: allowed unless the text uses it."""
    import torch
    from types import SimpleNamespace

    from engine.errors import DataError
    from engine.load_checks import check_ids_fit, check_tokenizer_fits

    model = torch.nn.Module()
    model.emb = torch.nn.Embedding(10, 4)
    model.get_input_embeddings = lambda: model.emb
    model.config = SimpleNamespace(vocab_size=10)

    class Tok:
        pad_token_id = eos_token_id = 9
        bos_token_id = unk_token_id = None
        all_special_ids = [9]
        added_tokens_decoder = {10: SimpleNamespace(special=True)}

        def __len__(self):
            return 11

    check_tokenizer_fits("m", Tok(), model)  # id 10: a special token nobody uses
    Tok.pad_token_id = 10
    with pytest.raises(Exception, match="10 rows"):  # ... unless the engine pads with it
        check_tokenizer_fits("m", Tok(), model)
    check_ids_fit("m", torch.tensor([[1, 9]]), model, "t.txt")
    with pytest.raises(DataError, match="tokenises to id 10"):
        check_ids_fit("m", torch.tensor([[1, 10]]), model, "t.txt")
