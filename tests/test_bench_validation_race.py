"""bench.validation_race on a tiny model with its complete ground truth: the pipeline's raced decision through
the per-set window cache (fresh, then read back), the pre-race decision's cost, the summary's pairing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bench import ground_truth as gtm
from bench import validation_race as vr
from engine.config import MethodSpec, SurrogateSpec
from tests.conftest import build_tiny_lm, byte_tokenizer, write_words

L, N_CAL, T, N_VAL = 6, 4, 16, 8


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    from engine.config import DataSpec
    from engine.data import make_windows
    from engine.evaluate import MaskEvaluator

    path = write_words(tmp_path_factory.mktemp("text") / "text.txt", 1500, seed=0)
    lm = build_tiny_lm("llama", n_layers=L, seed=0, tokenizer=byte_tokenizer())
    windows = make_windows(lm.tokenizer, DataSpec(source=str(path), n_windows=N_CAL, seq_len=T))
    codes = gtm.all_codes(L)
    nll, tok = MaskEvaluator(lm, windows).window_losses(gtm.codes_to_masks(codes, L))  # (2^L, N_CAL)
    ppl = np.exp(nll.sum(1) / tok.sum(1))
    gt = gtm.GroundTruth(L, codes, ppl, float(ppl[-1]), {"model": "tiny", "data": str(path), "n_windows": N_CAL,
                                                        "seq_len": T}, window_nll=nll, full_window_nll=nll[-1],
                         window_tokens=tok[-1])
    return vr.context(gt, lm=lm, val_windows=N_VAL)


@pytest.fixture(scope="module")
def fit(ctx):
    from bench.compare import lookup_samples
    from engine import method
    from engine.config import SamplingSpec

    spec = MethodSpec(surrogate=SurrogateSpec(kind="ridge-pairwise"), boot=0, val_windows=N_VAL, swaps=1)
    samples = lookup_samples(ctx.gt, SamplingSpec(n_masks=32))
    f = method.fit(samples, spec.surrogate, curve=False)
    return f, method.contributions(samples, f, spec), spec


def test_a_fresh_race_is_read_back_from_the_cache_in_any_pool_order(ctx, fit, tmp_path):
    from engine.decision import removal_mask
    from engine.evaluate import MaskEvaluator
    from engine.pipeline import stages

    f, c, spec = fit
    W = N_VAL + N_CAL
    cache = vr.RaceCache(tmp_path / "race.npz", W)
    fresh = vr.raced_decision(ctx, f, c, spec, 2, cache, fresh=True)
    assert fresh["model_evaluations"] == fresh["evaluations"] > 0 and fresh["cached_evaluations"] == 0
    assert fresh["calibration_max_abs_diff_vs_ground_truth"] < 1e-3  # the model's losses are the ground truth's
    cache.save()
    again = vr.raced_decision(ctx, f, c, spec, 2, vr.RaceCache(tmp_path / "race.npz", W), fresh=False)
    assert (again["chosen"], again["evaluations"], again["source"]) == (fresh["chosen"], fresh["evaluations"],
                                                                          fresh["source"])
    assert again["model_evaluations"] == 0 and again["cached_evaluations"] == again["evaluations"]
    # another mc_seed shuffles the pool: the cache must still hand each window its own losses
    other = dataclasses.replace(spec, mc_seed=1)
    pool, *_ = vr.cached_pool(ctx, other, vr.RaceCache(tmp_path / "race.npz", W), fresh=False)
    m = removal_mask(fresh["chosen"], L)[None]  # (1, L)
    nll, tok = pool._measure(m, 0, W)
    ids, _ = stages.decision_windows(ctx.run, other)
    want_nll, want_tok = MaskEvaluator(ctx.run.lm, ids).window_losses(m)
    np.testing.assert_allclose(nll, want_nll, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(tok, want_tok)


def test_the_pre_race_decision_counts_calibration_and_validation_evaluations(ctx, fit):
    f, c, spec = fit
    r = vr.prerace_decision(ctx, f, c, spec, 2, vr.RaceCache(None, N_VAL + N_CAL), fresh=True)
    assert r["calibration_evaluations"] == r["sets_raced"] * N_CAL
    assert r["validation_evaluations"] == r["compared"] * N_VAL
    assert r["evaluations"] == r["model_evaluations"] == r["calibration_evaluations"] + r["validation_evaluations"]


def test_summary_pairs_each_decision_with_the_first_race_on_the_same_seed_and_k():
    def row(seed, k, first, ev, s, ratio, chosen):
        return {"seed": seed, "k": k, "decision": "race" if first else vr.PRE_RACE, "race_first": first,
                "evaluations": ev, "seconds": s, "testall_ratio": ratio, "chosen": chosen}

    rows = [row(0, 2, 2, 100, 1.0, 1.0, [1, 2]), row(0, 2, 4, 150, 2.0, 1.02, [1, 3]),
            row(0, 2, None, 400, 4.0, 1.0, [1, 2]), row(1, 2, 2, 100, 1.0, 1.005, [0, 1]),
            row(1, 2, 4, 250, 2.0, 1.0, [0, 1]), row(1, 2, None, 400, 4.0, 1.0, [0, 1])]
    s = vr.summary(rows, [2])
    assert s["race_first=2"]["seeds_all_k_within_1pct"] == "2/2" and s["race_first=4"]["seeds_all_k_within_1pct"] == "1/2"
    assert s["race_first=4 over race_first=2"] == {"evaluations": 2.0, "seconds": 2.0, "same_set": "1/2"}
    assert s["pre-race over race_first=2"]["evaluations"] == 4.0 and s["pre-race"]["max_ratio"] == {2: 1.0}
