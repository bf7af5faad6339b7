"""racing.py and decision.race_decide on synthetic games whose per-window losses, and so the best set, are known."""

import itertools
import math

import numpy as np
import pytest

from engine import racing
from engine.decision import RANK_AND_CUT, race_decide, removal_mask
from engine.errors import WorkbenchError

TOKENS = 100.0


class Game:
    """Per-window loss of removal set s on window w: cost(s) + window difficulty d_w (shared by every set, large)
    + set-window noise e_sw (small): paired differences cancel d_w, as on real text."""

    def __init__(self, L, n_windows, cost, seed=0, noise=0.05, difficulty=1.0):
        self.L, self.W, self.cost = L, n_windows, cost
        rng = np.random.default_rng(seed)
        self.d = rng.normal(0, difficulty, n_windows) + 3.0  # (W,)
        self.noise, self.seed = noise, seed
        self.calls = []

    def loss(self, s):  # float[W], per token
        rng = np.random.default_rng([self.seed, *(1 + i for i in s), 7])
        return self.cost(s) + self.d + rng.normal(0, self.noise, self.W)

    def measure(self, masks, start, stop):
        self.calls.append((masks.shape[0], start, stop))
        sets = [tuple(int(i) for i in np.flatnonzero(~m)) for m in masks]
        nll = np.stack([self.loss(s)[start:stop] * TOKENS for s in sets])
        return nll, np.full(nll.shape, TOKENS)

    def pool_best(self, sets):
        return min(sets, key=lambda s: self.loss(s).mean())


def additive(weights):
    w = np.asarray(weights, dtype=float)
    return lambda s: float(w[list(s)].sum())


def test_looks_double_and_end_on_the_whole_pool():
    assert racing.RaceRule(first=4).looks(72) == [4, 8, 16, 32, 64, 72]
    assert racing.RaceRule(first=4).looks(3) == [3]
    with pytest.raises(WorkbenchError, match="at least 2 windows"):
        racing.RaceRule(first=1)


@pytest.mark.parametrize("seed", range(12))
def test_race_never_drops_the_true_best_and_costs_far_less_than_measuring_all(seed):
    L, k, W = 8, 3, 64
    rng = np.random.default_rng(seed)
    weights = rng.uniform(0.0, 1.0, L)
    game = Game(L, W, additive(weights), seed=seed)
    sets = list(itertools.combinations(range(L), k))  # 56 sets, the answer known: the lowest pool mean
    pool = racing.WindowPool(L, W, game.measure)
    out = racing.race({k: sets}, pool, racing.RaceRule(first=4, alpha=0.05, finalists=5))[k]
    best = game.pool_best(sets)
    assert out.winner == best and best not in out.dropped and best not in out.halved
    assert set(out.finished) | set(out.dropped) | set(out.halved) == set(sets)
    assert pool.evaluations < 0.4 * len(sets) * W  # most sets leave after a few windows
    assert len(game.calls) == len(racing.RaceRule(first=4).looks(W))  # one measure call per look


def test_the_bound_errs_at_most_alpha_between_equal_sets():
    """Two sets with the same expected loss: the bound alone (no halving) drops the better one on the pool
    in at most about alpha of the races."""
    L, W, alpha, reps = 4, 32, 0.1, 300
    wrong = 0
    for seed in range(reps):
        game = Game(L, W, lambda s: 0.0, seed=seed, noise=0.3, difficulty=0.5)
        sets = [(0,), (1,)]
        pool = racing.WindowPool(L, W, game.measure)
        out = racing.race({1: sets}, pool, racing.RaceRule(first=4, alpha=alpha, finalists=2))[1]
        wrong += game.pool_best(sets) in out.dropped
    assert wrong / reps <= alpha + 2 * math.sqrt(alpha * (1 - alpha) / reps)


def test_budget_caps_the_race_keeps_one_per_group_and_says_so():
    L, W = 8, 64
    game = Game(L, W, additive(np.linspace(0.1, 0.8, L)), noise=0.3)
    groups = {k: list(itertools.combinations(range(L), k)) for k in (2, 3)}
    pool = racing.WindowPool(L, W, game.measure)
    out = racing.race(groups, pool, racing.RaceRule(first=4, finalists=10), budget=600)
    assert all(o.budget_hit and o.finished for o in out.values())
    assert pool.evaluations <= 600 + len(groups) * W  # at most one finishing set per group beyond the budget
    free = racing.WindowPool(L, W, game.measure)
    assert not any(o.budget_hit for o in racing.race(groups, free, racing.RaceRule(first=4)).values())


def test_an_incumbent_kept_is_never_cut_by_halving_nor_dropped_by_the_bound():
    """The kept set finished an earlier race: the round's winner must beat it over the whole pool. With noise
    this small, (5, 6) is shown worse than the leader on the first look; without `keep` the bound drops it."""
    L, W = 8, 64
    game = Game(L, W, additive(np.linspace(0.1, 0.8, L)), noise=0.01)
    sets = list(itertools.combinations(range(L), 2))
    worst_ok = (5, 6)
    pool = racing.WindowPool(L, W, game.measure)
    pool.extend([worst_ok], W)  # measured before: costs nothing now
    spent = pool.evaluations
    out = racing.race({2: sets}, pool, racing.RaceRule(first=4, finalists=1), keep={2: worst_ok})[2]
    assert worst_ok not in out.halved and worst_ok not in out.dropped and worst_ok in out.finished
    assert out.winner == (0, 1) and pool.evaluations > spent
    free = racing.race({2: sets}, racing.WindowPool(L, W, game.measure), racing.RaceRule(first=4, finalists=1))[2]
    assert worst_ok in free.dropped  # the same race without keep: the bound drops it


