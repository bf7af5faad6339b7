"""Which layers to remove: rank-and-cut, beam search on a surrogate, real verification.

Model-agnostic (numpy only): the surrogate is a value function
`f(masks: bool[n, L]) -> float[n]` (score, higher = better, 1 = no loss) and real
measurement is a callable `measure(masks: bool[n, L]) -> float[n]` of perplexities.
Masks are `True` = layer kept, as everywhere in the engine.

Contract:
- `rank_and_cut(contributions, k)` removes the k lowest contributions (the paper's rule);
  ties go to the lower layer index. Returns the removed layers sorted ascending.
- `beam_search(f, L, k, ...)` searches k-subsets to remove on `f`; every beam step is ONE
  `f` call over all (beam x remaining layer) extensions. Returns the best distinct sets.
- `decide(...)` measures, for every k, the rank-and-cut set and the beam-search candidates
  in ONE `measure` call over all k, then (`swap_rounds` > 0) every single swap of each k's best
  measured set, one `measure` call per round over all k, and keeps the best measured set per k.
- `measure_splits(decisions, L, measures)` re-measures the chosen sets on other splits.
- `near_optimal_sets(f, L, k, top, ...)` (the explorer): the `top` best k-sets by f (exhaustive
  up to EXHAUSTIVE_LIMIT sets, else beam search), ensemble intervals, measured perplexities where
  known, how often each layer is removed among them, and interchangeable pairs (`Swap`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from engine.errors import EstimationError, WorkbenchError

ValueFn = Callable[[np.ndarray], np.ndarray]

RANK_AND_CUT = "rank-and-cut"
VERIFIED_SEARCH = "surrogate search + verification"
SWAP = "swap"  # a candidate found by the real local search (one removed layer traded for a kept one)


@dataclass(frozen=True)
class Candidate:
    """One removal set: what the surrogate predicted and (after verification) what was measured."""

    removed: tuple[int, ...]  # removed layer indices, ascending
    predicted: float  # surrogate score f(mask), higher = better
    source: str  # "rank-and-cut" | "beam" | "rank-and-cut+beam" | "swap"
    ppl_predicted: float = float("nan")  # ppl_full / predicted
    ppl_measured: float = float("nan")  # real perplexity (NaN until measured; raced: on the calibration windows)
    windows: int = 0  # raced: pool windows it was measured on (the race's pool size when it reached the end)
    ppl_raced: float = float("nan")  # raced: perplexity over those windows
    outcome: str = ""  # raced: "finished" | "dropped by the bound" | "cut by halving" | "cut by the budget"


@dataclass(frozen=True)
class Decision:
    """The chosen removal set for one k, with every verified candidate."""

    k: int  # number of layers removed
    removed: tuple[int, ...]  # chosen removed layers, ascending
    kept: tuple[bool, ...]  # keep-mask over the original L layers
    method: str  # "rank-and-cut" | "surrogate search + verification"
    ppl_predicted: float  # ppl_full / surrogate score of the chosen set
    ppl_measured: float  # real perplexity of the chosen set
    ppl_full: float  # real perplexity of the unpruned model (same windows)
    candidates: tuple[Candidate, ...]  # the sets kept for comparison (see decide's n_keep), best measured first
    tied: tuple[tuple[int, ...], ...] = ()  # candidates statistically tied with the chosen set (see tied_on)
    tie_level: float | None = None  # level of the paired bootstrap intervals behind `tied`
    tied_on: str | None = None  # which windows the candidates were compared on (None: not compared)
    validation_ppl: float | None = None  # chosen set's perplexity on those windows
    n_measured: int = 0  # removal sets measured for this k (candidates + the swap search's other sets)
    source: str = ""  # where the chosen set came from: rank-and-cut | beam | swap | baseline:<name> (joined by +)
    evaluations: int = 0  # raced: set-window evaluations spent on this k's sets
    budget_hit: bool = False  # raced: the decision budget cut this k's race short

    @property
    def mask(self) -> np.ndarray:
        """bool[L] keep-mask."""
        return np.array(self.kept, dtype=bool)

    @property
    def mask_str(self) -> str:
        return "".join("1" if b else "0" for b in self.kept)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mask"] = self.mask_str
        return d


def removal_mask(removed: Iterable[int], L: int) -> np.ndarray:
    """bool[L] keep-mask with `removed` dropped."""
    m = np.ones(L, dtype=bool)
    m[list(removed)] = False
    return m


def _check_k(k: int, L: int, n_protected: int = 0) -> None:
    if not 0 <= k <= L - 1 - n_protected:
        raise WorkbenchError(
            f"cannot remove {k} of {L} layers"
            + (f" with {n_protected} protected" if n_protected else "")
            + f": choose k between 0 and {L - 1 - n_protected} (at least one layer must stay)."
        )


def _call(fn: ValueFn, masks: np.ndarray, what: str) -> np.ndarray:
    out = np.asarray(fn(masks), dtype=float).reshape(-1)
    if out.shape[0] != masks.shape[0]:
        raise ValueError(f"{what} returned {out.shape[0]} values for {masks.shape[0]} masks")
    return out


def rank_and_cut(contributions: Sequence[float], k: int) -> tuple[int, ...]:
    """Remove the k layers with the lowest contributions; ties go to the lower index."""
    c = np.asarray(contributions, dtype=float)
    if not np.all(np.isfinite(c)):
        bad = np.flatnonzero(~np.isfinite(c)).tolist()
        raise EstimationError(f"contributions of layers {bad} are not finite; re-run the estimator with more masks.")
    _check_k(k, c.shape[0])
    order = np.lexsort((np.arange(c.shape[0]), c))  # primary key: value, then layer index
    return tuple(sorted(int(i) for i in order[:k]))


def _top_distinct(sets: list[tuple[int, ...]], scores: np.ndarray, n: int) -> list[tuple[tuple[int, ...], float]]:
    """Best n sets by score (NaN last); ties broken by the sorted tuple, for determinism."""
    s = np.where(np.isfinite(scores), scores, -np.inf)
    ranked = sorted(range(len(sets)), key=lambda i: (-s[i], sets[i]))
    return [(sets[i], float(scores[i])) for i in ranked[:n]]


def beam_search(
    f: ValueFn,
    L: int,
    k: int,
    beam_width: int = 8,
    n_candidates: int = 5,
    protect: Iterable[int] = (),
) -> list[Candidate]:
    """Best `n_candidates` distinct k-subsets to remove, by surrogate score (higher = better).

    Greedy beam over removal sets: step t extends each of the `beam_width` best (t-1)-sets
    by one unprotected layer; all extensions of a step go to `f` in one call. The last step
    keeps max(beam_width, n_candidates) sets. k = 0 returns the empty set.
    """
    protect = frozenset(int(p) for p in protect)
    _check_k(k, L, len(protect))
    if beam_width < 1 or n_candidates < 1:
        raise WorkbenchError("beam_width and n_candidates must be at least 1.")
    if k == 0:
        return [Candidate((), float(_call(f, np.ones((1, L), bool), "surrogate")[0]), "beam")]
    free = [j for j in range(L) if j not in protect]
    beam: list[tuple[int, ...]] = [()]
    for step in range(1, k + 1):
        ext = sorted({tuple(sorted(s + (j,))) for s in beam for j in free if j not in s})
        masks = np.ones((len(ext), L), dtype=bool)  # (n, L)
        for r, s in enumerate(ext):
            masks[r, list(s)] = False
        scores = _call(f, masks, "surrogate")
        width = beam_width if step < k else max(beam_width, n_candidates)
        top = _top_distinct(ext, scores, width)
        beam = [s for s, _ in top]
    return [Candidate(s, v, "beam") for s, v in top[:n_candidates]]


def _ppl_from_score(ppl_full: float, score: float) -> float:
    return ppl_full / score if score > 0 and np.isfinite(score) else float("inf")


def swap_neighbours(removed: tuple[int, ...], L: int, protect: frozenset = frozenset()) -> list[tuple[int, ...]]:
    """Every removal set one swap from `removed`: one removed layer put back, one kept (unprotected) layer
    removed instead; k * (L - k - |protected kept|) sets, sorted."""
    free = [j for j in range(L) if j not in removed and j not in protect]
    return sorted({tuple(sorted((set(removed) - {a}) | {b})) for a in removed for b in free})


def _decide_args(contributions, L: int, ks, swap_rounds: int, n_keep, protect):
    """(contributions float[L], protect frozenset, ks sorted distinct): the checks both deciders share."""
    contributions = np.asarray(contributions, dtype=float)
    if contributions.shape != (L,):
        raise ValueError(f"contributions has shape {contributions.shape}, expected ({L},)")
    if swap_rounds < 0 or (n_keep is not None and n_keep < 1):
        raise WorkbenchError("swap_rounds must be >= 0 and n_keep >= 1.")
    return contributions, frozenset(int(p) for p in protect), sorted({int(k) for k in ks})


def decide(
    f: ValueFn,
    contributions: Sequence[float],
    L: int,
    ks: Iterable[int],
    measure: ValueFn,
    ppl_full: float,
    n_verify: int = 5,
    beam_width: int = 8,
    protect: Iterable[int] = (),
    swap_rounds: int = 0,
    n_keep: int | None = None,
) -> list[Decision]:
    """For each k, verify rank-and-cut and the top `n_verify` beam-search sets by real perplexity,
    then search the real game locally: each of `swap_rounds` rounds measures every `swap_neighbours`
    set of each k's best measured set (all k in one `measure` call) and stops for a k once a round
    leaves its best set unchanged. The surrogate ranks near-optimal sets only roughly; the swaps find
    the measured sets around the best one that a later comparison on other windows needs (on the demo,
    the 10 best calibration sets per k; bench/README.md).

    The chosen set is the lowest measured perplexity (non-finite counts as worst); a tie keeps
    rank-and-cut. `candidates` holds rank-and-cut and the `n_keep` best measured sets (all when None),
    `n_measured` counts every set measured. `n_verify=0` measures rank-and-cut alone (no swaps).
    """
    contributions, protect, ks = _decide_args(contributions, L, ks, swap_rounds, n_keep, protect)
    per_k: dict[int, dict[tuple[int, ...], str]] = {}
    for k in ks:
        rc = rank_and_cut(contributions, k)
        sets = {rc: RANK_AND_CUT}
        if n_verify > 0:
            for c in beam_search(f, L, k, beam_width=beam_width, n_candidates=n_verify, protect=protect):
                sets[c.removed] = "rank-and-cut+beam" if c.removed == rc else "beam"
        per_k[k] = sets
    found: dict[int, dict[tuple[int, ...], tuple[float, float]]] = {k: {} for k in ks}  # set -> (predicted, ppl)

    def measure_round(rows: list[tuple[int, tuple[int, ...]]]) -> None:
        if not rows:
            return
        masks = np.stack([removal_mask(s, L) for _, s in rows])  # (n, L)
        predicted, measured = _call(f, masks, "surrogate"), _call(measure, masks, "measure")
        for r, (k, s) in enumerate(rows):
            found[k][s] = (float(predicted[r]), float(measured[r]))

    def best_of(k: int) -> tuple[int, ...]:
        return min(found[k], key=lambda s: (_finite(found[k][s][1]), s))

    measure_round([(k, s) for k in ks for s in per_k[k]])
    searching = [k for k in ks if n_verify > 0]
    for _ in range(swap_rounds):
        start = {k: best_of(k) for k in searching}
        rows = [(k, s) for k in searching for s in swap_neighbours(start[k], L, protect) if s not in found[k]]
        if not rows:
            break
        for k, s in rows:
            per_k[k].setdefault(s, SWAP)
        measure_round(rows)
        searching = [k for k in searching if best_of(k) != start[k]]
        if not searching:
            break

    decisions = []
    for k in ks:
        cands = [
            Candidate(removed=s, predicted=p, source=per_k[k][s], ppl_predicted=_ppl_from_score(ppl_full, p),
                      ppl_measured=m)
            for s, (p, m) in found[k].items()
        ]

        # Best measured first; non-finite last; tie keeps rank-and-cut (source order), then predicted.
        def key(c: Candidate):
            return (_finite(c.ppl_measured), not c.source.startswith(RANK_AND_CUT), -c.predicted, c.removed)

        cands.sort(key=key)
        if n_keep is not None:
            cands = [c for i, c in enumerate(cands) if i < n_keep or c.source.startswith(RANK_AND_CUT)]
        best = cands[0]
        decisions.append(
            Decision(
                k=k,
                removed=best.removed,
                kept=tuple(bool(b) for b in removal_mask(best.removed, L)),
                method=RANK_AND_CUT if best.source.startswith(RANK_AND_CUT) else VERIFIED_SEARCH,
                ppl_predicted=best.ppl_predicted,
                ppl_measured=best.ppl_measured,
                ppl_full=float(ppl_full),
                candidates=tuple(cands),
                n_measured=len(found[k]),
                source=best.source,
            )
        )
    return decisions


RACED = "raced on paired windows"  # Decision.method of a raced decision (engine.racing)
BASELINE = "baseline:"  # source prefix of a baseline criterion's set (baseline:block-influence, ...)


def race_decide(
    f: ValueFn,
    contributions: Sequence[float],
    L: int,
    ks: Iterable[int],
    pool,
    ppl_full: float,
    calibration_cols: Sequence[int],
    validation_cols: Sequence[int] = (),
    n_verify: int = 5,
    beam_width: int = 8,
    protect: Iterable[int] = (),
    swap_rounds: int = 0,
    n_keep: int | None = None,
    extra: Mapping[int, Mapping[tuple[int, ...], str]] | None = None,
    rule=None,
    budget: int | None = None,
    level: float = 0.9,
    seed: int = 0,
    on: str = "",
    progress: Callable[[dict], None] | None = None,
) -> list[Decision]:
    """The verified decision, raced (engine.racing): for each k the candidates (rank-and-cut, the top
    `n_verify` beam-search sets, the sets in `extra[k]` ({set: source}, e.g. the baselines') race on
    `pool` (a racing.WindowPool); then each of `swap_rounds` rounds races the `swap_neighbours` of each
    k's winner not raced before against it (all k in one race), and stops for a k once its winner stays
    or (`rule.stop_tied`, the default) once a round's winner is not shown better than the set it replaced
    (racing.shown_better: paired bound on all the pool's windows).

    The chosen set has the lowest mean loss over all the pool's windows among every set that finished a
    race (so at worst the best of the `extra` sets there); `tied` lists the finished sets whose paired
    bootstrap interval (`level`) of the perplexity ratio to it contains 1; `ppl_measured` is the
    perplexity on the pool's `calibration_cols`, `validation_ppl` on `validation_cols`. `budget` caps the
    set-window evaluations of all races together (`budget_hit`; see racing.race). `n_verify=0`: the
    paper's rule, rank-and-cut alone, measured on the whole pool."""
    from engine import racing, uncertainty

    rule = rule or racing.RaceRule()
    contributions, protect, ks = _decide_args(contributions, L, ks, swap_rounds, n_keep, protect)
    sources: dict[int, dict[tuple[int, ...], list[str]]] = {}
    predicted: dict[int, dict[tuple[int, ...], float]] = {k: {} for k in ks}
    for k in ks:
        src = {rank_and_cut(contributions, k): [RANK_AND_CUT]}
        if n_verify > 0:
            for c in beam_search(f, L, k, beam_width=beam_width, n_candidates=n_verify, protect=protect):
                src.setdefault(c.removed, []).append("beam")
                predicted[k][c.removed] = c.predicted
            for s, name in ((extra or {}).get(k) or {}).items():
                s = tuple(sorted(int(i) for i in s))
                if len(s) == k and not protect & set(s):
                    src.setdefault(s, []).append(name)
        sources[k] = src
    start = pool.evaluations
    hit: dict[int, bool] = {k: False for k in ks}
    finished: dict[int, set] = {k: set() for k in ks}
    outcome: dict[int, dict[tuple[int, ...], str]] = {k: {} for k in ks}

    def run(groups, keep=None, stage=""):
        left = None if budget is None else max(0, budget - (pool.evaluations - start))

        def report(event):
            if progress is not None:
                progress({**event, "stage": stage, "spent_total": pool.evaluations - start})

        out = racing.race(groups, pool, rule, left, report, keep)
        for k, o in out.items():
            finished[k] |= set(o.finished)
            hit[k] |= o.budget_hit
            for s in o.finished:
                outcome[k][s] = "finished"
            for s in o.dropped:
                outcome[k][s] = "dropped by the bound"
            for s in o.halved:
                outcome[k][s] = "cut by the budget" if o.budget_hit and pool.measured(s) < pool.W else "cut by halving"
        return out

    won = run({k: list(sources[k]) for k in ks}, stage="candidates")
    searching = [k for k in ks if n_verify > 0]
    for r in range(swap_rounds):
        if budget is not None and pool.evaluations - start >= budget:
            hit.update({k: True for k in searching})
            break
        groups, keep = {}, {}
        for k in searching:
            new = [s for s in swap_neighbours(won[k].winner, L, protect) if s not in sources[k]]
            for s in new:
                sources[k][s] = [SWAP]
            if new:
                groups[k], keep[k] = [won[k].winner] + new, won[k].winner
        if not groups:
            break
        out = run(groups, keep, stage=f"swap round {r + 1}")
        searching = [k for k in groups if out[k].winner != won[k].winner
                     and (not rule.stop_tied or racing.shown_better(pool, out[k].winner, won[k].winner, rule.alpha))]
        won.update(out)
        if not searching:
            break

    fs = [s for k in ks for s in sources[k] if s not in predicted[k]]
    if fs:
        pred = _call(f, np.stack([removal_mask(s, L) for s in fs]), "surrogate")
        i = 0
        for k in ks:
            for s in sources[k]:
                if s not in predicted[k]:
                    predicted[k][s] = float(pred[i])
                    i += 1
    cal = list(calibration_cols)
    decisions = []
    for k in ks:
        rc = next(s for s, v in sources[k].items() if RANK_AND_CUT in v)

        def key(s):  # lowest mean over the pool; a tie keeps rank-and-cut, then the higher prediction
            return (pool.mean(s) if pool.measured(s) == pool.W else math.inf, s != rc, -predicted[k][s], s)

        done = sorted(finished[k], key=key)
        if not done:  # cannot happen: a race always finishes one set per group
            raise EstimationError(f"no removal set of size {k} was measured on every window.")
        best = done[0]
        rest = sorted((s for s in sources[k] if s not in finished[k] and pool.measured(s) > 0),
                      key=lambda s: (-pool.measured(s), pool.mean(s), s))
        listed = done[: n_keep] if n_keep is not None else done
        listed += [s for s in done[len(listed):] if s == rc or any(x != SWAP and x != "beam" for x in sources[k][s])]
        listed += rest
        cands = tuple(Candidate(
            removed=s, predicted=predicted[k][s], source="+".join(sources[k][s]),
            ppl_predicted=_ppl_from_score(ppl_full, predicted[k][s]), ppl_measured=pool.ppl(s, cal),
            windows=pool.measured(s), ppl_raced=pool.ppl(s), outcome=outcome[k].get(s, "finished"))
            for s in listed)
        cmp = uncertainty.compare_candidates(done, np.stack([pool.nll[s] for s in done]),
                                             np.stack([pool.tok[s] for s in done]), level, seed=seed, chosen=0)
        src = "+".join(sources[k][best])
        decisions.append(Decision(
            k=k, removed=best, kept=tuple(bool(b) for b in removal_mask(best, L)),
            method=RANK_AND_CUT if n_verify == 0 else RACED,
            ppl_predicted=_ppl_from_score(ppl_full, predicted[k][best]), ppl_measured=pool.ppl(best, cal),
            ppl_full=float(ppl_full), candidates=cands, tied=cmp.tied, tie_level=cmp.level,
            tied_on=on or f"{pool.W} windows",
            validation_ppl=pool.ppl(best, validation_cols) if len(validation_cols) else None,
            n_measured=sum(pool.measured(s) > 0 for s in sources[k]), source=src,
            evaluations=int(sum(pool.measured(s) for s in sources[k])), budget_hit=hit[k]))
    return decisions


def _finite(ppl: float) -> float:
    return ppl if np.isfinite(ppl) else np.inf


@dataclass(frozen=True)
class SplitPerplexities:
    """Perplexities of the full model and of each decision's chosen set on one split."""

    split: str
    ppl_full: float
    ks: tuple[int, ...]
    ppl: tuple[float, ...]  # aligned with ks

    def to_dict(self) -> dict:
        return asdict(self)


def measure_splits(decisions: Sequence[Decision], L: int, measures: Mapping[str, ValueFn]) -> dict[str, SplitPerplexities]:
    """Measure the full model and every chosen set on each split (one `measure` call per split)."""
    masks = np.stack([np.ones(L, dtype=bool)] + [d.mask for d in decisions])  # (1 + n_decisions, L)
    out = {}
    for name, measure in measures.items():
        ppl = _call(measure, masks, f"measure[{name}]")
        out[name] = SplitPerplexities(
            split=name,
            ppl_full=float(ppl[0]),
            ks=tuple(d.k for d in decisions),
            ppl=tuple(float(p) for p in ppl[1:]),
        )
    return out


# ---------------------------------------------------------------- near-optimal sets explorer

EXHAUSTIVE_LIMIT = 200_000  # C(L, k) removal sets predicted in one go below this; beam search above


@dataclass(frozen=True)
class NearSet:
    """One near-optimal removal set: the surrogate's prediction with its ensemble interval, and the
    real perplexity when the set was measured."""

    removed: tuple[int, ...]  # removed layer indices, ascending
    predicted: float  # surrogate score (ensemble mean), higher = better
    predicted_std: float  # std of the score over ensemble members (NaN with one member)
    ppl_predicted: float  # ppl_full / predicted
    ppl_low: float  # ppl_full / (predicted + 2 std): the ensemble's optimistic end (NaN without spread)
    ppl_high: float  # ppl_full / (predicted - 2 std): the pessimistic end (inf when it reaches score 0)
    ppl_measured: float = float("nan")  # real calibration perplexity if measured, else NaN


@dataclass(frozen=True)
class Swap:
    """Layers a < b that swap between near-optimal sets: `count` pairs of the top sets are S + {a}
    and S + {b} for some S; `min_gap` is the smallest predicted-score difference of such a pair."""

    a: int
    b: int
    count: int
    min_gap: float


@dataclass(frozen=True)
class NearOptimal:
    """The `top` best removal sets of size k by surrogate prediction, and what they have in common."""

    k: int
    sets: tuple[NearSet, ...]  # best predicted first
    layer_frequency: tuple[float, ...]  # (L,): share of the sets that remove each layer
    swaps: tuple[Swap, ...]  # interchangeable pairs, most frequent first
    search: str  # how the sets were found

    def to_dict(self) -> dict:
        from engine.jsonable import jsonable

        return jsonable({"k": self.k, "search": self.search, "sets": [asdict(s) for s in self.sets],
                         "layer_frequency": self.layer_frequency, "swaps": [asdict(s) for s in self.swaps]})


def _all_removal_sets(L: int, k: int, protect: frozenset) -> list[tuple[int, ...]]:
    free = [j for j in range(L) if j not in protect]
    return list(itertools.combinations(free, k))


def swaps_between(sets: Sequence[tuple[int, ...]], scores: Sequence[float]) -> tuple[Swap, ...]:
    """Pairs of layers exchanged between sets that differ in exactly one layer (see `Swap`)."""
    found: dict[tuple[int, int], list[float]] = {}
    as_sets = [frozenset(s) for s in sets]
    for x in range(len(sets)):
        for y in range(x + 1, len(sets)):
            diff = as_sets[x] ^ as_sets[y]
            if len(diff) == 2:
                a, b = sorted(diff)
                found.setdefault((a, b), []).append(abs(float(scores[x]) - float(scores[y])))
    out = [Swap(a, b, len(g), min(g)) for (a, b), g in found.items()]
    return tuple(sorted(out, key=lambda s: (-s.count, s.min_gap, s.a, s.b)))


def near_optimal_sets(
    f: ValueFn,
    L: int,
    k: int,
    top: int = 10,
    members: Sequence[ValueFn] = (),
    ppl_full: float = 1.0,
    measured: Mapping[tuple[int, ...], float] | None = None,
    protect: Iterable[int] = (),
    beam_width: int | None = None,
    exhaustive_limit: int = EXHAUSTIVE_LIMIT,
) -> NearOptimal:
    """The `top` best k-removal sets by f (exhaustive when C(free layers, k) <= exhaustive_limit,
    one f call; otherwise `beam_search` with width max(beam_width, 4 * top)), each with the
    spread of `members` (the ensemble) as an interval and the measured perplexity from `measured`
    ({removed set: ppl}) when known; plus how often each layer is removed among them and which
    layers swap between them."""
    protect = frozenset(int(p) for p in protect)
    _check_k(k, L, len(protect))
    if top < 1:
        raise WorkbenchError("top must be at least 1.")
    n_sets = math.comb(L - len(protect), k)
    if n_sets <= exhaustive_limit:
        sets = _all_removal_sets(L, k, protect)
        masks = np.ones((len(sets), L), dtype=bool)  # (n, L)
        if k:
            masks[np.repeat(np.arange(len(sets)), k), np.array(sets, dtype=np.int64).reshape(-1)] = False
        ranked = _top_distinct(sets, _call(f, masks, "surrogate"), top)
        search = f"exhaustive ({n_sets:,} sets)"
    else:
        width = max(beam_width or 0, 4 * top)
        ranked = [(c.removed, c.predicted) for c in beam_search(f, L, k, width, top, protect)]
        search = f"beam search (width {width}; {n_sets:,} sets in all)"
    chosen = [s for s, _ in ranked]
    masks = np.stack([removal_mask(s, L) for s in chosen])  # (top, L)
    pred = np.array([v for _, v in ranked])
    if len(members) > 1:
        std = np.stack([_call(g, masks, "ensemble member") for g in members]).std(axis=0, ddof=1)
    else:
        std = np.full(len(chosen), np.nan)
    measured = {tuple(sorted(int(i) for i in s)): float(p) for s, p in (measured or {}).items()}
    out = []
    for s, p, sd in zip(chosen, pred, std):
        spread = np.isfinite(sd)
        out.append(NearSet(
            removed=s, predicted=float(p), predicted_std=float(sd),
            ppl_predicted=_ppl_from_score(ppl_full, float(p)),
            ppl_low=_ppl_from_score(ppl_full, float(p + 2 * sd)) if spread else float("nan"),
            ppl_high=_ppl_from_score(ppl_full, float(p - 2 * sd)) if spread else float("nan"),
            ppl_measured=measured.get(s, float("nan")),
        ))
    freq = np.zeros(L)
    for s in chosen:
        freq[list(s)] += 1
    return NearOptimal(k, tuple(out), tuple(float(x) for x in freq / len(chosen)), swaps_between(chosen, pred), search)
