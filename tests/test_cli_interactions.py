"""`engine interactions` and `engine candidates`: human output, the JSON line, the CSV, the stored
artifacts the app reads, and the same numbers as the method functions."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from conftest import save_tiny_llama
from engine import cli, pipeline
from engine.config import DataSpec, MethodSpec, ModelSpec, RunSpec, SamplingSpec, SurrogateSpec
from engine.interactions import size_weight

TEXT = " ".join(f"Sentence {i} says something new about how layers interact with each other." for i in range(250))
L = 6
RUN = ("--scheme", "size-uniform", "--masks", "24")
STAGE2 = (*RUN, "--surrogate", "ridge-pairwise", "--ensemble", "2")
SAME = (*STAGE2, "--interaction-surrogate", "same")  # the map on the run's (fast) ridge surrogate


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    root = tmp_path_factory.mktemp("interactions")
    (root / "text.txt").write_text(TEXT)
    save_tiny_llama(root / "tiny", n_layers=L, seed=0)
    assert cli.main(["sample", *_base(root, *RUN)]) == 0
    return root


def run_spec_masks(root) -> np.ndarray:
    run = pipeline.open_run(RunSpec(ModelSpec(name=str(root / "tiny")),
                                    DataSpec(source=str(root / "text.txt"), n_windows=2, seq_len=16),
                                    SamplingSpec(scheme="size-uniform", n_masks=24)), root / "cache")
    return run.store.table().masks


def _base(root, *extra):
    return ["--model", str(root / "tiny"), "--data", str(root / "text.txt"), "--windows", "2", "--seq-len", "16",
            "--cache-dir", str(root / "cache"), "--threads", "1", *extra]


def _both(capsys, argv):
    assert cli.main(argv) == 0, capsys.readouterr()
    human = capsys.readouterr().out
    assert cli.main([*argv, "--json"]) == 0
    return human, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("index", ["sii", "fsii"])
def test_interactions_human_json_and_csv(sampled, capsys, tmp_path, index):
    path = tmp_path / "pairs.csv"
    human, js = _both(capsys, ["interactions", *_base(sampled, *SAME), "--index", index, "--csv", str(path)])
    assert f"({index})" in human and "diagonal:" in human and "± err" in human
    M, se = np.array(js["matrix"]), np.array(js["stderr"])
    assert M.shape == (L, L) and np.allclose(M, M.T) and np.all(se >= 0)
    assert js["index"] == index and js["diagonal"] and js["n_masks"] == 24 and js["fit_on"] == "all"
    assert js["surrogate"] == "ridge-pairwise" and js["folds"] == 5 and "jackknife" in js["details"]["stderr_is"]
    pairs = js["pairs"]
    assert len(pairs) == L * (L - 1) // 2
    assert [abs(p["value"]) for p in pairs] == sorted((abs(p["value"]) for p in pairs), reverse=True)
    assert pairs[0]["value"] == pytest.approx(M[pairs[0]["i"], pairs[0]["j"]])
    # the share of the index's weight on kept counts absent from the store, and the note saying so
    counts = np.unique(run_spec_masks(sampled).sum(axis=1))
    unsampled = 1 - size_weight(index, L)[counts].sum()
    assert js["details"]["unsampled_weight_fraction"] == pytest.approx(unsampled)
    assert js["details"]["sampled_sizes"] == counts.tolist()
    assert ("weight is on kept-layer counts the run never sampled" in human) == (unsampled >= 0.005)
    if index == "fsii":
        assert abs(js["details"]["efficiency"]["gap"]) < 1e-8
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == len(pairs) + L and rows[0]["kind"] == "pair" and rows[-1]["kind"] == "diagonal"
    assert float(rows[0]["value"]) == pytest.approx(pairs[0]["value"])
    # stored for the app under the same settings
    run = pipeline.open_run(RunSpec(ModelSpec(name=str(sampled / "tiny")),
                                    DataSpec(source=str(sampled / "text.txt"), n_windows=2, seq_len=16),
                                    SamplingSpec(scheme="size-uniform", n_masks=24)), sampled / "cache")
    ridge = MethodSpec(surrogate=SurrogateSpec(kind="ridge-pairwise", ensemble=2))
    art = pipeline.stored_interactions(run, ridge, index, surrogate="same")
    assert art is not None and not art["stale"] and art["matrix"] == js["matrix"]
    assert pipeline.stored_interactions(run, ridge, index, surrogate="ridge-pairwise")["matrix"] == js["matrix"]
    assert pipeline.stored_interactions(run, ridge, index, folds=0, surrogate="same") is None  # other settings


def test_interactions_bias_check(sampled, capsys):
    human, js = _both(capsys, ["interactions", *_base(sampled, *SAME), "--bias-check"])
    chk = js["bias_check"]
    corrected, se = np.array(chk["corrected"]), np.array(chk["stderr"])
    assert corrected.shape == (L, L) and np.allclose(corrected, corrected.T) and np.all(se[np.triu_indices(L, 1)] > 0)
    assert chk["folds"] == 5 and 0 < chk["covered_weight"] <= 1 and 0 <= chk["outside"] <= L * (L - 1) // 2
    assert "bias check on the real evaluations" in human


def test_interactions_monte_carlo_budget_and_train_fit(sampled, capsys):
    per_base = 1 + L + L * (L - 1) // 2
    _, js = _both(capsys, ["interactions", *_base(sampled, *SAME), "--budget", str(300 * per_base),
                           "--fit-on", "train", "--folds", "0"])
    assert js["method"].startswith("Monte Carlo (300 base masks") and js["fit_on"] == "train"
    assert js["n_evaluations"] == 2 * 300 * per_base
    assert np.all(np.array(js["details"]["monte_carlo_stderr"])[np.triu_indices(L, 1)] > 0)


def test_interactions_default_surrogate_and_jackknife_interval(sampled, capsys):
    human, js = _both(capsys, ["interactions", *_base(sampled, *STAGE2), "--folds", "3"])
    assert js["surrogate"] == "mlp+log-pairwise" and js["folds"] == 3  # the default map surrogate, not the run's ridge
    assert "mlp+log-pairwise ensemble of 2" in human and "90% interval = value ± 1.645 err" in human
    M, se = np.array(js["matrix"]), np.array(js["stderr"])
    iv = js["details"]["interval"]
    np.testing.assert_allclose(np.array(iv["high"]) - M, 1.6448536 * se, rtol=1e-6)
    np.testing.assert_allclose(M - np.array(iv["low"]), 1.6448536 * se, rtol=1e-6)
    allowance, jk = np.array(iv["bias_allowance"]), np.array(iv["jackknife_stderr"])
    iu = np.triu_indices(L, 1)
    assert iv["folds"] == 3 and iv["seed_noise_removed"] and np.all(allowance[iu] > 0)  # MLP and log-pairwise differ
    assert np.all(se >= np.maximum(allowance, jk) - 1e-12)
    _, bare = _both(capsys, ["interactions", *_base(sampled, *STAGE2), "--folds", "0"])
    assert "interval" not in bare["details"] and bare["matrix"] == js["matrix"]  # the same map, ensemble spread only
    assert np.all(np.array(bare["stderr"])[iu] < se[iu])


def test_interactions_rejects_an_unknown_surrogate(sampled, capsys):
    assert cli.main(["interactions", *_base(sampled, *STAGE2), "--interaction-surrogate", "svm"]) != 0
    assert "unknown interaction surrogate 'svm'" in capsys.readouterr().err


def test_candidates_human_and_json(sampled, capsys):
    human, js = _both(capsys, ["candidates", *_base(sampled, *STAGE2), "--remove", "2", "--top", "4"])
    assert "near-optimal removal sets" in human and "k=2" in human and "predicted PPL" in human
    assert js["ks"] == [1, 2] and js["top"] == 4
    k2 = js["candidates"][1]
    assert len(k2["sets"]) == 4 and all(len(s["removed"]) == 2 for s in k2["sets"])
    assert sum(k2["layer_frequency"]) == pytest.approx(2.0)
    preds = [s["predicted"] for s in k2["sets"]]
    assert preds == sorted(preds, reverse=True)
    # 24 size-uniform masks: a k=1 set that was sampled carries its measured perplexity
    k1 = js["candidates"][0]
    assert len(k1["sets"]) == 4 and k1["search"].startswith("exhaustive")
    assert all(s["ppl_low"] <= s["ppl_high"] for s in k1["sets"] if s["ppl_low"] is not None)


def test_candidates_rejects_bad_top(sampled, capsys):
    assert cli.main(["candidates", *_base(sampled, *STAGE2), "--top", "0"]) != 0
    assert "--top must be at least 1" in capsys.readouterr().err
