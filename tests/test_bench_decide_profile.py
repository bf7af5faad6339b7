"""bench.decide_profile at tiny size: per-phase evaluations and seconds of the raced decision, A/B of variants."""

from __future__ import annotations

import json

from bench import decide_profile
from engine import pipeline
from engine.config import DataSpec, ModelSpec, RunSpec, SamplingSpec
from tests.conftest import save_tiny_llama, write_words


def test_decide_profile_on_a_tiny_model(tmp_path, capsys):
    save_tiny_llama(tmp_path / "model", n_layers=6, seed=0)
    write_words(tmp_path / "text.txt", 1500, seed=0)
    write_words(tmp_path / "other.txt", 800, seed=1)
    spec = RunSpec(model=ModelSpec(name=str(tmp_path / "model")),
                   data=DataSpec(source=str(tmp_path / "text.txt"), n_windows=2, seq_len=16),
                   sampling=SamplingSpec(n_masks=24))
    pipeline.sample(spec, str(tmp_path / "cache"))
    r = decide_profile.main(["--cache-dir", str(tmp_path / "cache"), "--model", str(tmp_path / "model"),
                             "--data", str(tmp_path / "text.txt"), "--windows", "2", "--seq-len", "16",
                             "--masks", "24", "--val-windows", "8", "--k", "2", "--variants", "old,new",
                             "--test-data", str(tmp_path / "other.txt"), "--test-windows", "4", "--threads", "1",
                             "--json"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(r))
    assert set(r["variants"]) == {"old", "new"}
    for v in r["variants"].values():
        assert v["evaluations"] == sum(ph["evaluations"] for ph in v["phases"].values()) > 0
        assert "candidates" in v["phases"] and len(v["chosen"]) == 2
        assert 0 < v["prefix_sharing_ratio"] <= 1
        assert v["heldout"]["ci_low"] <= v["heldout"]["ratio_to_first"] <= v["heldout"]["ci_high"]
    assert r["variants"]["old"]["heldout"]["ratio_to_first"] == 1.0
    assert r["variants"]["new"]["evaluations"] <= r["variants"]["old"]["evaluations"]
