"""Faults found outside this suite (issue 27) and the families they stand for.

Damaged or mismatched checkpoints, hostile output paths, malformed options, full disks under the
report and the CSV, kills between a file's write and its rename, leftovers of killed exports to
other folders. Each case has its expected exit code; the message must name the path (or flag) at
fault, and where the check is possible up front no model is loaded and no run is opened first.
A command that exits 0 where it should have refused counts as a wrong result (`wrong_results`:
it produced a model or a number it should not have).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from faults.helpers import FAST_FIT, ROOT, fill, model_args, tmpfs

METHOD = [*FAST_FIT, "--estimator", "exact"]  # exact Shapley on 6 layers: no Monte Carlo


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def decided(models, tmp_path_factory):
    """A cache with a 6-layer run: 12 masks sampled and the decision for --remove 1 stored."""
    from engine import cli as engine_cli

    cache = tmp_path_factory.mktemp("decided")
    for argv in (["sample", *model_args(models, "llama6"), "--masks", 12, "--cache-dir", cache],
                 ["prune", *model_args(models, "llama6"), "--masks", 12, "--remove", 1, *METHOD, "--cache-dir", cache]):
        assert engine_cli.main([str(a) for a in argv]) == 0
    return cache


@pytest.fixture
def no_work(monkeypatch):
    """Fail (exit 1, a bug) if the command loads a model (so measures or opens a run) before refusing."""
    from engine import models as models_lib, pipeline

    def refuse(*a, **k):
        raise AssertionError("work was spent before the check")

    monkeypatch.setattr(models_lib, "load_model", refuse)
    monkeypatch.setattr(pipeline.run, "_load", refuse)  # where load and open_run look it up


def _copy_model(models: Path, tmp: Path, name: str = "llama4") -> Path:
    dest = tmp / f"m-{name}"
    shutil.copytree(models / name, dest)
    return dest


def _run_argv(models, folder, *extra):
    return ["sample", "--model", folder, "--data", models / "text.txt", *model_args(models)[4:], "--masks", 2,
            *extra]


# ------------------------------------------------------------------ damaged / mismatched checkpoints
def _config_says_6(models, tmp):
    folder = _copy_model(models, tmp)
    (folder / "config.json").write_text((models / "llama6" / "config.json").read_text())
    return folder, ["model.layers.4."]


def _config_says_4_weights_6(models, tmp):
    folder = _copy_model(models, tmp, "llama6")
    (folder / "config.json").write_text((models / "llama4" / "config.json").read_text())
    return folder, ["no place in the config", "model.layers.4."]


def _config_other_shape(models, tmp):
    folder = _copy_model(models, tmp)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] *= 2
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder, ["other shapes"]


def _weights(folder: Path) -> Path:
    return folder / "model.safetensors"


def _corrupt_header(models, tmp):
    folder = _copy_model(models, tmp)
    data = bytearray(_weights(folder).read_bytes())
    data[8:20] = b"garbage!!!!!"
    _weights(folder).write_bytes(bytes(data))
    return folder, [str(_weights(folder)), "damaged or truncated"]


def _truncated(models, tmp):
    folder = _copy_model(models, tmp)
    data = _weights(folder).read_bytes()
    _weights(folder).write_bytes(data[: len(data) // 2])
    return folder, [str(_weights(folder)), "truncated"]


def _zero_bytes(models, tmp):
    folder = _copy_model(models, tmp)
    _weights(folder).write_bytes(b"")
    return folder, [str(_weights(folder))]


def _huge_header_length(models, tmp):
    folder = _copy_model(models, tmp)
    data = bytearray(_weights(folder).read_bytes())
    data[:8] = (2**62).to_bytes(8, "little")
    _weights(folder).write_bytes(bytes(data))
    return folder, [str(_weights(folder))]


def _one_tensor_renamed(models, tmp):
    """Same file, one tensor's name edited in the header (a hand-edited or mis-converted checkpoint)."""
    folder = _copy_model(models, tmp)
    data = _weights(folder).read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = data[8:8 + n].replace(b"model.layers.2.mlp.up_proj.weight", b"model.layers.2.mlp.up_prox.weight")
    _weights(folder).write_bytes(data[:8] + header + data[8 + n:])
    return folder, ["model.layers.2.mlp.up_proj.weight", "model.layers.2.mlp.up_prox.weight"]


def _no_weights(models, tmp):
    folder = _copy_model(models, tmp)
    _weights(folder).unlink()
    return folder, [str(folder)]


def _config_not_json(models, tmp):
    folder = _copy_model(models, tmp)
    (folder / "config.json").write_text('{"model_type": "llama", "num_hidden')  # cut mid-write
    return folder, ["config.json"]


