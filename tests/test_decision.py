"""decision.py on synthetic games whose best removal sets are known in closed form."""

import itertools

import numpy as np
import pytest

from engine.decision import (
    RANK_AND_CUT,
    VERIFIED_SEARCH,
    beam_search,
    decide,
    measure_splits,
    rank_and_cut,
    removal_mask,
)
from engine.errors import EstimationError, WorkbenchError

L = 6
# Pairwise game v(m) = sum a_i m_i + sum_{i<j} b_ij m_i m_j (normalised so v(full) = 1).
# Layers 2 and 3 are complements (b_23 = 2): each alone looks important (phi = a + b/2 = 1.5),
# but removing both costs 2a + b = 3, less than removing layer 5 (phi = 1, the least important
# single layer) together with anything else (>= 1 + 2.5). So the best pair is {2, 3}, and
# rank-and-cut (remove the two lowest phi: 5 and 2) misses it.
A = np.array([10.0, 10.0, 0.5, 0.5, 10.0, 1.0])
B = np.zeros((L, L))
B[2, 3] = 2.0
TOTAL = A.sum() + B.sum()
PHI = A + 0.5 * (B + B.T).sum(1)


def game(masks):
    m = np.asarray(masks, dtype=float)  # (n, L)
    return (m @ A + np.einsum("ni,ij,nj->n", m, B, m)) / TOTAL


def brute_best(f, k):
    sets = list(itertools.combinations(range(L), k))
    vals = f(np.stack([removal_mask(s, L) for s in sets]))
    return sets[int(np.argmax(vals))]


def test_phi_closed_form_and_rank_and_cut_misses_the_best_pair():
    assert PHI.tolist() == [10.0, 10.0, 1.5, 1.5, 10.0, 1.0]
    assert brute_best(game, 2) == (2, 3)
    assert rank_and_cut(PHI, 2) == (2, 5)  # ties between 2 and 3 go to the lower index


def test_rank_and_cut_ties_by_layer_index_and_sorted_output():
    assert rank_and_cut([3.0, 1.0, 1.0, 1.0, 0.5], 2) == (1, 4)
    assert rank_and_cut([1.0, 1.0, 1.0], 2) == (0, 1)
    assert rank_and_cut([1.0, 2.0], 0) == ()


def test_rank_and_cut_refuses_bad_input():
    with pytest.raises(WorkbenchError, match="at least one layer"):
        rank_and_cut([1.0, 2.0, 3.0], 3)
    with pytest.raises(EstimationError, match=r"layers \[1\]"):
        rank_and_cut([1.0, np.nan, 3.0], 1)


def test_beam_search_finds_the_optimum_with_one_f_call_per_step():
    calls = []

    def f(masks):
        calls.append(masks.shape)
        return game(masks)

    cands = beam_search(f, L, 2, beam_width=3, n_candidates=4)
    assert cands[0].removed == (2, 3)
    assert len({c.removed for c in cands}) == 4
    assert [c.predicted for c in cands] == sorted((c.predicted for c in cands), reverse=True)
    assert len(calls) == 2  # one batched call per beam step
    assert calls[0] == (L, L)  # step 1: every single layer
    # Greedy (beam width 1) starts from {5} and cannot reach {2, 3}.
    assert beam_search(game, L, 2, beam_width=1, n_candidates=1)[0].removed != (2, 3)


def test_beam_search_matches_brute_force_for_every_k_and_respects_protect():
    for k in range(1, L - 1):
        assert beam_search(game, L, k, beam_width=L, n_candidates=1)[0].removed == brute_best(game, k)
    for c in beam_search(game, L, 2, beam_width=4, n_candidates=5, protect=(3,)):
        assert 3 not in c.removed
    with pytest.raises(WorkbenchError):
        beam_search(game, L, 5, protect=(0,))


def test_decide_verification_overrules_a_wrong_surrogate():
    ppl_full = 10.0
    # Surrogate slightly wrong: it prefers {2, 5} over the true optimum {2, 3}.
    bias = np.zeros(L)
    bias[[2, 5]] = 0.03

    def surrogate(masks):
        return game(masks) + (~masks) @ bias  # removing 2 or 5 looks cheaper than it is

    assert beam_search(surrogate, L, 2, beam_width=4, n_candidates=1)[0].removed == (2, 5)
    measured = []

    def measure(masks):
        measured.append(masks.shape[0])
        return ppl_full / game(masks)

    decisions = decide(surrogate, PHI, L, [1, 2], measure, ppl_full, n_verify=4, beam_width=4)
    assert len(measured) == 1  # one batched real measurement for all ks
    d1, d2 = decisions
    assert d1.k == 1 and d1.removed == (5,) and d1.method == RANK_AND_CUT
    assert d2.removed == (2, 3) and d2.method == VERIFIED_SEARCH
    assert d2.mask_str == "110011"
    assert d2.ppl_measured == pytest.approx(ppl_full / game(d2.mask[None])[0])
    assert d2.ppl_predicted == pytest.approx(ppl_full / surrogate(d2.mask[None])[0])
    table = {c.removed: c for c in d2.candidates}
    assert (2, 5) in table and table[(2, 5)].source.startswith(RANK_AND_CUT)
    assert table[(2, 3)].ppl_measured < table[(2, 5)].ppl_measured
    assert d2.candidates[0].removed == (2, 3)
    assert d2.to_dict()["mask"] == "110011"


