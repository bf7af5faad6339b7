"""Mask samplers: strata, equal counts, uniqueness, seeds, prefix stability, probabilities."""

import math
from collections import Counter

import numpy as np
import pytest

from engine.config import SamplingSpec
from engine.errors import SamplingError, WorkbenchError
from engine.sampling import (
    default_strata,
    mask_probability,
    masks_to_strings,
    resolve_strata,
    sample_masks,
    size_distribution,
    strata_from_remove_range,
    strings_to_masks,
)


def test_default_strata_paper_and_small_models():
    assert default_strata(32) == (30, 27, 24, 21, 18)
    assert default_strata(16) == (15, 13, 12, 10, 9)
    assert default_strata(12) == (11, 10, 9, 8, 7)
    assert default_strata(4) == (3, 2)
    assert default_strata(2) == (1,)
    with pytest.raises(SamplingError):
        default_strata(1)


def test_remove_range():
    assert strata_from_remove_range(32, 0.1, 0.4) == (29, 26, 24, 22, 19)
    assert strata_from_remove_range(10, 0.0, 0.0) == (9,)  # clipped to L-1
    with pytest.raises(SamplingError):
        strata_from_remove_range(32, 0.5, 0.2)
    spec = SamplingSpec(remove_range=(0.1, 0.4))
    assert resolve_strata(spec, 32) == (29, 26, 24, 22, 19)


@pytest.mark.parametrize("strata", [(0,), (16,), (5, 5)])
def test_bad_strata_are_user_errors(strata):
    with pytest.raises(WorkbenchError, match="strata"):
        sample_masks(SamplingSpec(n_masks=4, strata=strata), 16)


def test_stratified_counts_equal_unique_and_in_strata():
    spec = SamplingSpec(n_masks=500, seed=3)
    masks = sample_masks(spec, 32)
    assert masks.shape == (500, 32) and masks.dtype == bool
    counts = Counter(masks.sum(axis=1).tolist())
    assert counts == {30: 100, 27: 100, 24: 100, 21: 100, 18: 100}
    assert len(set(masks_to_strings(masks))) == 500
    # round-robin: position i is in stratum i % 5
    assert masks[:10].sum(axis=1).tolist() == [30, 27, 24, 21, 18] * 2


def test_seeded_and_prefix_stable():
    big = sample_masks(SamplingSpec(n_masks=300, seed=1), 16)
    for n in (0, 1, 7, 150, 299):
        assert np.array_equal(sample_masks(SamplingSpec(n_masks=n, seed=1), 16), big[:n])
    again = sample_masks(SamplingSpec(n_masks=300, seed=1), 16)
    assert np.array_equal(big, again)
    other = sample_masks(SamplingSpec(n_masks=300, seed=2), 16)
    assert not np.array_equal(big, other)


def test_exhausted_stratum_drops_out_and_rows_stay_unique():
    # L=6, strata (5, 3): C(6,5)=6 masks, C(6,3)=20 masks, 26 in all.
    spec = SamplingSpec(n_masks=26, strata=(5, 3), seed=0)
    masks = sample_masks(spec, 6)
    counts = Counter(masks.sum(axis=1).tolist())
    assert counts == {5: 6, 3: 20}
    assert len(set(masks_to_strings(masks))) == 26
    # prefix-stable across the exhaustion point
    assert np.array_equal(sample_masks(SamplingSpec(n_masks=15, strata=(5, 3)), 6), masks[:15])
    with pytest.raises(SamplingError, match="at most 26"):
        sample_masks(SamplingSpec(n_masks=27, strata=(5, 3)), 6)


def test_large_stratum_rejection_path_unique():
    # C(40, 20) is far above the enumeration threshold: the rejection sampler is used.
    masks = sample_masks(SamplingSpec(n_masks=50, strata=(20,), seed=0), 40)
    assert (masks.sum(axis=1) == 20).all()
    assert len(set(masks_to_strings(masks))) == 50
    assert np.array_equal(sample_masks(SamplingSpec(n_masks=20, strata=(20,)), 40), masks[:20])


def test_size_uniform_unique_prefix_stable_and_covers_sizes():
    spec = SamplingSpec(scheme="size-uniform", n_masks=400, seed=0)
    masks = sample_masks(spec, 10)
    assert len(set(masks_to_strings(masks))) == 400
    sizes = Counter(masks.sum(axis=1).tolist())
    assert set(sizes) == set(range(11))  # every size 0..10 shows up
    assert np.array_equal(sample_masks(SamplingSpec(scheme="size-uniform", n_masks=123), 10), masks[:123])


def test_size_uniform_exhaustive_small_L():
    masks = sample_masks(SamplingSpec(scheme="size-uniform", n_masks=16), 4)
    assert len(set(masks_to_strings(masks))) == 16
    with pytest.raises(SamplingError):
        sample_masks(SamplingSpec(scheme="size-uniform", n_masks=17), 4)


def test_paired_masks_are_followed_by_complements():
    masks = sample_masks(SamplingSpec(scheme="size-uniform", n_masks=60, paired=True, seed=4), 12)
    assert np.array_equal(masks[1::2], ~masks[0::2])
    assert len(set(masks_to_strings(masks))) == 60
    odd = sample_masks(SamplingSpec(scheme="size-uniform", n_masks=59, paired=True, seed=4), 12)
    assert np.array_equal(odd, masks[:59])


def test_paired_with_stratified_is_refused():
    with pytest.raises(SamplingError, match="paired"):
        sample_masks(SamplingSpec(n_masks=4, paired=True), 8)


def test_probabilities_sum_to_one_over_all_masks():
    L = 8
    every = np.array([[(i >> j) & 1 for j in range(L)] for i in range(2**L)], dtype=bool)
    for spec in (SamplingSpec(), SamplingSpec(scheme="size-uniform"), SamplingSpec(strata=(6, 3))):
        p = mask_probability(spec, L, every)
        assert p.sum() == pytest.approx(1.0)
        assert size_distribution(spec, L).sum() == pytest.approx(1.0)
    p = mask_probability(SamplingSpec(strata=(6, 3)), L, every)
    kept = every.sum(axis=1)
    assert np.all(p[(kept != 6) & (kept != 3)] == 0)
    assert p[kept == 6][0] == pytest.approx(1 / (2 * math.comb(8, 6)))


def test_empirical_size_frequencies_match_design():
    spec = SamplingSpec(scheme="size-uniform", n_masks=2000, seed=0)
    masks = sample_masks(spec, 30)  # 2^30 masks: de-duplication barely matters
    freq = np.bincount(masks.sum(axis=1), minlength=31) / 2000
    # size 0 and 30 each have one mask, seen at most once; others ~ 1/31
    assert np.abs(freq[2:29] - 1 / 31).max() < 0.02


def test_mask_strings_round_trip():
    masks = sample_masks(SamplingSpec(n_masks=10), 8)
    assert np.array_equal(strings_to_masks(masks_to_strings(masks), 8), masks)
    assert masks_to_strings(np.array([[True, True, False, True]])) == ["1101"]