def _tokenizer_too_big(models, tmp):
    from conftest import byte_tokenizer

    folder = _copy_model(models, tmp)
    tok = byte_tokenizer()
    tok.add_tokens([f"<extra{i}>" for i in range(512 - len(tok))])  # 512 ids, the embedding has 260 rows
    tok.save_pretrained(folder)
    return folder, ["512 token ids", "260 rows"]


def _tokenizer_json_damaged(models, tmp):
    folder = _copy_model(models, tmp)
    (folder / "tokenizer.json").write_text("{ not json")
    return folder, [str(folder)]


# ------------------------------------------------------------------ cases
@dataclass(frozen=True)
class Case:
    """One fault: `build(models, tmp, decided)` -> (argv, words the message must contain)."""

    build: Callable
    exit_code: int
    kind: str
    upfront: bool = True  # refused before any model is loaded or run opened
    env: dict = field(default_factory=dict)


def _checkpoint(maker):
    def build(models, tmp, decided):
        folder, words = maker(models, tmp)
        return _run_argv(models, folder, "--cache-dir", tmp / "cache"), words
    return build


def _on_decided(command, models, decided) -> list:
    """argv of `command` on the decided run (--remove only where the command takes it: argparse would
    read it as --remove-range elsewhere)."""
    remove = ["--remove", 1] if command in ("report", "prune", "candidates") else []
    method = METHOD if command in ("report", "prune", "export", "shapley") else FAST_FIT  # who takes --estimator
    return [command, *model_args(models, "llama6"), "--masks", 12, *remove, *method, "--cache-dir", decided]


def _analysis(command, *extra, words=()):
    """`command` on the decided run with `extra` options ({tmp} is the case's folder)."""
    def build(models, tmp, decided):
        opts = [str(x).format(tmp=tmp) for x in extra]
        return [*_on_decided(command, models, decided), *opts], [w.format(tmp=tmp) for w in words]
    return build


def _text_file(name: str, data: bytes, words):
    """`sample` on a --data file holding `data`."""
    def build(models, tmp, decided):
        (tmp / name).write_bytes(data)
        return ["sample", *model_args(models)[:2], "--data", tmp / name, *model_args(models)[4:],
                "--cache-dir", tmp / "c"], words
    return build


def _prepare(tmp: Path) -> None:
    """Hostile paths made in the case's folder before the command runs."""
    (tmp / "afile").write_text("x")
    (tmp / "empty").mkdir()
    (tmp / "adir").mkdir()
    os.symlink(tmp / "empty", tmp / "link-empty")
    os.symlink(tmp / "nowhere", tmp / "dangling")


LONG = "x" * 300