# ---------------------------------------------------------------- the decision, raced


def _decide(game, ks, surrogate, contributions, **kw):
    pool = racing.WindowPool(game.L, game.W, game.measure)
    cal = list(range(game.W - 8, game.W))
    ds = race_decide(surrogate, contributions, game.L, ks, pool, 10.0, cal, list(range(game.W - 8)),
                     n_verify=2, beam_width=2, **kw)
    return ds, pool


def test_raced_decision_only_decides_the_ks_asked_and_a_baseline_set_can_win():
    L, W = 8, 48
    weights = np.array([1.0, 1.0, 0.9, 0.05, 0.06, 1.0, 1.0, 1.0])  # best pair {3, 4}
    game = Game(L, W, additive(weights))
    wrong = np.array([0.1, 0.2, 0.3, 0.9, 0.9, 0.4, 0.5, 0.6])  # a surrogate and contributions that point away

    def surrogate(masks):
        return (np.asarray(masks, float) @ wrong) / wrong.sum()

    ds, pool = _decide(game, [2], surrogate, wrong, extra={2: {(3, 4): "baseline:block-influence"}})
    assert [d.k for d in ds] == [2]
    d = ds[0]
    assert d.removed == (3, 4) and d.source == "baseline:block-influence" and d.method != RANK_AND_CUT
    assert d.evaluations == pool.evaluations < 3 * W and d.n_measured >= 3  # the others left early
    assert d.ppl_measured == pytest.approx(math.exp(game.loss((3, 4))[-8:].mean()))
    assert d.validation_ppl == pytest.approx(math.exp(game.loss((3, 4))[:-8].mean()))
    assert any(c.source.startswith("baseline:") for c in d.candidates)
    # without the baseline set the swap search still walks there from the surrogate's wrong sets
    ds, _ = _decide(game, [2], surrogate, wrong, swap_rounds=4)
    assert ds[0].removed == (3, 4) and "swap" in ds[0].source


def test_raced_decision_budget_is_respected_and_reported():
    L, W = 8, 64
    game = Game(L, W, additive(np.linspace(0.1, 0.8, L)), noise=0.3)
    f = lambda masks: np.asarray(masks, float).mean(1)  # noqa: E731
    ds, pool = _decide(game, [2, 3], f, np.linspace(0.1, 0.8, L), swap_rounds=3, budget=500)
    assert all(d.budget_hit for d in ds) and pool.evaluations <= 500 + 2 * W
    full, pool2 = _decide(game, [2, 3], f, np.linspace(0.1, 0.8, L), swap_rounds=3)
    assert not any(d.budget_hit for d in full) and pool2.evaluations > pool.evaluations
    assert all(removal_mask(d.removed, L).sum() == L - d.k for d in ds)


def test_shown_better_needs_a_paired_gain_beyond_the_noise():
    L, W = 6, 64
    game = Game(L, W, additive([0.0, 0.2, 0.2002, 1, 1, 1]), noise=0.05)
    pool = racing.WindowPool(L, W, game.measure)
    pool.extend([(0,), (1,), (2,)], W)
    assert racing.shown_better(pool, (0,), (1,), 0.05)  # 0.2 per token better on every window
    assert not racing.shown_better(pool, (1,), (0,), 0.05)
    assert not racing.shown_better(pool, (1,), (2,), 0.05)  # 0.0002: within the noise
    part = racing.WindowPool(L, W, game.measure)
    part.extend([(0,), (1,)], 8)
    assert not racing.shown_better(part, (0,), (1,), 0.05)  # only on every pool window


def test_swap_rounds_stop_once_a_round_gains_nothing_beyond_its_interval():
    """A flat game (every set costs the same): round 1's winner is tied with the incumbent, so with stop_tied
    no second round is raced; without, the rounds go on while the winner changes."""
    L, W = 10, 32
    game = Game(L, W, lambda s: 0.0, noise=0.05)
    f = lambda masks: np.asarray(masks, float).mean(1)  # noqa: E731
    c = np.linspace(0.1, 0.8, L)
    stop, p_stop = _decide(game, [3], f, c, swap_rounds=4, rule=racing.RaceRule(first=4, finalists=2))
    go, p_go = _decide(game, [3], f, c, swap_rounds=4, rule=racing.RaceRule(first=4, finalists=2, stop_tied=False))
    assert p_stop.evaluations < p_go.evaluations
    n_swap = lambda d: sum(x.source == "swap" for x in d.candidates)  # noqa: E731
    assert n_swap(stop[0]) <= 3 * (L - 3)  # one round of swaps at most
    assert n_swap(go[0]) > 3 * (L - 3)
