"""engine.active: round plans are design draws plus the masks the ensemble disagrees on most."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from engine import active
from engine.config import SamplingSpec
from engine.errors import SamplingError
from engine.sampling import default_strata, sample_masks

L = 12
DESIGN = SamplingSpec(n_masks=0, seed=3)


def _members(masks):
    """Three 'members' that disagree only on masks without layer 0 (float[3, N])."""
    m = np.asarray(masks, bool)
    base = m.mean(1)
    wobble = np.where(m[:, 0], 0.0, 0.2 + 0.01 * m.sum(1))
    return np.stack([base, base + wobble, base - wobble])


def test_round_sizes():
    assert active.round_sizes(10, 3) == [4, 3, 3]
    assert sum(active.round_sizes(257, 4)) == 257
    with pytest.raises(SamplingError):
        active.round_sizes(10, 0)


def test_round_zero_is_the_design_prefix():
    plan = active.plan_round(DESIGN, L, 0, 40, np.zeros((0, L), bool), None, 0.5)
    np.testing.assert_array_equal(plan.masks, sample_masks(dataclasses.replace(DESIGN, n_masks=40), L))
    assert set(plan.source) == {"design"} and plan.design_used == 40


def test_later_rounds_continue_the_design_and_pick_disagreement():
    r0 = active.plan_round(DESIGN, L, 0, 40, np.zeros((0, L), bool), None, 0.5)
    r1 = active.plan_round(DESIGN, L, 1, 40, r0.masks, _members, 0.5, r0.design_used)
    design = r1.masks[r1.source == "design"]
    chosen = r1.masks[r1.source == "active"]
    assert len(design) == 20 and len(chosen) == 20
    # design rows of both rounds together are the design stream's first 60 masks
    np.testing.assert_array_equal(np.concatenate([r0.masks, design]),
                                  sample_masks(dataclasses.replace(DESIGN, n_masks=60), L))
    assert not chosen[:, 0].any()  # the members disagree only where layer 0 is removed
    kept = set(chosen.sum(1).tolist())
    assert kept <= set(default_strata(L)) and len(kept) > 1  # quotas per kept count
    every = np.concatenate([r0.masks, r1.masks])
    assert len(np.unique(every, axis=0)) == len(every)  # never a mask twice
    again = active.plan_round(DESIGN, L, 1, 40, r0.masks, _members, 0.5, r0.design_used)
    np.testing.assert_array_equal(again.masks, r1.masks)  # deterministic


def test_explore_bounds_and_exhausted_design():
    with pytest.raises(SamplingError, match="explore"):
        active.plan_round(DESIGN, L, 1, 10, np.zeros((0, L), bool), _members, 1.5)
    small = SamplingSpec(n_masks=0, strata=(3,), seed=0)  # C(4, 3) = 4 masks in all
    plan = active.plan_round(small, 4, 0, 10, np.zeros((0, 4), bool), None, 0.5)
    assert len(plan.masks) == 4
