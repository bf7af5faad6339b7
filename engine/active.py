"""Active sampling rounds: which masks to evaluate next, given what the surrogate ensemble knows (numpy only).

A run with R rounds evaluates round 0 from the sampling design (the first masks of its seeded,
prefix-stable stream), fits the surrogate ensemble, and then plans each further round as

* a share `explore` of *design* masks: the next masks of the same stream, so the design rows of all
  rounds together are exactly a design sample (uniform within each kept count). Estimators that
  rely on the design probabilities (the regression adjustment's post-stratified correction) use
  these rows only;
* the rest *active* masks, chosen by query by committee: from a pool of POOL_FACTOR fresh design
  draws per active mask, the masks on which the ensemble members disagree most (largest standard
  deviation of their predicted scores), with each kept count getting its design share of the picks.

Why disagreement: the contributions are linear in the surrogate's values, so their error is the
surrogate's error integrated over the coalitions each estimand weighs; where independently
initialised members disagree the fit is least determined, and a real evaluation there removes the
most of that error. The same masks are where the decision's near-optimal sets are least certain
(the best masks of each size are the ones whose scores are large and uncertain; catastrophic
masks sit near score 0 for every member). Keeping the design's per-size quota stops the rule
from spending every evaluation on one size, and the design share keeps an unbiased sample.

Plans are deterministic: the design stream is seeded by the sampling seed and the pool of round r
by (seed, r), and the ensemble is fitted deterministically on the rows of rounds < r; a killed run
that stored its plan resumes the same round with the same masks.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from engine.config import SamplingSpec
from engine.errors import SamplingError
from engine.sampling import sample_masks, size_distribution

POOL_FACTOR = 20  # pool draws per active mask
MemberPredict = Callable[[np.ndarray], np.ndarray]  # masks bool[N, L] -> float[M, N], one row per member


@dataclass(frozen=True)
class RoundPlan:
    """The masks of one round, in evaluation order."""

    round: int
    masks: np.ndarray  # bool[n, L]
    source: np.ndarray  # str[n]: "design" | "active"
    design_used: int  # masks of the design stream consumed by this and earlier rounds

    def to_dict(self) -> dict:
        from engine.sampling import masks_to_strings

        return {"round": self.round, "masks": masks_to_strings(self.masks), "source": [str(s) for s in self.source],
                "design_used": self.design_used}


def round_sizes(n_masks: int, rounds: int) -> list[int]:
    """Masks per round: n_masks split as evenly as possible, earlier rounds first to get the extra one."""
    if rounds < 1:
        raise SamplingError(f"rounds must be at least 1; got {rounds}.")
    base, extra = divmod(int(n_masks), rounds)
    return [base + (1 if r < extra else 0) for r in range(rounds)]


def _pool_seed(seed: int, round_index: int) -> int:
    return int(np.random.SeedSequence([int(seed), 7, int(round_index)]).generate_state(1)[0])


def _keys(masks: np.ndarray) -> list[bytes]:
    return [np.packbits(m).tobytes() for m in np.asarray(masks, dtype=bool)]


def _design_part(design: SamplingSpec, L: int, start: int, n: int, taken: set[bytes]) -> tuple[np.ndarray, int]:
    """The next `n` masks of the design stream after position `start` that are not in `taken`;
    returns (masks bool[n', L], new stream position). n' < n only when the design is exhausted."""
    got: list[np.ndarray] = []
    pos, ask, capacity = start, n, design_capacity(design, L)
    while len(got) < n and pos < capacity:
        stream = sample_masks(dataclasses.replace(design, n_masks=min(pos + ask, capacity)), L)  # prefix-stable
        for m in stream[pos:]:
            pos += 1
            k = np.packbits(m).tobytes()
            if k not in taken:
                taken.add(k)
                got.append(m)
                if len(got) == n:
                    break
        ask *= 2
    return (np.array(got, dtype=bool).reshape(-1, L), pos)


def design_capacity(design: SamplingSpec, L: int) -> int:
    """Distinct masks the design can draw: every mask of each kept count it gives weight to."""
    p = size_distribution(design, L)
    return int(sum(math.comb(L, k) for k in np.flatnonzero(p > 0)))


def _pool(design: SamplingSpec, L: int, round_index: int, n: int, taken: set[bytes]) -> np.ndarray:
    """Up to `n` fresh design draws (seeded by the round), without the masks in `taken`."""
    spec = dataclasses.replace(design, seed=_pool_seed(design.seed, round_index),
                               n_masks=min(n, design_capacity(design, L)))
    draws = sample_masks(spec, L)
    keep = [i for i, k in enumerate(_keys(draws)) if k not in taken]
    return draws[keep]


def disagreement(member_predictions: np.ndarray) -> np.ndarray:
    """float[N]: standard deviation over ensemble members of the predicted scores float[M, N]."""
    p = np.asarray(member_predictions, dtype=np.float64)
    return p.std(axis=0, ddof=1) if p.shape[0] > 1 else np.zeros(p.shape[1])


def _quotas(design: SamplingSpec, L: int, n: int, available: np.ndarray) -> np.ndarray:
    """int[L + 1]: picks per kept count, proportional to the design's size distribution over the
    counts that have pool members (largest remainders), capped by what is available."""
    p = size_distribution(design, L) * (available > 0)
    if p.sum() == 0:
        return np.zeros(L + 1, dtype=int)
    want = p / p.sum() * n
    q = np.floor(want).astype(int)
    for k in np.argsort(-(want - q), kind="stable")[: n - q.sum()]:
        q[k] += 1
    q = np.minimum(q, available)
    spare = n - q.sum()
    while spare > 0 and (available - q).sum() > 0:  # hand a full count's picks to the others
        for k in np.flatnonzero(available - q > 0):
            if spare == 0:
                break
            q[k] += 1
            spare -= 1
    return q


def choose_active(pool: np.ndarray, member_predictions: np.ndarray, n: int, design: SamplingSpec) -> np.ndarray:
    """int[<= n]: pool rows with the largest disagreement, per kept count in the design's proportions."""
    L = pool.shape[1]
    kept = pool.sum(axis=1)  # (N,)
    spread = disagreement(member_predictions)  # (N,)
    quota = _quotas(design, L, n, np.bincount(kept, minlength=L + 1))
    picks = []
    for k in np.flatnonzero(quota):
        rows = np.flatnonzero(kept == k)
        picks.append(rows[np.argsort(-spread[rows], kind="stable")[: quota[k]]])
    return np.concatenate(picks) if picks else np.zeros(0, dtype=np.int64)


def plan_round(design: SamplingSpec, n_layers: int, round_index: int, n_new: int, evaluated_masks,
               member_predict: MemberPredict | None, explore: float, design_used: int = 0) -> RoundPlan:
    """The masks of round `round_index` (module docstring).

    evaluated_masks bool[m, L]: every mask planned or evaluated before this round (never chosen
    again). member_predict: the ensemble fitted on the earlier rounds (None in round 0, which is
    all design). explore: share of a later round drawn from the design stream. design_used: the
    design stream position after the previous round (`RoundPlan.design_used`)."""
    if not 0.0 <= explore <= 1.0:
        raise SamplingError(f"explore must be a fraction between 0 and 1; got {explore}.")
    L = n_layers
    taken = set(_keys(np.asarray(evaluated_masks, dtype=bool).reshape(-1, L)))
    n_design = n_new if round_index == 0 or member_predict is None else int(round(explore * n_new))
    design_masks, used = _design_part(design, L, design_used, n_design, taken)
    active_masks = np.zeros((0, L), dtype=bool)
    n_active = n_new - len(design_masks)
    if n_active > 0 and member_predict is not None:
        pool = _pool(design, L, round_index, POOL_FACTOR * n_active, taken)
        if len(pool):
            active_masks = pool[choose_active(pool, member_predict(pool), n_active, design)]
    masks = np.concatenate([design_masks, active_masks])
    source = np.array(["design"] * len(design_masks) + ["active"] * len(active_masks), dtype="<U6")
    return RoundPlan(int(round_index), masks, source, int(used))