def test_decide_without_verification_is_rank_and_cut_and_nan_is_worst():
    d = decide(game, PHI, L, [2], lambda m: 10.0 / game(m), 10.0, n_verify=0)[0]
    assert d.removed == (2, 5) and d.method == RANK_AND_CUT and len(d.candidates) == 1

    def measure(masks):
        out = 10.0 / game(masks)
        out[np.all(masks == removal_mask((2, 3), L), axis=1)] = np.nan
        return out

    d = decide(game, PHI, L, [2], measure, 10.0, n_verify=3, beam_width=3)[0]
    assert d.removed != (2, 3)
    assert np.isnan(d.candidates[-1].ppl_measured)


def test_measure_splits_one_call_per_split():
    decisions = decide(game, PHI, L, [1, 2], lambda m: 10.0 / game(m), 10.0, n_verify=2)
    calls = {}

    def make(name, scale):
        def measure(masks):
            calls[name] = calls.get(name, 0) + 1
            return scale / game(masks)

        return measure

    out = measure_splits(decisions, L, {"test": make("test", 20.0), "ood": make("ood", 50.0)})
    assert calls == {"test": 1, "ood": 1}
    assert out["ood"].ppl_full == pytest.approx(50.0)
    assert out["test"].ks == (1, 2)
    assert out["test"].ppl[1] == pytest.approx(20.0 / game(decisions[1].mask[None])[0])


def test_swap_neighbours_trade_one_removed_layer_for_one_kept_unprotected_layer():
    from engine.decision import swap_neighbours

    assert swap_neighbours((0, 1), 4) == [(0, 2), (0, 3), (1, 2), (1, 3)]
    assert swap_neighbours((0, 1), 4, frozenset({3})) == [(0, 2), (1, 2)]
    assert swap_neighbours((1,), 3) == [(0,), (2,)]


def test_swaps_find_the_real_best_set_the_surrogate_hides():
    """A surrogate that ranks the best pair {2, 3} last among its beam: verification alone misses it,
    one round of real swaps around the best verified set finds it, and the search stops once a round
    leaves the best set unchanged."""
    ppl_full = 10.0
    wrong = np.zeros(L)
    wrong[3] = 5.0  # the surrogate thinks removing layer 3 is very costly

    def surrogate(masks):
        return game(masks) - (~masks) @ wrong

    calls = []

    def measure(masks):
        calls.append(masks.shape[0])
        return ppl_full / game(masks)

    plain = decide(surrogate, PHI, L, [2], measure, ppl_full, n_verify=2, beam_width=2)[0]
    assert plain.removed != (2, 3) and plain.n_measured == len(plain.candidates)
    calls.clear()
    d = decide(surrogate, PHI, L, [2], measure, ppl_full, n_verify=2, beam_width=2, swap_rounds=5)[0]
    assert d.removed == (2, 3) == brute_best(game, 2)
    assert {c.source for c in d.candidates} >= {"swap"}
    # rounds: verification, swaps around the verified best (finds {2, 3}), swaps around {2, 3} (no change)
    assert len(calls) == 3
    assert d.n_measured == len(set(c.removed for c in d.candidates)) <= len(list(itertools.combinations(range(L), 2)))
    kept = decide(surrogate, PHI, L, [2], measure, ppl_full, n_verify=2, beam_width=2, swap_rounds=5, n_keep=2)[0]
    assert [c.removed for c in kept.candidates][:2] == [c.removed for c in d.candidates][:2]
    assert len(kept.candidates) <= 3 and any(c.source.startswith(RANK_AND_CUT) for c in kept.candidates)
    assert kept.n_measured == d.n_measured
    # no verification: the paper's rule alone, no swaps
    assert decide(surrogate, PHI, L, [2], measure, ppl_full, n_verify=0, swap_rounds=5)[0].n_measured == 1
