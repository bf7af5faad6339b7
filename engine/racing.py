"""Racing removal sets on paired windows: measure many sets on a few windows, more windows only for survivors.

Model-agnostic (numpy + scipy.stats): sets are removal sets (tuples of layer indices), grouped (one
group per k); real measurement is `measure(masks bool[n, L], start, stop) -> (nll float[n, w],
tokens int[n, w])`, the summed NLL and target tokens of each mask on pool windows start..stop-1.

The pool is one fixed order of W windows (engine.pipeline: the validation windows, then the
calibration windows, each shuffled). Look j measures every surviving set on the first n_j windows,
n_j = first * 2**j, the last look on all W (a set carries over whatever it already has: the
incumbent of an earlier race costs nothing). After each look, per group:

1. leader = the lowest mean loss per token over those n_j windows among the group's survivors;
2. **paired bound**: with d_w = loss_c,w - loss_leader,w per window (the same windows, so the shared
   difficulty of a window cancels), set c is dropped when
   mean(d) - t_{n-1, 1 - alpha / J} * sd(d) / sqrt(n) > 0  (J = number of looks);
   a set with a non-finite loss is dropped unless the leader's is non-finite too;
3. **successive halving**: if more than max(finalists, ceil(s / 2)) of the s survivors remain, only that
   many (lowest mean) go on.

Error rate: a set whose mean loss over the whole pool is lower than the leader's is dropped by the
bound with probability at most `alpha` (one-sided paired t bound per look, Bonferroni over the J
looks; the first n_j windows are a uniform draw without replacement from the pool, which only
shrinks the spread). Halving (step 3) is the cost control: it can drop a set the bound has not
shown worse, only while more than `finalists` survive, always keeping the best half by mean; such
sets are counted apart (`Outcome.halved`). The winner is the lowest mean over all W windows among
the sets that reached the last look.

Stopping the swap search (`RaceRule.stop_tied`, decision.race_decide): after a swap round, the search goes
on around the round's winner only when that winner is **shown better** than the incumbent it replaced, by
the same one-sided paired t bound on all W windows at level 1 - alpha (`shown_better`). A round that gains
nothing beyond its interval ends the search for that k; the chosen set is still the lowest mean among every
finished set. Error rate: when the new winner is in truth no better than the incumbent, the search goes on
with probability at most alpha (one wasted round); when it is better, the search stops early with a
probability that falls with the gain (the power of the paired bound over W windows), and then the chosen
set is the new winner, tied with the incumbent on the pool. It saves a round only where one gains nothing:
on SmolLM2-135M at k = 8 (30 layers, 72 windows, 11 candidates) round 1's winner was shown better, so
round 2 (39% of the evaluations) still ran and found the chosen set (bench/README.md, `decide_profile`).

Cost: sum over looks of (survivors x windows new to them) set-window evaluations, with ONE
`measure` call per look and window range for all groups (the evaluator's trie shares prefixes
across the sets of every k). `budget` (set-window evaluations) caps it: when a look does not fit,
each group keeps only as many survivors (lowest mean, at least one) as the remaining budget
measures to the end (`Outcome.budget_hit`); the one survivor per group still finishes, so a race
can overrun its budget by at most (groups x W) evaluations, and says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Hashable, Mapping, Sequence

import numpy as np

from engine.errors import WorkbenchError

Set = tuple[int, ...]
MeasureFn = Callable[[np.ndarray, int, int], tuple[np.ndarray, np.ndarray]]
ProgressFn = Callable[[dict], None]


@dataclass(frozen=True)
class RaceRule:
    """How a race looks at its sets (see the module docstring)."""

    first: int = 2  # windows of the first look (MethodSpec.race_first)
    alpha: float = 0.05  # chance that the bound drops a set better than the leader, over all looks
    finalists: int = 10  # halving never cuts a group below this many survivors
    stop_tied: bool = True  # decision.race_decide: no further swap round around a winner not shown better

    def __post_init__(self):
        if self.first < 2:
            raise WorkbenchError(f"the first look needs at least 2 windows (a paired bound needs a spread); "
                                 f"got {self.first}.")
        if not 0 < self.alpha < 1:
            raise WorkbenchError(f"alpha must be between 0 and 1; got {self.alpha}.")
        if self.finalists < 1:
            raise WorkbenchError(f"finalists must be at least 1; got {self.finalists}.")

    def looks(self, n_windows: int) -> list[int]:
        """Window counts of the looks: first, 2 first, 4 first, ... and the whole pool last."""
        out, n = [], min(self.first, n_windows)
        while n < n_windows:
            out.append(n)
            n *= 2
        return out + [n_windows]


def removal_mask(removed: Sequence[int], L: int) -> np.ndarray:
    m = np.ones(L, dtype=bool)
    m[list(removed)] = False
    return m


class WindowPool:
    """Per-window losses of removal sets on an ordered pool of `n_windows` windows, measured on demand
    as prefixes of the pool (a set measured on windows 0..n-1 is extended, never re-measured).
    `evaluations` counts set-window evaluations spent."""

    def __init__(self, n_layers: int, n_windows: int, measure: MeasureFn):
        if n_windows < 1:
            raise WorkbenchError("the race needs at least one window.")
        self.L, self.W, self._measure = n_layers, n_windows, measure
        self.nll: dict[Set, np.ndarray] = {}  # set -> float[W], NaN where not measured
        self.tok: dict[Set, np.ndarray] = {}  # set -> float[W], 0 where not measured
        self.have: dict[Set, int] = {}  # set -> windows measured (a prefix of the pool)
        self.evaluations = 0
        self.calls = 0
        self.layer_calls = 0  # trie nodes the measure function computed (engine.pipeline's pool counts them)

    def measured(self, s: Set) -> int:
        return self.have.get(s, 0)

    def cost(self, sets: Sequence[Set], stop: int) -> int:
        return sum(max(0, stop - self.measured(s)) for s in sets)

    def extend(self, sets: Sequence[Set], stop: int) -> None:
        """Measure every set on windows up to `stop`: one `measure` call per distinct start."""
        by_start: dict[int, list[Set]] = {}
        for s in dict.fromkeys(sets):
            if self.measured(s) < stop:
                by_start.setdefault(self.measured(s), []).append(s)
        for start, group in sorted(by_start.items()):
            masks = np.stack([removal_mask(s, self.L) for s in group])  # (n, L)
            nll, tok = self._measure(masks, start, stop)
            nll, tok = np.asarray(nll, dtype=np.float64), np.asarray(tok, dtype=np.float64)
            if nll.shape != (len(group), stop - start) or tok.shape != nll.shape:
                raise ValueError(f"measure returned {nll.shape} losses for {len(group)} sets on {stop - start} windows")
            self.calls += 1
            self.evaluations += len(group) * (stop - start)
            for r, s in enumerate(group):
                if s not in self.nll:
                    self.nll[s], self.tok[s] = np.full(self.W, np.nan), np.zeros(self.W)
                self.nll[s][start:stop], self.tok[s][start:stop] = nll[r], tok[r]
                self.have[s] = stop

    def per_token(self, s: Set, n: int) -> np.ndarray:
        """float[n]: mean NLL per token on each of the first n windows (inf where non-finite)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            x = self.nll[s][:n] / self.tok[s][:n]
        return np.where(np.isfinite(x), x, np.inf)

    def mean(self, s: Set, n: int | None = None) -> float:
        """Mean NLL per token over the first n windows (all measured ones by default); inf if non-finite."""
        n = self.measured(s) if n is None else n
        if n == 0:
            return math.inf
        with np.errstate(over="ignore", invalid="ignore"):
            v = float(self.nll[s][:n].sum() / self.tok[s][:n].sum())
        return v if np.isfinite(v) else math.inf

    def ppl(self, s: Set, cols=None) -> float:
        """Perplexity over `cols` (default: every measured window); NaN when one of them is not measured."""
        if s not in self.nll:
            return math.nan
        cols = np.arange(self.measured(s)) if cols is None else np.asarray(cols)
        if len(cols) == 0 or np.any(cols >= self.measured(s)):
            return math.nan
        with np.errstate(over="ignore", invalid="ignore"):
            return float(np.exp(self.nll[s][cols].sum() / self.tok[s][cols].sum()))


