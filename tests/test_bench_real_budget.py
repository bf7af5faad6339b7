"""bench.real_budget at tiny size: nested mask budgets of one run, each method's held-out perplexity and its cost."""

from __future__ import annotations

import json

from bench import real_budget
from tests.conftest import save_tiny_llama, write_words


def test_real_budget_on_a_tiny_model(tmp_path, capsys):
    save_tiny_llama(tmp_path / "model", n_layers=6, seed=0)
    write_words(tmp_path / "text.txt", 1500, seed=0)
    write_words(tmp_path / "other.txt", 1500, seed=1)
    r = real_budget.main(["--model", str(tmp_path / "model"), "--data", str(tmp_path / "text.txt"), "--windows", "2",
                          "--seq-len", "16", "--masks", "12,20", "--ks", "2,3", "--swaps", "1", "--n-compare", "2", "--variants", "product,game,beam",
                          "--val-windows", "4", "--baselines", "block-influence,ppl",
                          "--eval-data", str(tmp_path / "other.txt"), "--eval-windows", "6", "--threads", "1",
                          "--cache-dir", str(tmp_path / "cache"), "--json"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"] == r["rows"]
    L, W = r["n_layers"], r["calibration_windows"]
    methods = {(x["method"], x["masks"]) for x in r["rows"]}
    assert methods == {("product", 12), ("product", 20), ("game", 12), ("game", 20), ("rank-and-cut", 12),
                       ("rank-and-cut", 20), ("beam", 12), ("beam", 20), ("block-influence", 0), ("ppl", 0)}
    split = str(tmp_path / "other.txt")
    for row in r["rows"]:
        e = row["evaluations"]
        assert len(row["removed"]) == row["k"] and e["total"] == e["sample"] + e["decide"] + e["baselines"]
        assert e["sample"] == row["masks"] * W
        ratio, lo, hi = row["vs_best_baseline"][split]
        assert lo <= ratio <= hi and row["best_or_tied"][split] == (hi >= 1.0)
        if row["method"] == "product":  # the baselines it raced are part of its cost
            assert e["baselines"] == W + L * W and e["decide"] > 0
        if row["method"] == row["best_baseline"][split]:
            assert ratio == 1.0
    assert r["baselines"]["ppl"]["evaluations"] == L * W
