"""Ground truth and comparison benchmark on a tiny saved Llama (4 layers, 16 masks)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import ground_truth as gtm
from engine.config import DataSpec, ModelSpec
from engine.data import make_windows
from engine.errors import WorkbenchError
from engine.evaluate import MaskEvaluator, scores
from engine.models import load_model
from engine import shapley
from tests.conftest import save_tiny_llama, write_words

L = 4
WINDOWS, SEQ = 3, 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Saved tiny Llama + byte tokenizer, calibration/test/ood texts, and its ground truth."""
    root = tmp_path_factory.mktemp("compare")
    save_tiny_llama(root / "model", n_layers=L, seed=3)
    for i, name in enumerate(("cal", "test", "ood")):
        write_words(root / f"{name}.txt", 400, seed=i)
    gt = gtm.build(str(root / "model"), str(root / "cal.txt"), WINDOWS, SEQ, out=root / "gt.npz", progress=False)
    return root, gt


def _direct(root, masks):
    lm = load_model(ModelSpec(name=str(root / "model")))
    windows = make_windows(lm.tokenizer, DataSpec(source=str(root / "cal.txt"), n_windows=WINDOWS, seq_len=SEQ))
    ev = MaskEvaluator(lm, windows, prefix_sharing=False)
    return ev.perplexities(masks), ev.ppl_full


def test_codes_round_trip_and_match_shapley_encoding():
    codes = np.arange(16)
    masks = gtm.codes_to_masks(codes, L)
    np.testing.assert_array_equal(gtm.mask_codes(masks), codes)
    np.testing.assert_array_equal(masks, shapley._masks_from_codes(codes, L))
    np.testing.assert_array_equal(gtm.popcount(codes), masks.sum(axis=1))
    assert len(gtm.all_codes(L, k_max=1)) == 1 + L


def test_ground_truth_agrees_with_direct_evaluation(tiny):
    root, gt = tiny
    assert gt.complete and len(gt.codes) == 16
    masks = gtm.codes_to_masks(gt.codes, L)
    ppl, ppl_full = _direct(root, masks)  # independent path: keep_only + the model's own forward
    np.testing.assert_allclose(gt.ppl, ppl, rtol=1e-5)
    assert gt.ppl_full == pytest.approx(ppl_full, rel=1e-6)
    # saved and reloaded identically
    again = gtm.load(root / "gt.npz")
    np.testing.assert_array_equal(again.ppl, gt.ppl)
    assert again.meta["data_hash"] == gt.meta["data_hash"] and again.analysis == gt.analysis
    # per-window losses: (n, W), their perplexity is the mask's, and they survive the round trip
    assert gt.window_nll.shape == (16, WINDOWS) and gt.window_tokens.tolist() == [SEQ - 1] * WINDOWS
    np.testing.assert_allclose(np.exp(gt.window_nll.sum(1) / gt.window_tokens.sum()), gt.ppl, rtol=1e-12)
    np.testing.assert_allclose(np.exp(gt.full_window_nll.sum() / gt.window_tokens.sum()), gt.ppl_full, rtol=1e-12)
    np.testing.assert_array_equal(again.window_nll, gt.window_nll)
    np.testing.assert_array_equal(again.lookup_window_nll(masks[:3]), gt.window_nll[gt.lookup_rows(masks[:3])])


def test_lookup_value_function_and_analysis(tiny):
    root, gt = tiny
    rng = np.random.default_rng(1)
    masks = rng.random((10, L)) < 0.5  # (10, L)
    expected = scores(gt.ppl[gtm.mask_codes(masks)], gt.ppl_full)[0]
    np.testing.assert_allclose(gt.value_function()(masks), expected)
    np.testing.assert_allclose(gt.lookup_ppl(masks[:3]), _direct(root, masks[:3])[0], rtol=1e-5)
    # exact Shapley of the lookup game equals the brute-force permutation average
    f = gt.value_function()
    import itertools

    phi = np.zeros(L)
    for perm in itertools.permutations(range(L)):
        m = np.zeros(L, bool)
        for i in perm:
            before = f(m[None])[0]
            m[i] = True
            phi[i] += f(m[None])[0] - before
    np.testing.assert_allclose(gt.analysis["shapley"], phi / 24, atol=1e-10)
    # optimum: the lowest perplexity among masks with k removed
    for k in (1, 2):
        sel = gtm.popcount(gt.codes) == L - k
        best = gt.optimum(k)[0]
        assert best[1] == pytest.approx(np.nanmin(gt.ppl[sel]))
        assert gt.analysis["optimum"][str(k)][0]["removed"] == list(best[0])


