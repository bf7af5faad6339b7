"""Atomic exports: leftovers of killed exports, half-written folders, failed checks, a kill at each step."""

import json
import os
import subprocess
import sys

import pytest

from conftest import build_tiny_lm
from engine import export
from engine.errors import ExportCheckFailed, ExportError
from engine.export import MANIFEST, PARTIAL_MARKER, prune_model


@pytest.fixture(scope="module")
def lm():
    return build_tiny_lm("llama", n_layers=4)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_half_written_export_of_an_older_version_is_replaced_only_with_overwrite(lm, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    lm.model.save_pretrained(out)  # what a kill right after save_pretrained left behind before
    with pytest.raises(ExportError, match="not empty"):
        prune_model(lm, [1], out, verify=False)
    res = prune_model(lm, [1], out, overwrite=True, verify=False)
    assert json.loads((out / MANIFEST).read_text())["removed_layers"] == [1] and res.removed == (1,)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3


def test_overwrite_refuses_the_source_models_folder(lm, tmp_path):
    import dataclasses

    from engine.config import ModelSpec

    src = tmp_path / "src"
    lm.model.save_pretrained(src)
    lm2 = dataclasses.replace(lm, spec=ModelSpec(name=str(src)))
    with pytest.raises(ExportError, match="model's own folder"):
        prune_model(lm2, [1], src, overwrite=True, verify=False)
    assert (src / "model.safetensors").exists()


def test_leftovers_of_dead_exports_are_swept_and_live_ones_kept(lm, tmp_path):
    out = tmp_path / "out"
    dead = tmp_path / f".out.partial-{_dead_pid()}-0123abcd"
    live = tmp_path / f".out.partial-{os.getpid()}-89abcdef"
    other = tmp_path / ".out.notes"  # not ours: never touched
    for d in (dead, live, other):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x")
    (dead / PARTIAL_MARKER).write_text("{}")
    prune_model(lm, [0], out, verify=False)
    assert not dead.exists() and live.exists() and other.exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(json.loads((out / MANIFEST).read_text())["files"])


def test_failed_check_leaves_no_out_folder(lm, tmp_path, monkeypatch):
    def wrong(jobs, **kw):  # a reload that disagrees with the in-memory model
        return [{"ppl": 1e9, "kv_max_rel_diff": 0.0, "generated_tokens": 4, "layer_indices": [0, 1, 2],
                 "n_layers_config": 3, "tokenizer_ok": True, "tokenizer_error": None, "seconds": 0.1}]

    monkeypatch.setattr(export, "verify_exports", wrong)
    import torch

    out = tmp_path / "out"
    with pytest.raises(ExportCheckFailed, match="Nothing was written to") as e:
        prune_model(lm, [2], out, verify_windows=torch.randint(0, 256, (2, 16)))
    assert not out.exists()
    (failed,) = tmp_path.glob(".out.failed-*")
    assert str(failed) in str(e.value) and (failed / MANIFEST).exists()
    assert e.value.exit_code == 4 and e.value.kind == "model_data"


# A kill at each step of the export, simulated in-process by failing that step: the out folder
# is never half there, and the temporary folder is removed (a real SIGKILL leaves it for the
# next export's sweep: test_kills).
STEPS = ["save_pretrained", "tokenizer", "card", "manifest", "swap"]


@pytest.mark.parametrize("step", STEPS)
def test_failure_at_each_export_step_leaves_nothing_at_out(step, tmp_path, monkeypatch):
    from conftest import byte_tokenizer

    lm = build_tiny_lm("llama", n_layers=4, tokenizer=byte_tokenizer())
    out = tmp_path / "out"
    prune_model(lm, [0], out, verify=False)  # a previous export, which must survive
    before = sorted(p.name for p in out.iterdir())

    def boom(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path))

    if step == "save_pretrained":
        monkeypatch.setattr(type(lm.model), "save_pretrained", boom)
    elif step == "tokenizer":
        monkeypatch.setattr(type(lm.tokenizer), "save_pretrained", boom)
    elif step == "card":
        monkeypatch.setattr(export, "model_card", boom)
    elif step == "manifest":
        real = export._write_json
        monkeypatch.setattr(export, "_write_json",
                            lambda path, obj: boom() if path.name == MANIFEST else real(path, obj))
    else:
        monkeypatch.setattr(export, "_swap_into_place", boom)
    from engine.errors import DiskFull

    with pytest.raises(DiskFull):
        prune_model(lm, [1, 2], out, overwrite=True, verify=False)
    assert sorted(p.name for p in out.iterdir()) == before
    assert json.loads((out / MANIFEST).read_text())["removed_layers"] == [0]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_kill_between_the_two_renames_of_a_swap_restores_the_previous_export(lm, tmp_path):
    out = tmp_path / "out"
    prune_model(lm, [0], out, verify=False)
    aside = tmp_path / f".out.replaced-{_dead_pid()}-0123abcd"
    os.rename(out, aside)  # the state a SIGKILL after the first rename leaves
    export.sweep_leftovers(out)
    assert json.loads((out / MANIFEST).read_text())["removed_layers"] == [0] and not aside.exists()