@dataclass(frozen=True)
class Outcome:
    """One group's race: the winner and what happened to every set."""

    winner: Set
    finished: tuple[Set, ...]  # sets measured on all W windows, best (lowest mean) first
    dropped: Mapping[Set, int] = field(default_factory=dict)  # set -> windows seen when the bound dropped it
    halved: Mapping[Set, int] = field(default_factory=dict)  # set -> windows seen when halving (or the budget) cut it
    budget_hit: bool = False


def _t_quantile(p: float, df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(p, df))


def shown_worse(pool: WindowPool, sets: Sequence[Set], leader: Set, n: int, level: float) -> list[bool]:
    """Paired one-sided t bound on the first n windows: True where set c is worse than `leader` at `level`."""
    lead = pool.per_token(leader, n)  # (n,)
    q = _t_quantile(level, n - 1) if n >= 2 else math.inf
    out = []
    for s in sets:
        if s == leader:
            out.append(False)
            continue
        x = pool.per_token(s, n)
        if not np.all(np.isfinite(x)):
            out.append(bool(np.all(np.isfinite(lead))))
            continue
        if not np.all(np.isfinite(lead)):
            out.append(False)
            continue
        d = x - lead  # (n,) paired differences
        sd = float(d.std(ddof=1)) if n >= 2 else math.inf
        out.append(bool(d.mean() - q * sd / math.sqrt(n) > 0))
    return out


