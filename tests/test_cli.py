"""`python -m engine`: JSON output, resume, kill-and-resume, and clear errors for bad input.

Uses tiny random models saved with save_pretrained (byte tokenizer, no downloads).
Most commands run in-process through cli.main (fast); the JSON-last-line and SIGKILL
tests run real subprocesses.
"""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import byte_tokenizer, family_config
from engine import cli

ROOT = Path(__file__).resolve().parents[1]
TEXT = " ".join(f"The quick brown fox number {i} jumps over the lazy dog near the river." for i in range(200))


def _save(folder: Path, config) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "text.txt").write_text(TEXT)
    (root / "short.txt").write_text("too short")
    (root / "empty.txt").write_text("  \n")
    _save(root / "tiny4", family_config("llama", 4))
    _save(root / "tiny12", family_config("llama", 12))
    from transformers import AutoConfig

    bloom = AutoConfig.for_model("bloom", vocab_size=260, hidden_size=32, n_layer=2, n_head=4)
    _save(root / "bloom", bloom)
    return root


def _args(files, model="tiny4", *extra, cache=None):
    return [
        "--model", str(files / model), "--data", str(files / "text.txt"), "--windows", "2", "--seq-len", "16",
        "--cache-dir", str(cache or files / "cache"), "--threads", "1", *extra,
    ]