CASES: dict[str, Case] = {
    # -- the weights do not cover the config (issue 27 #1) and its family
    "config 6 layers, weights 4": Case(_checkpoint(_config_says_6), 4, "model_data", upfront=False),
    "config 4 layers, weights 6": Case(_checkpoint(_config_says_4_weights_6), 4, "model_data", upfront=False),
    "config shapes differ from the weights": Case(_checkpoint(_config_other_shape), 4, "model_data", upfront=False),
    "a tensor renamed in the header": Case(_checkpoint(_one_tensor_renamed), 4, "model_data", upfront=False),
    # -- damaged weight files (#2)
    "corrupt safetensors header": Case(_checkpoint(_corrupt_header), 4, "model_data"),
    "truncated safetensors": Case(_checkpoint(_truncated), 4, "model_data"),
    "zero-byte safetensors": Case(_checkpoint(_zero_bytes), 4, "model_data"),
    "safetensors header length 2**62": Case(_checkpoint(_huge_header_length), 4, "model_data"),
    "no weight file": Case(_checkpoint(_no_weights), 4, "model_data", upfront=False),
    "config.json cut mid-write": Case(_checkpoint(_config_not_json), 4, "model_data"),
    # -- tokenizer vs embedding (#3)
    "tokenizer 512 ids, embedding 260": Case(_checkpoint(_tokenizer_too_big), 4, "model_data", upfront=False),
    "tokenizer.json damaged": Case(_checkpoint(_tokenizer_json_damaged), 4, "model_data", upfront=False),
    # -- malformed options (#4, #11)
    "--data-seed -1": Case(lambda m, t, d: (["sample", *model_args(m), "--data-seed", -1, "--cache-dir", t],
                                             ["--data-seed", "got -1"]), 2, "input"),
    "--seed -1": Case(lambda m, t, d: (["sample", *model_args(m), "--seed", -1, "--cache-dir", t],
                                        ["--seed", "got -1"]), 2, "input"),
    "--surrogate-seed -1": Case(_analysis("fit", "--surrogate-seed", -1, words=["--surrogate-seed"]), 2, "input"),
    "--mc-seed -1": Case(_analysis("shapley", "--mc-seed", -1, words=["--mc-seed"]), 2, "input"),
    "--data-seed not a number": Case(lambda m, t, d: (["sample", *model_args(m), "--data-seed", "x1",
                                                       "--cache-dir", t], ["--data-seed"]), 2, "input"),
    "--data names a directory": Case(lambda m, t, d: (["sample", *model_args(m)[:2], "--data", t / "adir",
                                                       *model_args(m)[4:], "--cache-dir", t / "c"],
                                                      ["is a directory", "{tmp}/adir"]), 4, "model_data"),
    "--data not UTF-8": Case(_text_file("latin1.txt", b"caf\xe9 " * 400, ["{tmp}/latin1.txt", "UTF-8"]),
                             4, "model_data", upfront=False),
    "--data empty file": Case(_text_file("empty.txt", b"", ["empty"]), 4, "model_data", upfront=False),
    # -- export ids validated before measuring (#5)
    "export --removed 6 on 6 layers": Case(_analysis("export", "--removed", "6", "--out", "{tmp}/out",
                                                     words=["--removed 6", "0..5"]), 2, "input"),
    "export --removed -1": Case(_analysis("export", "--removed=-1", "--out", "{tmp}/out",
                                          words=["layer -1", "0..5"]), 2, "input"),
    "export --removed 1,1": Case(_analysis("export", "--removed", "1,1", "--out", "{tmp}/out", words=["twice"]),
                                 2, "input"),
    # -- hostile output paths (#6, #7)
    "export --out symlink to an empty folder": Case(_analysis("export", "--removed", "1", "--out", "{tmp}/link-empty",
                                                              words=["{tmp}/link-empty", "symbolic link"]), 2, "input"),
    "export --out dangling symlink": Case(_analysis("export", "--removed", "1", "--out", "{tmp}/dangling",
                                                    words=["{tmp}/dangling", "does not exist"]), 2, "input"),
    "export --out 300-character name": Case(_analysis("export", "--removed", "1", "--out", "{tmp}/" + LONG,
                                                      words=["ENAMETOOLONG", "shorter"]), 2, "input"),
    "export --out under a regular file": Case(_analysis("export", "--removed", "1", "--out", "{tmp}/afile/out",
                                                        words=["{tmp}/afile", "is a file"]), 2, "input"),
    "report --out names a directory": Case(_analysis("report", "--out", "{tmp}/adir",
                                                     words=["{tmp}/adir", "is a directory"]), 2, "input"),
    "report --out dangling symlink": Case(_analysis("report", "--out", "{tmp}/dangling",
                                                    words=["{tmp}/dangling", "does not exist"]), 2, "input"),
    "report --out 300-character name": Case(_analysis("report", "--out", "{tmp}/" + LONG + ".html",
                                                      words=["ENAMETOOLONG"]), 2, "input"),
    "report --out under a regular file": Case(_analysis("report", "--out", "{tmp}/afile/r.html",
                                                        words=["{tmp}/afile", "is a file"]), 2, "input"),
    "interactions --csv names a directory": Case(_analysis("interactions", "--folds", 0, "--csv", "{tmp}/adir",
                                                           words=["--csv", "{tmp}/adir", "is a directory"]),
                                                 2, "input"),
    "interactions --csv 300-character name": Case(_analysis("interactions", "--folds", 0, "--csv",
                                                            "{tmp}/" + LONG + ".csv", words=["ENAMETOOLONG"]),
                                                  2, "input"),
    # -- a cache that is a file (#10)
    "status --cache-dir a regular file": Case(lambda m, t, d: (["status", "--json", "--cache-dir", t / "afile"],
                                                               ["{tmp}/afile", "is a file"]), 5, "environment"),
    "status with $LAYERPRUNE_CACHE a regular file": Case(
        lambda m, t, d: (["status", "--json"], ["LAYERPRUNE_CACHE", "{tmp}/afile"]), 5, "environment",
        env={"LAYERPRUNE_CACHE": "{tmp}/afile"}),
    "sample --cache-dir under a regular file": Case(
        lambda m, t, d: (["sample", *model_args(m), "--masks", 2, "--cache-dir", t / "afile" / "cache"],
                         ["{tmp}/afile", "is a file"]), 5, "environment"),
    "status --cache-dir under a regular file": Case(
        lambda m, t, d: (["status", "--json", "--cache-dir", t / "afile" / "cache"], ["{tmp}/afile"]),
        5, "environment"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fault_outside_the_suite(case, models, decided, tmp_path, cli, record, monkeypatch, request):
    c = CASES[case]
    _prepare(tmp_path)
    argv, words = c.build(models, tmp_path, decided)
    for k, v in c.env.items():
        monkeypatch.setenv(k, v.format(tmp=tmp_path))
    if c.upfront:
        request.getfixturevalue("no_work")
    code, out, err, js = cli(*argv, *([] if "--json" in map(str, argv) else ["--json"]))
    if code == 0:
        record.wrong_results += 1  # it produced a result where it should have refused
    assert code == c.exit_code, (code, err)
    assert js["kind"] == c.kind and js["exit_code"] == c.exit_code, js
    for w in words:
        assert w.format(tmp=tmp_path) in js["message"], (w, js["message"])
    assert "Traceback" not in err and "This is a bug" not in js["message"]
    stores = list((tmp_path / "cache").glob("*/run.sqlite")) + list((tmp_path / "c").glob("*/run.sqlite"))
    assert not stores, f"a run was created before the refusal: {stores}"


# ------------------------------------------------------------------ files written whole or not at all (#8)
def _child(code: str, argv, cwd=ROOT, timeout=240):
    """Run `code` then engine.cli.main(argv) in a fresh interpreter (one torch thread)."""
    script = f"{code}\nimport sys, engine.cli\nsys.exit(engine.cli.main({[str(a) for a in argv]!r}))"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


KILL_AT_FSYNC = "import os, signal\nos.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)"


@pytest.mark.parametrize("what", ["report", "interactions --csv"])
def test_sigkill_between_write_and_rename_keeps_the_previous_file(what, models, decided, tmp_path, cli, record):
    """The worst point for a file written in place: after the bytes, before they are whole on disk."""
    target = tmp_path / ("report.html" if what == "report" else "pairs.csv")
    flag = ["--out", target] if what == "report" else ["--folds", 0, "--csv", target]
    argv = [*_on_decided(what.split()[0], models, decided), *flag]
    code, out, err, _ = cli(*argv)
    assert code == 0, err
    previous = target.read_bytes()
    assert len(previous) > 100
    proc = _child(KILL_AT_FSYNC, argv)
    record.saw(proc.stdout, proc.stderr)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert target.read_bytes() == previous  # not 0 bytes, not half a file
    (leftover,) = tmp_path.glob(f".{target.name}.tmp-*")  # the killed writer's temporary file
    code, _, err, _ = cli(*argv)  # the next write replaces the file and sweeps the dead writer's leftover
    assert code == 0, err
    assert not leftover.exists() and target.stat().st_size > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


@pytest.mark.parametrize("what", ["report", "interactions --csv"])
def test_disk_full_under_the_report_and_the_csv_tmpfs(what, models, decided, tmp_path, cli):
    with tmpfs(tmp_path / "full", 64) as fs:
        target = fs / ("report.html" if what == "report" else "pairs.csv")
        flag = ["--out", target] if what == "report" else ["--folds", 0, "--csv", target]
        filler = fill(fs)
        code, _, err, js = cli(*_on_decided(what.split()[0], models, decided), *flag)
        assert code == 5 and js["type"] == "DiskFull", err
        assert str(target) in js["message"] and "Free space" in js["message"]
        assert sorted(p.name for p in fs.iterdir()) == [filler.name]  # no truncated file, no temporary file
        filler.unlink()


def test_read_only_folder_under_the_report_is_refused_up_front_tmpfs(models, decided, tmp_path, cli, no_work):
    from faults.helpers import remount_read_only

    with tmpfs(tmp_path / "ro", 64) as fs:
        remount_read_only(fs)
        code, _, err, js = cli(*_on_decided("report", models, decided), "--out", fs / "report.html")
        assert code == 5 and js["kind"] == "environment" and str(fs) in js["message"], err


# ------------------------------------------------------------------ leftovers of killed exports (#9)
KILL_IN_VERIFY = ("import os, signal, engine.export\n"
                  "engine.export.verify_exports = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)")


def test_export_killed_then_export_to_another_folder_sweeps_its_leftover(models, decided, tmp_path, cli, record):
    base = [*_on_decided("export", models, decided), "--removed", "1"]
    proc = _child(KILL_IN_VERIFY, [*base, "--out", tmp_path / "A"])  # killed with the weights written
    record.saw(proc.stdout, proc.stderr)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    (partial,) = tmp_path.glob(".A.partial-*")
    assert (partial / "model.safetensors").is_file() and not (tmp_path / "A").exists()
    live = tmp_path / f".C.partial-{os.getpid()}-0123abcd"  # a live export's folder: kept
    live.mkdir()
    (live / ".layerprune-partial.json").write_text(json.dumps({"pid": os.getpid(), "out": str(tmp_path / "C")}))
    foreign = tmp_path / ".notes.partial-1-89abcdef"  # not ours (no marker): never touched
    foreign.mkdir()
    code, _, err, js = cli(*base, "--out", tmp_path / "B")
    assert code == 0 and js["verification"]["ok"], err
    assert not partial.exists(), "the killed export's hidden folder was left behind"
    assert live.exists() and foreign.exists()
    assert (tmp_path / "B" / "pruning_manifest.json").is_file()