def test_restricted_table_refuses_missing_masks(tiny, tmp_path):
    root, gt = tiny
    part = gtm.build(str(root / "model"), str(root / "cal.txt"), WINDOWS, SEQ, k_max=1, out=tmp_path / "k1.npz",
                     progress=False)
    assert not part.complete and len(part.codes) == 1 + L and "shapley" not in part.analysis
    np.testing.assert_allclose(part.lookup_ppl(np.eye(L, dtype=bool) == 0), gt.lookup_ppl(np.eye(L, dtype=bool) == 0))
    with pytest.raises(WorkbenchError, match="k-max"):
        part.lookup_ppl(np.array([[True, False, False, True]]))


def test_workers_resume_from_parts(tiny, tmp_path):
    root, gt = tiny
    out = tmp_path / "w.npz"
    two = gtm.build(str(root / "model"), str(root / "cal.txt"), WINDOWS, SEQ, out=out, workers=2, progress=False)
    np.testing.assert_allclose(two.ppl, gt.ppl, rtol=1e-6)
    parts = sorted(out.with_suffix(".parts").glob("part_*.npz"))
    assert len(parts) == 16  # one file per chunk: 11 patterns with <= 2 removed + 5 with more
    lm, windows, fp = gtm._load(str(root / "model"), str(root / "cal.txt"), WINDOWS, SEQ, 0, None)
    chunks = gtm.plan(L, None, 1)[0]
    stats = gtm.evaluate_chunks(lm, windows, chunks, out.with_suffix(".parts"), fp, progress=False)
    assert stats["evaluated"] == 0 and stats["reused"] == 16


@pytest.fixture(scope="module")
def tiny6(tmp_path_factory):
    """A trained-looking 6-layer tiny Llama (64 masks) with its ground truth, for the comparison."""
    root = tmp_path_factory.mktemp("compare6")
    save_tiny_llama(root / "model", n_layers=6, seed=4)
    for i, name in enumerate(("cal", "test", "ood")):
        write_words(root / f"{name}.txt", 400, seed=10 + i)
    gtm.build(str(root / "model"), str(root / "cal.txt"), WINDOWS, SEQ, out=root / "gt.npz", progress=False)
    return root


def test_lookup_evaluator_and_samples(tiny6):
    from bench import compare
    from engine.config import SamplingSpec

    gt = gtm.load(tiny6 / "gt.npz")
    ev = compare.LookupEvaluator(gt)
    masks = gtm.codes_to_masks(np.array([63, 62, 31, 5]), 6)
    np.testing.assert_array_equal(ev.perplexities(masks), gt.ppl[[63, 62, 31, 5]])
    assert ev.ppl_full == gt.ppl_full and ev.n_masks == 4
    s = compare.lookup_samples(gt, SamplingSpec(n_masks=20))
    assert s.n == 20 and s.design == SamplingSpec(n_masks=20)
    np.testing.assert_allclose(s.ppl, gt.lookup_ppl(s.masks))
    np.testing.assert_allclose(s.scores, gt.ppl_full / s.ppl)