def shown_better(pool: WindowPool, new: Set, old: Set, alpha: float) -> bool:
    """Paired one-sided t bound on every pool window (both sets measured on all of them): True when `new`
    has a lower mean loss per token than `old` at error rate `alpha` (decision.race_decide's stopping rule)."""
    if pool.measured(new) < pool.W or pool.measured(old) < pool.W or pool.W < 2:
        return False
    return shown_worse(pool, [old], new, pool.W, 1 - alpha)[0]


def race(groups: Mapping[Hashable, Sequence[Set]], pool: WindowPool, rule: RaceRule = RaceRule(),
         budget: int | None = None, progress: ProgressFn | None = None,
         keep: Mapping[Hashable, Set] | None = None) -> dict[Hashable, Outcome]:
    """Race each group's sets on `pool` (module docstring); `budget`: set-window evaluations this race may
    spend (None: no cap); `keep`: per group, a set (the incumbent of an earlier race, measured on every
    window) that neither the bound nor halving nor the budget cuts, so the group's winner is the lowest
    mean over all W windows among the incumbent and the new sets that finish. `progress(event)` is called before each look's
    measurement with {look, looks, windows, sets, evaluations (this look), spent (so far in this race)}."""
    keep = dict(keep or {})

    position = {(g, tuple(sorted(int(i) for i in s))): r for g, ss in groups.items() for r, s in enumerate(ss)}

    def ranked(g, ss, n=None):  # lowest mean on windows all of them have, the kept set, then the given order
        n = min(pool.measured(s) for s in ss) if n is None else n
        return sorted(ss, key=lambda s: (pool.mean(s, n) if n else 0.0, s != keep.get(g), position[g, s]))

    def cut(g, ss, cap, n=None):  # the best `cap` by mean, plus the kept set (measured already: free) wherever it ranks
        order = ranked(g, ss, n)
        top = order[:cap]
        if keep.get(g) in ss and keep[g] not in top:
            top = top + [keep[g]]
        return top, [s for s in order if s not in top]

    alive = {g: list(dict.fromkeys(tuple(sorted(int(i) for i in s)) for s in ss)) for g, ss in groups.items()}
    alive = {g: ss for g, ss in alive.items() if ss}
    dropped: dict = {g: {} for g in alive}
    halved: dict = {g: {} for g in alive}
    hit = {g: False for g in alive}
    looks = rule.looks(pool.W)
    level = 1 - rule.alpha / len(looks)
    start_evals = pool.evaluations
    for j, n in enumerate(looks):
        sets = [s for ss in alive.values() for s in ss]
        cost = pool.cost(sets, n)
        if budget is not None and cost > budget - (pool.evaluations - start_evals):
            left = max(0, budget - (pool.evaluations - start_evals))
            for g, ss in alive.items():  # each group keeps what the budget measures to the end
                to_end = max(1, pool.W - min(pool.measured(s) for s in ss))
                n_keep = max(1, left // (to_end * len(alive)))
                if n_keep < len(ss):
                    alive[g], cut_off = cut(g, ss, n_keep)
                    for s in cut_off:
                        halved[g][s] = pool.measured(s)
                    hit[g] = True
            sets = [s for ss in alive.values() for s in ss]
            cost = pool.cost(sets, n)
        if progress is not None and cost:
            progress({"look": j + 1, "looks": len(looks), "windows": n, "sets": sum(pool.measured(s) < n for s in sets),
                      "evaluations": cost, "spent": pool.evaluations - start_evals})
        pool.extend(sets, n)
        for g, ss in alive.items():
            if len(ss) == 1:
                continue
            leader = ranked(g, ss, n)[0]
            # the kept set is never dropped: it finished an earlier race (measured on every window, so it
            # costs nothing), and the round's winner must beat it over the whole pool, not on a few windows
            worse = [w and s != keep.get(g) for s, w in zip(ss, shown_worse(pool, ss, leader, n, level))]
            for s, w in zip(ss, worse):
                if w:
                    dropped[g][s] = n
            ss = [s for s, w in zip(ss, worse) if not w]
            cap = max(rule.finalists, math.ceil(len(ss) / 2))
            if n < pool.W and len(ss) > cap:
                ss, cut_off = cut(g, ss, cap, n)
                for s in cut_off:
                    halved[g][s] = n
            alive[g] = ss
    out = {}
    for g, ss in alive.items():
        finished = tuple(ranked(g, ss, pool.W))
        out[g] = Outcome(finished[0], finished, dropped[g], halved[g], hit[g])
    return out
