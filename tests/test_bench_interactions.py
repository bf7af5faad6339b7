"""bench.interactions: the JSON contract on the demo ground truth, and the agreement measures."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import ground_truth as gtm
from bench import interactions as bi

pytestmark = pytest.mark.skipif(not gtm.DEFAULT_OUT.is_file(), reason="no demo ground truth")


def test_agreement_measures():
    rng = np.random.default_rng(0)
    T = rng.normal(size=(8, 8))
    T = T + T.T
    a = bi.agreement(T, T)
    assert a == {"spearman_all": pytest.approx(1.0), "spearman_top15": pytest.approx(1.0), "pearson": pytest.approx(1.0)}
    flipped = bi.agreement(-T, T)
    assert flipped["spearman_all"] == pytest.approx(-1.0) and flipped["pearson"] == pytest.approx(-1.0)


def test_mixed_design_is_half_stratified_half_paired():
    masks, sizes = bi.design_masks("mixed", 64, 0, 16)
    assert len(np.unique(masks, axis=0)) == len(masks) <= 64
    assert 0 in sizes and 16 in sizes and 15 in sizes


def test_json_rows_on_the_demo_ground_truth(capsys):
    bi.main(["--masks", "64", "--surrogates", "ridge-pairwise", "--schemes", "stratified", "paired", "--seeds", "0",
             "--ensemble", "2", "--cost-layers", "24", "--cost-samples", "4", "--game-seeds", "0", "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    top = out["truth_top"][0]
    assert (top["i"], top["j"]) == (0, 15) and top["value"] == pytest.approx(0.273, abs=5e-4)
    assert [(r["masks"], r["surrogate"], r["scheme"]) for r in out["rows"]] == [
        (64, "ridge-pairwise", "stratified"), (64, "ridge-pairwise", "paired")]
    for r in out["rows"]:
        for key in ("spearman_all", "spearman_top15", "pearson"):
            assert -1.0 <= r[key] <= 1.0
    assert out["rows"][0]["unsampled_weight_fraction"] > 0.5 and out["rows"][1]["unsampled_weight_fraction"] < 0.05
    for r in out["rows"]:  # the interval engine interactions reports (5-group jackknife), against the truth
        assert r["folds"] == 5 and r["level"] == 0.9 and r["fit_on"] == "all"
        assert 0.0 <= r["coverage"] <= 1.0 and 0.0 <= r["coverage_top15"] <= 1.0 and r["median_halfwidth"] > 0
    assert out["cost"][0]["L"] == 24 and out["cost"][0]["evaluations"] == 5 * 4 * (1 + 24 + 24 * 23 // 2)


def test_interval_coverage_counts_pairs_inside_and_the_strongest_separately():
    from types import SimpleNamespace

    L = 6
    iu = np.triu_indices(L, 1)
    truth = np.zeros((L, L))
    truth[iu] = np.arange(1, 16) / 100.0  # 15 pairs, the strongest is (4, 5)
    truth = truth + truth.T
    low, high = truth - 0.001, truth + 0.001
    high[4, 5] = high[5, 4] = truth[4, 5] - 0.0005  # the strongest pair falls outside
    r = SimpleNamespace(details={"interval": {"low": low, "high": high}})
    cov = bi.interval_coverage(r, truth, top=3)
    assert cov["coverage"] == pytest.approx(14 / 15) and cov["coverage_top15"] == pytest.approx(2 / 3)
    assert cov["median_halfwidth"] == pytest.approx(0.001)


def test_per_game_coverage_of_the_defaults_on_a_tiny_game(tmp_path, capsys):
    """`games` / `min_coverage`: the defaults of engine interactions on a complete 7-layer ground truth; its
    strata (6, 5, 4) hold three consecutive kept counts, so the reported index is the restricted one."""
    from tests.conftest import save_tiny_llama, write_words

    save_tiny_llama(tmp_path / "model", n_layers=7, seed=4)
    write_words(tmp_path / "cal.txt", 400, seed=10)
    gtm.build(str(tmp_path / "model"), str(tmp_path / "cal.txt"), 3, 16, out=tmp_path / "ground_truth_tiny.npz",
              progress=False)
    bi.main(["--masks", "--cost-layers", "--games", str(tmp_path / "ground_truth_tiny.npz"), "--game-seeds", "2",
             "--game-masks", "40", "--ensemble", "2", "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (g,) = out["games"]
    assert g["name"] == "tiny" and g["seeds"] == [0, 1] and g["n_layers"] == 7 and g["masks"] == 40 and g["restricted"]
    assert 0 <= g["coverage"] <= 1 and 0 <= g["coverage_top10"] <= 1 and len(g["coverage_by_seed"]) == 2
    assert out["min_coverage"] == g["coverage"] and out["min_coverage_top10"] == g["coverage_top10"]
    assert out["rows"] == []
