"""Bad input: every option is refused before a model is loaded or a mask evaluated, with a full message."""

import pytest

from faults.helpers import FAST_FIT, model_args


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if any command loads model weights."""
    from engine import models, pipeline

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(pipeline.run, "_load", refuse)  # where load and open_run look it up


# (command, extra options, exit code, kind, words the message must contain)
CASES = {
    "run --remove 0": ("run", ["--remove", "0"], 2, "input", ["--remove", "positive", "got 0"]),
    "run --remove -1": ("run", ["--remove", "-1"], 2, "input", ["--remove", "positive", "got -1"]),
    "run --remove L": ("run", ["--remove", "4"], 2, "input", ["4 decoder layers", "in 1..3"]),
    "prune --remove 16": ("prune", ["--remove", "16"], 2, "input", ["--remove 16", "in 1..3"]),
    "sample --seq-len beyond positions": ("sample", ["--seq-len", "65"], 2, "input", ["--seq-len 65", "64 positions"]),
    "info --seq-len beyond positions": ("info", ["--seq-len", "1000"], 2, "input", ["--seq-len 1000", "--seq-len 64"]),
    "strata beyond L": ("sample", ["--strata", "7"], 2, "input", ["between 1 and 3"]),
    "out is a file": ("run", ["--remove", "1", "--out", "{tmp}/afile"], 2, "input", ["is a file"]),
    "cache-dir is a file": ("sample", ["--cache-dir", "{tmp}/afile"], 5, "environment", ["is a file", "--cache-dir"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_option_is_refused_before_loading(case, models, tmp_path, cli, no_loading):
    command, extra, exit_code, kind, words = CASES[case]
    (tmp_path / "afile").write_text("x")
    extra = [x.format(tmp=tmp_path) for x in extra]
    argv = [command, *model_args(models), "--cache-dir", tmp_path / "cache", *extra]
    if command in ("run", "prune"):
        argv += FAST_FIT
    code, out, err, js = cli(*argv)
    assert code == exit_code, err
    assert js["kind"] == kind and js["error"] == js["message"] and js["type"]
    for w in words:
        assert w in js["message"], js["message"]
    assert "Traceback" not in err
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*/run.sqlite"))


def test_missing_tokenizer_message_is_complete(models, tmp_path, cli, no_loading):
    code, _, err, js = cli("sample", *model_args(models, "notok4"), "--cache-dir", tmp_path)
    assert code == 4 and js["kind"] == "model_data"
    assert "no tokenizer files" in js["message"] and "tokenizer.json" in js["message"]
    assert js["message"].rstrip().endswith("run the command again.")  # not cut after "one of: "


def test_load_error_messages_keep_every_line():
    from engine.config import ModelSpec
    from engine.models import _load_error

    e = ValueError("Couldn't instantiate the backend tokenizer from one of: \n(1) a `tokenizers` file,\n(2) a slow one")
    msg = str(_load_error(ModelSpec(name="x"), "/nonexistent", False, e))
    assert "(1) a `tokenizers` file, (2) a slow one" in msg
