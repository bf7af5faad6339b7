"""The near-optimal sets explorer (engine.decision.near_optimal_sets) on synthetic value functions."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from engine.decision import near_optimal_sets, swaps_between
from engine.errors import WorkbenchError


def additive(costs):
    """score = 1 - sum of the removed layers' costs."""
    c = np.asarray(costs, dtype=float)
    return lambda m: 1.0 - (~np.asarray(m, dtype=bool)).astype(float) @ c


COSTS = [0.5, 0.01, 0.02, 0.011, 0.3, 0.0105, 0.2, 0.4]  # cheap layers: 1, 5, 3, 2


def test_exhaustive_top_sets_are_the_true_best():
    L, k, top = len(COSTS), 2, 5
    r = near_optimal_sets(additive(COSTS), L, k, top=top)
    brute = sorted(itertools.combinations(range(L), k), key=lambda s: sum(COSTS[i] for i in s))[:top]
    assert [s.removed for s in r.sets] == brute
    assert r.sets[0].removed == (1, 5) and r.search.startswith("exhaustive")
    assert [s.predicted for s in r.sets] == sorted((s.predicted for s in r.sets), reverse=True)
    assert r.sets[0].ppl_predicted == pytest.approx(1.0 / (1 - 0.0205))


def test_layer_frequency_and_interchangeable_pairs():
    L, k, top = len(COSTS), 2, 6
    r = near_optimal_sets(additive(COSTS), L, k, top=top)
    assert sum(r.layer_frequency) == pytest.approx(k)  # each set removes k layers
    assert r.layer_frequency[1] == max(r.layer_frequency) and r.layer_frequency[0] == 0.0
    # the four cheap layers form all 6 sets: each cheap pair (a, b) swaps in 2 set pairs ({c, a} vs {c, b})
    assert {(s.a, s.b) for s in r.swaps} == set(itertools.combinations((1, 2, 3, 5), 2))
    assert all(s.count == 2 for s in r.swaps)
    assert min(s.min_gap for s in r.swaps) == pytest.approx(abs(COSTS[3] - COSTS[5]))


def test_swaps_between_counts_single_exchanges_only():
    sw = swaps_between([(1, 2), (1, 3), (4, 5)], [0.9, 0.8, 0.7])
    assert [(s.a, s.b, s.count) for s in sw] == [(2, 3, 1)]
    assert sw[0].min_gap == pytest.approx(0.1)


def test_beam_search_path_matches_exhaustive_on_an_additive_game():
    L, k, top = 14, 4, 8
    rng = np.random.default_rng(0)
    costs = rng.random(L)
    exhaustive = near_optimal_sets(additive(costs), L, k, top=top)
    beam = near_optimal_sets(additive(costs), L, k, top=top, exhaustive_limit=10)
    assert beam.search.startswith("beam search")
    assert [s.removed for s in beam.sets] == [s.removed for s in exhaustive.sets]


def test_ensemble_interval_measured_and_protect():
    L = len(COSTS)
    f = additive(COSTS)
    members = [additive(np.array(COSTS) * s) for s in (0.9, 1.0, 1.1)]
    r = near_optimal_sets(f, L, 2, top=3, members=members, ppl_full=10.0, measured={(5, 1): 12.5}, protect=[1])
    assert all(1 not in s.removed for s in r.sets)
    best = r.sets[0]
    assert best.removed == (3, 5) and np.isnan(best.ppl_measured)
    assert best.predicted_std > 0 and best.ppl_low < best.ppl_predicted < best.ppl_high
    r2 = near_optimal_sets(f, L, 2, top=3, ppl_full=10.0, measured={(5, 1): 12.5})
    assert r2.sets[0].ppl_measured == 12.5 and np.isnan(r2.sets[0].predicted_std)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["k"] == 2 and len(d["sets"]) == 3 and len(d["layer_frequency"]) == L


def test_bad_requests():
    with pytest.raises(WorkbenchError):
        near_optimal_sets(additive(COSTS), len(COSTS), len(COSTS), top=3)
    with pytest.raises(WorkbenchError, match="top"):
        near_optimal_sets(additive(COSTS), len(COSTS), 2, top=0)
