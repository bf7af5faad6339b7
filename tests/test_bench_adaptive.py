"""bench.adaptive on a tiny ground truth: replays count work exactly and score every mode."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bench import adaptive
from bench import ground_truth as gtm
from engine import fidelity
from engine.config import MethodSpec, SamplingSpec, SurrogateSpec
from tests.conftest import save_tiny_llama, write_words

L, WINDOWS, SEQ = 6, 4, 16


@pytest.fixture(scope="module")
def gt_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("adaptive")
    save_tiny_llama(root / "model", n_layers=L, seed=4)
    write_words(root / "cal.txt", 400, seed=10)
    out = root / "gt.npz"
    gtm.build(str(root / "model"), str(root / "cal.txt"), WINDOWS, SEQ, out=out, progress=False)
    return out


def test_full_fidelity_replay_is_the_design_with_its_exact_work(gt_path):
    gt = gtm.load(gt_path)
    design = SamplingSpec(n_masks=24, seed=1)
    rep = adaptive.replay(gt, adaptive.Mode("stratified"), design)
    from engine.sampling import sample_masks

    np.testing.assert_array_equal(rep.masks, sample_masks(design, L))
    assert rep.work == fidelity.count_work(rep.masks, WINDOWS, SEQ)
    np.testing.assert_allclose(rep.samples(gt, design).ppl, gt.lookup_ppl(rep.masks), rtol=1e-9)


def test_multi_fidelity_replay_completes_the_share_and_costs_less(gt_path):
    gt = gtm.load(gt_path)
    design = SamplingSpec(n_masks=24, seed=1)
    mode = adaptive.Mode("mf", first_windows=1, complete=0.25)
    rep = adaptive.replay(gt, mode, design)
    complete = fidelity.evaluated(rep.tokens).all(axis=1)
    assert complete.sum() == 6 and (fidelity.evaluated(rep.tokens).sum(1)[~complete] == 1).all()
    # first looks: one prefix-shared batch per window (each mask on its own, engine.fidelity.first_windows);
    # completions: one batch per set of missing windows
    from engine.sampling import masks_to_strings

    own = fidelity.first_windows(masks_to_strings(rep.masks), WINDOWS, 1, design.seed)
    assert len(set(own)) > 1
    expected = sum(fidelity.count_work(rep.masks[[i for i in range(24) if own[i] == w]], 1, SEQ) for w in set(own))
    expected += sum(fidelity.count_work(rep.masks[[i for i in np.flatnonzero(complete) if own[i] == w]],
                                        WINDOWS - 1, SEQ) for w in set(own))
    assert rep.work == expected < fidelity.count_work(rep.masks, WINDOWS, SEQ)
    for i in np.flatnonzero(~complete):
        assert np.flatnonzero(fidelity.evaluated(rep.tokens[i])).tolist() == list(own[i])
    # completed rows hold exactly the table's losses
    np.testing.assert_allclose(rep.nll[complete], gt.lookup_window_nll(rep.masks[complete]))


def test_points_and_summary(gt_path):
    gt = gtm.load(gt_path)
    cheap = MethodSpec(surrogate=SurrogateSpec(ensemble=2), boot=0)
    table = adaptive.modes(first_windows=1, complete=0.5, rounds=2, explore=0.5)
    rows = [adaptive.point(gt, dataclasses.replace(table[m], method=cheap), 40, 0, (1, 2)) for m in ("stratified", "both")]
    for r in rows:
        assert -1 <= r["spearman_shapley"] <= 1 and r["work"] > 0
        assert all(r[f"ppl_ratio_k{k}"] >= 1.0 - 1e-12 for k in (1, 2))
        assert r["target"] == (r["spearman_shapley"] >= 0.95 and max(r["ppl_ratio_k1"], r["ppl_ratio_k2"]) <= 1.01)
    assert rows[1]["active"] > 0
    s = adaptive.summarise(rows, ["stratified", "both"], [0])
    for r in rows:
        assert s[r["mode"]]["mean_work"] == (r["work"] if r["target"] else None)


def test_walk_stops_at_the_work_cap(gt_path):
    gt = gtm.load(gt_path)
    mode = adaptive.Mode("stratified", method=MethodSpec(surrogate=SurrogateSpec(ensemble=1), boot=0))
    cap = adaptive.replay_work(gt, mode, 24, 0)
    rows = adaptive.walk((str(gt_path), mode, 0, [24, 40], (1,), cap))
    assert [r["n"] for r in rows] == [24] or rows[0]["target"]  # 40 masks cost more than the cap: never run
    assert adaptive.replay_work(gt, adaptive.Mode("a", rounds=2), 24, 0) is None