def _run_main(capsys, argv):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_sample_json_is_the_last_stdout_line_and_second_run_evaluates_nothing(files, tmp_path, capsys):
    cmd = [sys.executable, "-m", "engine", "sample", *_args(files, "tiny4", "--masks", "6", "--json", cache=tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = _last_json(proc.stdout)
    assert result["evaluated"] == 6 and result["total"] == 6 and result["n_layers"] == 4
    assert Path(result["store"]).is_file() and Path(result["store"]).is_relative_to(tmp_path)
    assert result["seconds"] > 0 and result["ppl_full"] > 1
    # again, in-process: resumes, evaluates nothing; asking for more extends the same run
    again = cli.main(["sample", *_args(files, "tiny4", "--masks", "6", "--json", cache=tmp_path)])
    assert again == 0
    capsys.readouterr()
    assert cli.main(["sample", *_args(files, "tiny4", "--masks", "10", "--json", cache=tmp_path)]) == 0
    extended = _last_json(capsys.readouterr().out)
    assert extended["run_id"] == result["run_id"] and extended["evaluated"] == 4 and extended["total"] == 10


def test_evaluation_options_change_speed_not_numbers(files, tmp_path, capsys):
    """--batch-size 1 (one window per layer call) fills the same run with the same perplexities."""
    from engine.store import RunStore

    stores = []
    for extra, cache in (((), tmp_path / "a"), (("--batch-size", "1"), tmp_path / "b")):
        code, out, _ = _run_main(capsys, ["sample", *_args(files, "tiny4", "--masks", "5", "--json", *extra, cache=cache)])
        assert code == 0
        stores.append(_last_json(out))
    assert stores[0]["run_id"] == stores[1]["run_id"]
    tables = [RunStore(cache, r["run_id"]).table() for r, cache in zip(stores, (tmp_path / "a", tmp_path / "b"))]
    order = [sorted(range(len(t.rowid)), key=lambda i: t.masks[i].tobytes()) for t in tables]
    ppl = [t.ppl[o] for t, o in zip(tables, order)]
    torch.testing.assert_close(torch.tensor(ppl[0]), torch.tensor(ppl[1]), rtol=1e-5, atol=0)
    code, _, err = _run_main(capsys, ["sample", *_args(files, "tiny4", "--batch-size", "0", cache=tmp_path / "c")])
    assert code != 0 and "--batch-size must be a positive integer" in err


def test_single_pass_makes_the_counted_layer_calls_and_the_same_numbers(files, tmp_path, capsys):
    """sample --single-pass walks one trie over all masks; the default walks doubling chunks."""
    from engine.config import SamplingSpec
    from engine.evaluate import count_prefix_computations
    from engine.pipeline import FIRST_CHUNK, _chunks
    from engine.sampling import sample_masks
    from engine.store import RunStore

    n = 100  # two chunks: 64 + 36
    masks = sample_masks(SamplingSpec(n_masks=n), 12)
    results = {}
    for flag in ("--single-pass", "--chunked"):
        cache = tmp_path / flag.strip("-")
        code, out, _ = _run_main(capsys, ["sample", *_args(files, "tiny12", "--masks", str(n), "--json", flag, cache=cache)])
        assert code == 0
        r = _last_json(out)
        table = RunStore(cache, r["run_id"]).table()
        results[flag] = (r, dict(zip(map(bytes, table.masks.astype("u1")), table.ppl)))
    assert results["--single-pass"][0]["layer_calls"] == count_prefix_computations(masks)
    chunked_calls = sum(count_prefix_computations(masks[a:b]) for a, b in _chunks(n, FIRST_CHUNK))
    assert results["--chunked"][0]["layer_calls"] == chunked_calls > count_prefix_computations(masks)
    one, chunked = results["--single-pass"][1], results["--chunked"][1]
    assert one.keys() == chunked.keys()
    assert all(abs(one[k] - chunked[k]) <= 1e-5 * chunked[k] for k in one)


def test_second_run_reports_zero(files, tmp_path, capsys):
    argv = ["sample", *_args(files, "tiny4", "--masks", "4", "--json", cache=tmp_path)]
    assert _run_main(capsys, argv)[0] == 0
    code, out, _ = _run_main(capsys, argv)
    assert code == 0 and _last_json(out)["evaluated"] == 0 and _last_json(out)["total"] == 4
    code, out, _ = _run_main(capsys, ["status", "--cache-dir", str(tmp_path), "--json"])
    (run,) = _last_json(out)["runs"]
    assert run["n_samples"] == 4 and run["status"] == "finished" and run["n_layers"] == 4


def test_info(files, capsys):
    code, out, _ = _run_main(capsys, ["info", *_args(files, "tiny4")[:-2], "--json"])
    info = _last_json(out)
    assert code == 0
    assert info["family"] == "llama" and info["n_layers"] == 4 and info["n_params"] > 0 and info["ppl"] > 1


def _count(db: Path) -> int:
    try:
        con = sqlite3.connect(db, timeout=5)
        try:
            return con.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def _rows(db: Path):
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT rowid, mask, created FROM samples ORDER BY rowid").fetchall()
    finally:
        con.close()


def test_sigkill_halfway_then_rerun_loses_nothing_and_recomputes_nothing(files, tmp_path):
    # 12 layers x 8 windows of 64 tokens (the model's maximum positions): slow enough per mask to kill mid-run.
    argv = [
        "sample", "--model", str(files / "tiny12"), "--data", str(files / "text.txt"), "--windows", "8",
        "--seq-len", "64", "--masks", "24", "--cache-dir", str(tmp_path), "--json", "--threads", "1",
    ]
    proc = subprocess.Popen([sys.executable, "-m", "engine", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 120
        db = None
        while time.monotonic() < deadline and proc.poll() is None:
            found = list(tmp_path.glob("*/run.sqlite"))
            if found and _count(found[0]) >= 6:
                db = found[0]
                break
            time.sleep(0.01)
        assert db is not None and proc.poll() is None, "the sample run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    before = _rows(db)
    assert 6 <= len(before) < 24
    rerun = subprocess.run([sys.executable, "-m", "engine", *argv], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    result = _last_json(rerun.stdout)
    after = _rows(db)
    assert result["evaluated"] == 24 - len(before) and result["total"] == 24
    assert len(after) == 24 and len({m for _, m, _ in after}) == 24
    assert after[: len(before)] == before  # same rows, same commit times: nothing recomputed


BAD_INPUTS = {
    "unknown model folder": (["--model", "/nonexistent/model-folder"], "model"),
    "unsupported architecture": (["--model", "{files}/bloom"], "adapter"),
    "too-short text": (["--data", "{files}/short.txt"], "tokens"),
    "empty text": (["--data", "{files}/empty.txt"], "empty"),
    "missing text file": (["--data", "{files}/nope.txt"], "no such file"),
    "strata not integers": (["--strata", "a,b"], "integers"),
    "strata out of range": (["--strata", "9,2"], "between 1 and 3"),
    "remove range reversed": (["--remove-range", "0.5,0.1"], "remove-range"),
    "paired with stratified": (["--paired"], "paired"),
    "negative masks": (["--masks", "-3"], "--masks"),
    "unknown option": (["--bogus"], "unrecognized"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_a_clear_error_without_traceback(case, files, tmp_path, capsys):
    extra, expected = BAD_INPUTS[case]
    extra = [x.format(files=files) for x in extra]
    argv = ["sample", *_args(files, "tiny4", cache=tmp_path), *extra, "--json"]
    code, out, err = _run_main(capsys, argv)
    assert code != 0
    assert "Traceback" not in err and "Traceback" not in out
    message = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(message) == 1 and expected.lower() in message[0].lower(), err
    assert _last_json(out)["error"]
    assert not list(tmp_path.glob("*/run.sqlite")), "a failed command must not create a run store"


def test_debug_shows_the_traceback(files, tmp_path, capsys):
    code, _, err = _run_main(capsys, ["sample", *_args(files, "tiny4", cache=tmp_path), "--strata", "9", "--debug"])
    assert code != 0 and "Traceback" in err


def test_unexpected_errors_say_rerun_with_debug(files, monkeypatch, capsys):
    from engine import pipeline

    def broken(*a, **k):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(pipeline, "status", broken)
    code, out, err = _run_main(capsys, ["status", "--json"])
    assert code == 1 and "kaboom" in err and "--debug" in err and "Traceback" not in err
    assert "kaboom" in _last_json(out)["error"]


def test_store_locked_exit_code(files, tmp_path, capsys):
    from engine.store import RunStore

    argv = ["sample", *_args(files, "tiny4", "--masks", "2", "--json", cache=tmp_path)]
    assert _run_main(capsys, argv)[0] == 0
    (db,) = tmp_path.glob("*/run.sqlite")
    store = RunStore.open(tmp_path, db.parent.name)
    with store.writer():
        code, out, err = _run_main(capsys, argv[:-3] + ["--masks", "4", "--json"])
    assert code == 3 and str(os.getpid()) in err and "Traceback" not in err


def test_pipeline_sample_stops_on_cancel_request_and_resumes(files, tmp_path, monkeypatch):
    from engine import pipeline
    from engine.config import DataSpec, ModelSpec, RunSpec, SamplingSpec
    from engine.store import RunStore, Writer

    original_add = Writer.add

    def add_then_cancel(self, *args, **kwargs):  # the app's Cancel button, pressed after 3 masks
        rowid = original_add(self, *args, **kwargs)
        if rowid == 3:
            assert RunStore.open(self.store.cache_dir, self.store.run_id).request_cancel()
        return rowid

    monkeypatch.setattr(Writer, "add", add_then_cancel)
    spec = RunSpec(
        model=ModelSpec(name=str(files / "tiny12")),
        data=DataSpec(source=str(files / "text.txt"), n_windows=2, seq_len=16),
        sampling=SamplingSpec(n_masks=30),
    )
    result = pipeline.sample(spec, tmp_path, progress=False)
    assert result.stopped == "cancelled" and result.evaluated == 3 and result.total == 3
    store = RunStore.open(tmp_path, result.run_id)
    assert store.lease().status == "cancelled" and store.count() == 3
    before = store.results()
    again = pipeline.sample(spec, tmp_path, progress=False)  # rowids > 3 now: no further cancel
    assert again.evaluated == 27 and again.total == 30 and again.stopped is None
    assert store.results()[:3] == before


def test_resuming_a_cancelled_run_to_fewer_masks_than_it_holds_finishes_it(files, tmp_path, capsys):
    """Cancel while asking for many masks, then ask for fewer than the store holds: the sample's first masks
    that the cancel left out are evaluated and the run's status says finished (it stayed 'cancelled')."""
    from engine.store import RunStore

    argv = ["sample", "--model", str(files / "tiny12"), "--data", str(files / "text.txt"), "--windows", "2",
            "--seq-len", "32", "--cache-dir", str(tmp_path), "--json", "--threads", "1"]
    assert cli.main([*argv, "--masks", "12"]) == 0
    run_id = _last_json(capsys.readouterr().out)["run_id"]
    db = tmp_path / run_id / "run.sqlite"
    con = sqlite3.connect(db)
    with con:  # what a cancel at mask 12 of 400 leaves, minus one of the sample's first 8 masks
        first = con.execute("SELECT mask FROM samples ORDER BY rowid LIMIT 1").fetchone()[0]
        con.execute("DELETE FROM samples WHERE mask = ?", (first,))
        con.execute("UPDATE lease SET status = 'cancelled', target = 400")
    con.close()
    assert cli.main([*argv, "--masks", "8"]) == 0
    out = _last_json(capsys.readouterr().out)
    lease = RunStore(tmp_path, run_id).lease()
    assert lease.status == "finished" and lease.target == 8
    assert out["evaluated"] == 1 and first in RunStore(tmp_path, run_id).done_masks()


def test_analysis_stages_on_the_stored_samples_never_load_the_weights(files, tmp_path, capsys, monkeypatch):
    """fit, shapley, candidates, interactions open the run from the model's config and tokenizer: the same
    run id, no weights read (models.load_model is not called); sample still loads them."""
    from engine import models

    cache = tmp_path / "c"
    assert _run_main(capsys, ["sample", *_args(files, "tiny12", "--masks", "24", cache=cache), "--json"])[0] == 0

    def no_weights(*a, **k):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(models, "load_model", no_weights)
    ids = set()
    for cmd in (["fit", "--no-compare"], ["shapley"], ["candidates", "--remove", "2", "--top", "2"],
                ["interactions", "--folds", "0"]):
        code, out, err = _run_main(capsys, [cmd[0], *_args(files, "tiny12", "--masks", "24", cache=cache), *cmd[1:],
                                            "--json"])
        assert code == 0, (cmd, out[-400:], err[-400:])
        ids.add(_last_json(out).get("run_id"))
    assert len(ids - {None}) == 1
    assert _run_main(capsys, ["sample", *_args(files, "tiny12", "--masks", "26", cache=cache), "--json"])[0] != 0
