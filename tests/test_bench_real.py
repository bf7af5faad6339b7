"""bench.real at tiny size: it runs engine run, times its stages, and compares sets with paired intervals."""

from __future__ import annotations

import json

from bench import real
from tests.conftest import save_tiny_llama, write_words


def test_bench_real_on_a_tiny_model(tmp_path, capsys):
    save_tiny_llama(tmp_path / "model", n_layers=6, seed=0)
    write_words(tmp_path / "text.txt", 1500, seed=0)
    write_words(tmp_path / "other.txt", 1500, seed=1)
    r = real.main(["--model", str(tmp_path / "model"), "--data", str(tmp_path / "text.txt"), "--windows", "2",
                   "--seq-len", "16", "--masks", "20", "--scheme", "size-uniform", "--swaps", "0", "--n-compare", "2",
                   "--val-windows", "4", "--ensemble", "1", "--boot", "0", "--ks", "2,3",
                   "--eval-data", f"{tmp_path / 'other.txt'},{tmp_path / 'text.txt'}", "--eval-windows", "6",
                   "--baselines", "block-influence,ppl", "--threads", "1", "--cache-dir", str(tmp_path / "cache"),
                   "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1])["by_k"] == r["by_k"] and "engine run" in out[0]
    assert set(r["stages_s"]) == {"load", "sample", "fit", "contributions", "decide"}
    assert all(r["stages_peak_mib"][s] > 0 for s in r["stages_s"])
    s = r["sampling"]
    assert s["n_masks"] == 20 and s["floor_layer_calls_per_mask"] <= s["layer_calls_per_mask"] <= 6
    assert [row["k"] for row in r["by_k"]] == [2, 3]
    for row in r["by_k"]:
        assert set(row["baselines"]) == {"block-influence", "ppl"} and len(row["product_removed"]) == row["k"]
        for name, (ratio, lo, hi) in row["ratio_to_product"].items():
            assert lo <= ratio <= hi
            assert abs(ratio - row["baselines"][name] / row["product_ppl"]) < 1e-9
        assert row["product_best_or_tied"] == all(hi >= 1.0 for _, _, hi in row["ratio_to_product"].values())
        assert row["best_baseline"] == min(row["baselines"], key=row["baselines"].get)
