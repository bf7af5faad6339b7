"""Text sources and seeded token windows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import DataSpec
from engine.data import load_text, make_windows
from engine.errors import DataError

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(40))  # ~2.2k bytes


@pytest.fixture
def txt(tmp_path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


def test_windows_deterministic_non_overlapping(txt, tiny_tokenizer):
    spec = DataSpec(source=str(txt), n_windows=6, seq_len=64, seed=3)
    a, b = make_windows(tiny_tokenizer, spec), make_windows(tiny_tokenizer, spec)
    assert a.input_ids.shape == (6, 64) and a.input_ids.dtype.is_floating_point is False
    assert a.input_ids.equal(b.input_ids) and a.data_hash == b.data_hash
    assert a.n_tokens == len(TEXT.encode()) and a.source == str(txt)
    other = make_windows(tiny_tokenizer, DataSpec(source=str(txt), n_windows=6, seq_len=64, seed=4))
    assert not other.input_ids.equal(a.input_ids) and other.data_hash != a.data_hash
    stream = list(TEXT.encode())  # byte tokenizer: token id == byte
    starts = []
    for w in a.input_ids.tolist():
        hits = [s for s in range(len(stream) - 63) if stream[s : s + 64] == w]
        assert hits, "every window is a contiguous slice of the token stream"
        starts.append(hits[0])
    starts.sort()
    assert all(b - a >= 64 for a, b in zip(starts, starts[1:]))
    assert starts != [i * 64 for i in range(6)]  # not simply the first tokens


def test_data_hash_depends_on_text_and_shape(txt, tmp_path, tiny_tokenizer):
    base = make_windows(tiny_tokenizer, DataSpec(source=str(txt), n_windows=4, seq_len=32))
    changed = tmp_path / "changed.txt"
    changed.write_text(TEXT + "x", encoding="utf-8")
    assert make_windows(tiny_tokenizer, DataSpec(source=str(changed), n_windows=4, seq_len=32)).data_hash != base.data_hash
    assert make_windows(tiny_tokenizer, DataSpec(source=str(txt), n_windows=4, seq_len=31)).data_hash != base.data_hash


def test_too_short_names_the_numbers(txt, tiny_tokenizer):
    n_tokens = len(TEXT.encode())
    with pytest.raises(DataError, match=rf"needs 3000 tokens \(10 windows x 300\), found {n_tokens}; give more text"):
        make_windows(tiny_tokenizer, DataSpec(source=str(txt), n_windows=10, seq_len=300))


def test_empty_file(tmp_path, tiny_tokenizer):
    p = tmp_path / "empty.txt"
    p.write_text("  \n", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        make_windows(tiny_tokenizer, DataSpec(source=str(p)))


def test_jsonl(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "alpha"}\n\n{"text": "beta", "id": 2}\n', encoding="utf-8")
    assert load_text(str(p)) == "alpha\n\nbeta"
    q = tmp_path / "body.jsonl"
    q.write_text('{"body": "gamma"}\n', encoding="utf-8")
    assert load_text(str(q), text_field="body") == "gamma"
    with pytest.raises(DataError, match="line 1: no field 'text'"):
        load_text(str(q))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "broken"\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 2: not valid JSON"):
        load_text(str(bad))


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_text(str(tmp_path / "nope.txt"))
    other = tmp_path / "x.csv"
    other.write_text("a,b", encoding="utf-8")
    with pytest.raises(DataError, match="unknown file type"):
        load_text(str(other))


def test_preset_unreachable_hub_fails_fast(monkeypatch):
    import engine.data

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):  # no offline mode asked for
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(engine.data, "hub_reachable", lambda: False)
    with pytest.raises(DataError, match="could not reach the Hugging Face hub for dataset preset 'c4'"):
        load_text("c4")


def test_preset_offline_env_fails_fast():
    """HF_HUB_OFFLINE=1 set before start (as a user would): the cache is tried, and fails in seconds.

    Runs in a subprocess because datasets reads the variable at import; the time is taken around
    load_text only (interpreter start-up on a loaded 2-core machine is not what is tested).
    """
    code = (
        "import time, datasets\n"
        "from engine.data import load_text\n"
        "from engine.errors import DataError\n"
        "t0 = time.perf_counter()\n"
        "try:\n    load_text('wikitext2')\nexcept DataError as e:\n    print('DataError:', e)\n"
        "print('seconds', time.perf_counter() - t0)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": "/nonexistent-cache-dir"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert "DataError: could not load dataset preset 'wikitext2'" in out.stdout, out.stdout + out.stderr
    assert "local .txt or .jsonl" in out.stdout
    assert float(out.stdout.rsplit("seconds", 1)[1]) < 10, "offline preset must fail fast"