def test_compare_quick_end_to_end(tiny6, tmp_path, capsys):
    from bench import compare

    out = tmp_path / "results"
    args = ["--quick", "--ground-truth", str(tiny6 / "gt.npz"), "--model", str(tiny6 / "model"),
            "--data", str(tiny6 / "cal.txt"), "--windows", str(WINDOWS), "--seq-len", str(SEQ),
            "--eval-data", str(tiny6 / "test.txt"), str(tiny6 / "ood.txt"),  # default ks: L/8..L/2 -> 1 2 3
            "--n-masks", "24", "--fidelity-n", "16", "24", "--estimators", "paper", "exact", "regression-adjusted",
            "--ensemble", "2", "--mc-masks", "4000", "--fidelity-estimators", "paper", "--val-windows", "4",
            "--out", str(out), "--json"]
    result = compare.main(args)
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["ks"] == [1, 2, 3]
    for name in ("compare.md", "compare.csv", "fidelity.csv", "compare.png", "fidelity.png"):
        assert (out / name).stat().st_size > 0
    gt = gtm.load(tiny6 / "gt.npz")
    rows = {(r["method"], r["k"]): r for r in result["rows"]}
    methods = {m for m, _ in rows}
    assert {"shapley:paper", "shapley:paper:rank-and-cut", "shapley:exact", "sleb", "last", "optimum"} <= methods
    for k in (1, 2, 3):
        # nothing beats the optimum on calibration, and the optimum is the ground truth's
        assert min(r["ppl_calibration"] for (m, kk), r in rows.items() if kk == k) == pytest.approx(
            rows[("optimum", k)]["ppl_calibration"])
        assert rows[("optimum", k)]["ppl_calibration"] == pytest.approx(gt.optimum(k)[0][1])
        assert rows[("last", k)]["removed"] == " ".join(str(i) for i in range(6 - k, 6))
    # held-out perplexities are real measurements: the full-model value differs from calibration
    assert result["ppl_full"][str(tiny6 / "test.txt")] != pytest.approx(gt.ppl_full)
    fid = result["fidelity"]
    assert {(r["n"], r["seed"], r["estimator"]) for r in fid} == {
        (n, s, "paper") for n in (16, 24) for s in (0, 1)}
    for r in fid:
        assert -1 <= r["spearman"] <= 1 and r["rel_l2"] >= 0 and 0 <= r["precision_verified_k2"] <= 1
    assert len(result["verdict"]) == 3 * 3
    # the pipeline's held-out perplexity over the best held-out one among the near-optimal calibration sets
    assert {(r["k"], r["split"]) for r in result["heldout_ratio"]} == {
        (k, str(tiny6 / name)) for k in (1, 2, 3) for name in ("test.txt", "ood.txt")}
    assert all(np.isfinite(r["ratio"]) and r["ratio"] > 0 for r in result["heldout_ratio"])
    for r in result["heldout_ratio"]:  # the default estimator's decision, chosen on 4 validation windows
        assert " ".join(map(str, r["chosen"])) == rows[("shapley:regression-adjusted", r["k"])]["removed"]
        assert all(len(t) == r["k"] and t != r["chosen"] for t in r["tied"])
        assert r["heldout_best_among_chosen_and_tied"] == (r["heldout_best_candidate"] in [r["chosen"], *r["tied"]])
    assert result["val_windows"] == 4
    # held-out splits are measured on every window of seq_len their text holds (the default)
    lm = load_model(ModelSpec(name=str(tiny6 / "model")))
    for name in ("test.txt", "ood.txt"):
        n_tokens = len(lm.tokenizer((tiny6 / name).read_text(), add_special_tokens=False)["input_ids"])
        assert result["eval_windows"][str(tiny6 / name)] == n_tokens // SEQ > WINDOWS
    md = (out / "compare.md").read_text()
    assert "4 validation windows of the calibration text" in md
    assert "Held-out ratio" in md and "rank-and-cut sets" in md and "above the optimum" in md


def test_strata_semivalue_from_a_k_max_table_equals_the_complete_one(tiny, tmp_path):
    root, gt = tiny
    # L=4: strata (3, 2) weigh kept counts 1..4 only, i.e. at most 3 removed
    part = gtm.build(str(root / "model"), str(root / "cal.txt"), WINDOWS, SEQ, k_max=3, out=tmp_path / "k3.npz",
                     progress=False)
    assert not part.complete and "shapley" not in part.analysis
    np.testing.assert_allclose(part.analysis["strata_semivalue"], gt.analysis["strata_semivalue"], rtol=1e-12)
    small = gtm.build(str(root / "model"), str(root / "cal.txt"), WINDOWS, SEQ, k_max=2, out=tmp_path / "k2.npz",
                      progress=False)
    assert "strata_semivalue" not in small.analysis  # kept count 1 is weighted but missing
