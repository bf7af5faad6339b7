"""Pairwise interaction indices of a value function over keep-masks (numpy only).

Like engine.shapley, everything takes value functions ``f(masks: bool[n, L]) -> float[n]``
(``True`` = layer kept; a fitted surrogate is one) and calls them on large batches. Nothing
here knows about models.

Four indices, each at order 2 (pairs) with its own order-1 values on the diagonal:

- ``sii``: Shapley interaction index (Grabisch & Roubens 1999). Diagonal: Shapley values.
- ``stii``: Shapley-Taylor index of order 2 (Sundararajan et al. 2020). Diagonal: the order-1
  terms f({i}) - f({}) (Möbius values). Efficient: sum(diagonal) + sum(upper) = f(N) - f({}).
- ``fsii``: Faithful Shapley interaction index of order 2 (Tsai, Yeh & Ravikumar 2023): the
  best second-order game in the Shapley-kernel-weighted least-squares sense. Diagonal: its
  order-1 terms. Efficient like STII.
- ``banzhaf``: Banzhaf interaction index (Roubens 1996). Diagonal: Banzhaf values.

Two equivalent forms define each index (both are implemented and tested against each other):

    Möbius form:      I_T = sum_{S ⊇ T} a(S) * omega_t(|S|),   a = Möbius transform of f
    derivative form:  I_T = sum_{S ⊆ N \\ T} p_t(|S|) * Δ_T f(S),
                      Δ_ij f(S) = f(S+ij) - f(S+i) - f(S+j) + f(S),  Δ_i f(S) = f(S+i) - f(S)

with t = |T| in {1, 2}. `index_weights` holds omega and p (p from omega by exact rational
binomial inversion, so it is exact at L = 80 too).

Exact (L <= EXACT_MAX_L): f on all 2^L masks, one Möbius butterfly and two superset-sum
butterflies over the 2^L values (O(L 2^L), vectorised; no per-pair loop).
Monte Carlo (any L): base masks m drawn by kept count (uniform counts for the Shapley family,
Binomial(L, 1/2) for Banzhaf), f at m, at its L one-layer flips and at its L(L-1)/2 two-layer
flips (1 + L + L(L-1)/2 evaluations per base); every base gives one importance-weighted Δ term
for every pair and every layer at once, so the standard errors come from the per-base spread.

Uncertainty (`Interactions.stderr`): sqrt(Monte Carlo variance + variance over the surrogate
ensemble members). Neither covers the surrogate's bias where it extrapolates: a surrogate
fitted only on masks of some kept counts is queried by these indices at every count.
`details['size_weight']` is the share of the index's (absolute) weight on each kept count and
`details['unsampled_weight_fraction']` the share on counts the run did not sample; read values
with that fraction in mind (the paper's strata leave most of the SII weight unsampled).

Intervals over the evaluated masks (jackknife, residual check) and the index on the sampled kept counts
live in engine/interaction_intervals.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np

from engine.errors import EstimationError
from engine.jsonable import jsonable
from engine.registry import Registry
from engine.shapley import DEFAULT_CHUNK, _evaluate, _masks_from_codes, _random_masks_of_sizes

ValueFn = Callable[[np.ndarray], np.ndarray]

INDICES: Registry[str] = Registry("interaction index", {
    "sii": "Shapley interaction index",
    "stii": "Shapley-Taylor interaction index (order 2)",
    "fsii": "Faithful Shapley interaction index (order 2)",
    "banzhaf": "Banzhaf interaction index",
}, error=EstimationError)
DIAGONAL = {
    "sii": "Shapley values (order-1 SII)",
    "stii": "order-1 STII terms f({i}) - f({}); sum(diagonal) + sum(upper triangle) = f(N) - f({})",
    "fsii": "order-1 FSII terms; sum(diagonal) + sum(upper triangle) = f(N) - f({})",
    "banzhaf": "Banzhaf values (order-1 Banzhaf interaction index)",
}
EFFICIENT = ("stii", "fsii")
EXACT_MAX_L = 22  # 2^22 values: 32 MiB per array, a few seconds per surrogate
DEFAULT_SAMPLES = 2_000  # Monte Carlo base masks (each costs 1 + L + L(L-1)/2 evaluations)
DRAW_BLOCK = 64  # base masks per batch of flips: (64 * (1 + L + L(L-1)/2), L) masks at a time


# ---------------------------------------------------------------- weights


@dataclass(frozen=True)
class IndexWeights:
    """The two forms of one index on L players (see module doc).

    moebius2[s], s = 0..L: omega_2(s), weight of a(S) in I_ij for S ⊇ {i, j} (0 for s < 2).
    moebius1[s], s = 0..L: omega_1(s), weight of a(S) in I_i for S ∋ i (0 for s < 1).
    delta2[s], s = 0..L-2: p_2(s), weight of Δ_ij f(S) for S ⊆ N minus {i, j}, |S| = s.
    delta1[s], s = 0..L-1: p_1(s), weight of Δ_i f(S) for S ⊆ N minus {i}, |S| = s.
    """

    index: str
    L: int
    moebius2: np.ndarray
    moebius1: np.ndarray
    delta2: np.ndarray
    delta1: np.ndarray


def _omega(index: str, t: int, s: int) -> Fraction:
    """Exact Möbius weight of a(S), |S| = s, in the order-t term I_T (T ⊆ S, t in {1, 2})."""
    if s < t:
        return Fraction(0)
    if index == "sii":  # Grabisch: 1 / (|S| - |T| + 1)
        return Fraction(1, s - t + 1)
    if index == "banzhaf":  # 1 / 2^(|S| - |T|)
        return Fraction(1, 2 ** (s - t))
    if index == "stii":  # top order: 1 / C(|S|, 2); lower order: the Möbius value itself
        return Fraction(1, math.comb(s, 2)) if t == 2 else Fraction(int(s == 1))
    if index == "fsii":  # Tsai et al. 2023, Thm 19, l = 2: a(T) + (-1)^(l-t) t/(l+t) C(l,t) sum_{S ⊋ T, |S|>l} ...
        if s == t:
            return Fraction(1)
        if s <= 2:
            return Fraction(0)
        coef = Fraction((-1) ** (2 - t) * t * math.comb(2, t), 2 + t)
        return coef * Fraction(math.comb(s - 1, 2), math.comb(s + 1, 2 + t))
    raise INDICES.unknown(index)


@lru_cache(maxsize=64)
def index_weights(index: str, L: int) -> IndexWeights:
    """Both forms of `index` on L players; the derivative weights come from the Möbius weights by
    exact binomial inversion: p_t(s) = sum_{r >= s} (-1)^(r-s) C(L-t-s, r-s) omega_t(r + t)."""
    INDICES.lookup(index)
    if L < 2:
        raise EstimationError(f"pairwise interactions need at least 2 layers, got {L}")
    out = {}
    for t in (1, 2):
        om = [_omega(index, t, s) for s in range(L + 1)]
        m = L - t
        p = [sum(((-1) ** (r - s)) * math.comb(m - s, r - s) * om[r + t] for r in range(s, m + 1)) for s in range(m + 1)]
        out[t] = (np.array([float(x) for x in om]), np.array([float(x) for x in p]))
    return IndexWeights(index, L, out[2][0], out[1][0], out[2][1], out[1][1])


def size_weight(index: str, L: int) -> np.ndarray:
    """float[L+1]: share of the pair index's absolute weight on masks keeping k = 0..L layers.

    Δ_ij f(S) reads f at kept counts s, s+1 (twice) and s+2, each with weight |p_2(s)|, and
    there are C(L-2, s) coalitions S of size s; the same holds for every pair."""
    w = index_weights(index, L)
    per_s = np.abs(w.delta2) * np.array([math.comb(L - 2, s) for s in range(L - 1)], dtype=np.float64)  # (L-1,)
    mass = np.zeros(L + 1)
    for c, mult in ((0, 1), (1, 2), (2, 1)):
        mass[c : c + L - 1] += mult * per_s
    return mass / mass.sum()


# ---------------------------------------------------------------- butterflies


def popcounts(L: int) -> np.ndarray:
    """uint8[2^L]: number of set bits of each code 0..2^L-1."""
    sizes = np.zeros(1 << L, dtype=np.uint8)
    for j in range(L):
        sizes[1 << j : 1 << (j + 1)] = sizes[: 1 << j] + 1
    return sizes


def moebius_transform(values: np.ndarray) -> np.ndarray:
    """Möbius transform a(T) = sum_{S ⊆ T} (-1)^(|T|-|S|) f(S) of f on all 2^L codes
    (bit j of the code = layer j kept), float64[2^L]; one vectorised butterfly per bit."""
    a = np.array(values, dtype=np.float64, copy=True)
    L = int(a.size).bit_length() - 1
    if a.size != 1 << L:
        raise EstimationError(f"need f on all 2^L masks, got {a.size} values")
    for j in range(L):
        v = a.reshape(-1, 2, 1 << j)  # (2^(L-j-1), 2, 2^j): axis 1 is bit j
        v[:, 1, :] -= v[:, 0, :]
    return a


def superset_sums(b: np.ndarray) -> np.ndarray:
    """c(T) = sum_{S ⊇ T} b(S) over all 2^L codes, float64[2^L] (in place on a copy)."""
    c = np.array(b, dtype=np.float64, copy=True)
    L = int(c.size).bit_length() - 1
    for j in range(L):
        v = c.reshape(-1, 2, 1 << j)  # (2^(L-j-1), 2, 2^j)
        v[:, 0, :] += v[:, 1, :]
    return c


def all_values(f: ValueFn, L: int, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """f on every mask, float64[2^L], in code order (bit j = layer j kept)."""
    if L > EXACT_MAX_L:
        raise EstimationError(f"exact interactions enumerate 2^L masks (limit L <= {EXACT_MAX_L}); use n_samples")
    out = np.empty(1 << L, dtype=np.float64)
    for a in range(0, 1 << L, chunk):
        codes = np.arange(a, min(a + chunk, 1 << L), dtype=np.int64)
        out[a : a + len(codes)] = _evaluate(f, _masks_from_codes(codes, L), chunk)
    return out


def matrix_from_values(values: np.ndarray, index: str) -> np.ndarray:
    """float[L, L] index matrix (pairs off the diagonal, order-1 values on it) from f on all 2^L codes."""
    a = moebius_transform(values)  # (2^L,)
    L = int(a.size).bit_length() - 1
    w = index_weights(index, L)
    size = popcounts(L)  # (2^L,)
    pair_sums = superset_sums(a * w.moebius2[size])  # (2^L,): at code {i, j}, I_ij
    single_sums = superset_sums(a * w.moebius1[size])  # (2^L,): at code {i}, I_i
    bit = 1 << np.arange(L, dtype=np.int64)  # (L,)
    M = pair_sums[bit[:, None] | bit[None, :]]  # (L, L); diagonal reads code {i}: overwritten below
    M[np.diag_indices(L)] = single_sums[bit]
    return M


# ---------------------------------------------------------------- Monte Carlo


def _proposal(index: str, L: int) -> np.ndarray:
    """Distribution of the base masks' kept count, float[L+1]: uniform for the Shapley family (SII
    weights then cancel exactly), Binomial(L, 1/2) for Banzhaf (uniform masks)."""
    if index == "banzhaf":
        return np.array([math.comb(L, k) for k in range(L + 1)], dtype=np.float64) / 2.0**L
    return np.full(L + 1, 1.0 / (L + 1))


def _importance(delta: np.ndarray, pi: np.ndarray, t: int, L: int) -> np.ndarray:
    """p_t(s) / P(m minus T = S), s = 0..L-t: the weight of one drawn Δ_T term (unbiased)."""
    binom = np.array([math.comb(L, k) for k in range(L + 1)], dtype=np.float64)
    per_mask = pi / binom  # (L+1,): probability of one given mask of each kept count
    s = np.arange(L - t + 1)
    q = sum(math.comb(t, c) * per_mask[s + c] for c in range(t + 1))  # (L-t+1,)
    return np.divide(delta, q, out=np.zeros_like(delta), where=q > 0)


def pair_flips(base: np.ndarray) -> np.ndarray:
    """bool[c, 1 + L + P, L] with P = L(L-1)/2: each base, its one-layer flips (layer i at 1 + i)
    and its two-layer flips (pair (i, j), i < j, at 1 + L + the pair's np.triu_indices rank)."""
    c, L = base.shape
    iu, ju = np.triu_indices(L, k=1)
    flips = np.zeros((1 + L + len(iu), L), dtype=bool)  # (1+L+P, L): which layers each variant flips
    flips[1 + np.arange(L), np.arange(L)] = True
    r = 1 + L + np.arange(len(iu))
    flips[r, iu] = True
    flips[r, ju] = True
    return base[:, None, :] ^ flips[None, :, :]


def _mc_terms(values: np.ndarray, base: np.ndarray, iw1: np.ndarray, iw2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-base terms (float[c, L], float[c, P]) whose means are the order-1 and pair values."""
    c, L = base.shape
    iu, ju = np.triu_indices(L, k=1)
    v0 = values[:, :1]  # (c, 1)
    v1 = values[:, 1 : 1 + L]  # (c, L)
    v2 = values[:, 1 + L :]  # (c, P)
    b = base.astype(np.int64)  # (c, L)
    size = b.sum(axis=1, keepdims=True)  # (c, 1)
    # Δ_i f(m minus i) = f(m with i) - f(m without i) = ±(f(flip) - f(m)); |S| = |m| - m_i
    single = np.where(base, v0 - v1, v1 - v0) * iw1[size - b]  # (c, L)
    # Δ_ij f(S), S = m minus {i, j}: (-1)^(m_i + m_j) (f(m) - f(m^i) - f(m^j) + f(m^ij))
    sign = 1 - 2 * ((b[:, iu] + b[:, ju]) & 1)  # (c, P)
    pair = sign * (v0 - v1[:, iu] - v1[:, ju] + v2) * iw2[size - b[:, iu] - b[:, ju]]  # (c, P)
    return single, pair


def monte_carlo(members: Sequence[ValueFn], L: int, index: str, n_samples: int, seed: int, chunk: int):
    """(per-member matrices float[k, L, L], Monte Carlo stderr float[L, L] of their mean, evaluations)."""
    if n_samples < 2:
        raise EstimationError("Monte Carlo interactions need n_samples >= 2")
    w = index_weights(index, L)
    pi = _proposal(index, L)
    iw1, iw2 = _importance(w.delta1, pi, 1, L), _importance(w.delta2, pi, 2, L)
    rng = np.random.default_rng(seed)
    k, P = len(members), L * (L - 1) // 2
    n_var = 1 + L + P
    sums = np.zeros((k, L + P))
    mean, m2 = np.zeros(L + P), np.zeros(L + P)  # running moments of the ensemble-mean terms
    for a in range(0, n_samples, DRAW_BLOCK):
        c = min(DRAW_BLOCK, n_samples - a)
        base = _random_masks_of_sizes(rng.choice(L + 1, size=c, p=pi), L, rng)  # (c, L)
        masks = pair_flips(base).reshape(-1, L)  # (c * n_var, L)
        terms = np.zeros((c, L + P))
        for j, f in enumerate(members):
            single, pair = _mc_terms(_evaluate(f, masks, chunk).reshape(c, n_var), base, iw1, iw2)
            t = np.concatenate([single, pair], axis=1)  # (c, L + P)
            sums[j] += t.sum(axis=0)
            terms += t / k
        n_tot = a + c  # Chan et al.'s pairwise update of mean and squared deviations
        mean_b = terms.mean(axis=0)
        delta = mean_b - mean
        m2 += ((terms - mean_b) ** 2).sum(axis=0) + delta**2 * (a * c / n_tot)
        mean += delta * (c / n_tot)
    se = np.sqrt(np.maximum(m2, 0.0) / (n_samples - 1) / n_samples)  # (L + P,)
    mats = np.stack([to_matrix(s / n_samples, L) for s in sums])  # (k, L, L)
    return mats, to_matrix(se, L), n_samples * n_var * k


def to_matrix(flat: np.ndarray, L: int) -> np.ndarray:
    """[order-1 (L) | pairs in np.triu_indices order (P)] -> symmetric float[L, L]."""
    M = np.diag(flat[:L]).astype(np.float64)
    iu, ju = np.triu_indices(L, k=1)
    M[iu, ju] = flat[L:]
    M[ju, iu] = flat[L:]
    return M


# ---------------------------------------------------------------- records and entry point


@dataclass(frozen=True)
class Interactions:
    """One pairwise interaction index of every layer pair.

    matrix: float[L, L], symmetric; off-diagonal (i, j) = the pair's value; diagonal = the same
    index's order-1 values (`diagonal` says which). stderr: float[L, L], sqrt(Monte Carlo variance +
    variance over ensemble members); 0 for an exact index of one value function. method: how it was
    computed; n_evaluations: value-function calls; details: JSON-able after `to_dict`.
    """

    index: str
    matrix: np.ndarray
    stderr: np.ndarray
    method: str
    n_evaluations: int
    details: dict = field(default_factory=dict)

    @property
    def L(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def diagonal(self) -> str:
        return DIAGONAL[self.index]

    def pairs(self) -> list[dict]:
        """Every pair i < j as {i, j, value, stderr}, strongest |value| first (ties: lower i, j)."""
        iu, ju = np.triu_indices(self.L, k=1)
        v, se = self.matrix[iu, ju], self.stderr[iu, ju]
        order = np.lexsort((ju, iu, -np.abs(v)))
        return [{"i": int(iu[r]), "j": int(ju[r]), "value": float(v[r]), "stderr": float(se[r])} for r in order]

    def to_dict(self) -> dict:
        return jsonable({
            "index": self.index,
            "name": self.details.get("estimand") or INDICES[self.index],
            "estimand": self.details.get("estimand") or INDICES[self.index],
            "diagonal": self.diagonal,
            "matrix": self.matrix,
            "stderr": self.stderr,
            "pairs": self.pairs(),
            "method": self.method,
            "n_evaluations": self.n_evaluations,
            "details": self.details,
        })


def interaction_index(
    f: ValueFn | Sequence[ValueFn],
    L: int,
    index: str = "sii",
    n_samples: int | None = None,
    seed: int = 0,
    sampled_sizes: Sequence[int] | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> Interactions:
    """`index` of f, or of the mean of an ensemble of value functions (a list; values = mean over
    members, the spread over members goes into stderr).

    Exact when n_samples is None and L <= EXACT_MAX_L (2^L evaluations per member); otherwise
    Monte Carlo with n_samples base masks (default DEFAULT_SAMPLES), the same draws for every
    member. sampled_sizes: the kept counts the surrogate was fitted on, for
    details['unsampled_weight_fraction'].
    """
    members = list(f) if isinstance(f, (list, tuple)) else [f]
    if not members:
        raise EstimationError("interaction_index needs at least one value function")
    index = index.lower()
    index_weights(index, L)  # validates index and L
    if n_samples is None and L <= EXACT_MAX_L:
        mats = []
        for g in members:
            mats.append(matrix_from_values(all_values(g, L, chunk), index))
        mats = np.stack(mats)  # (k, L, L)
        mc_se = np.zeros((L, L))
        n_eval = len(members) << L
        method = f"exact (Möbius transform over all 2^{L} masks)"
    else:
        n = DEFAULT_SAMPLES if n_samples is None else int(n_samples)
        mats, mc_se, n_eval = monte_carlo(members, L, index, n, seed, chunk)
        method = f"Monte Carlo ({n} base masks x {1 + L + L * (L - 1) // 2} flips)"
    spread = mats.std(axis=0, ddof=1) if len(members) > 1 else np.zeros((L, L))
    matrix = mats.mean(axis=0)
    sw = size_weight(index, L)
    details = {
        "n_members": len(members),
        "monte_carlo_stderr": mc_se,
        "ensemble_spread": spread,
        "size_weight": sw,
        "stderr_is": "sqrt(Monte Carlo variance + variance over surrogate ensemble members); "
                     "does not include extrapolation bias (see unsampled_weight_fraction)",
    }
    if n_samples is not None or L > EXACT_MAX_L:
        details.update(n_samples=n, seed=seed, proposal="Binomial(L, 1/2)" if index == "banzhaf" else "uniform kept count")
    if sampled_sizes is not None:
        sampled = sorted({int(s) for s in sampled_sizes if 0 <= int(s) <= L})
        details["sampled_sizes"] = sampled
        details["unsampled_weight_fraction"] = float(1.0 - sw[sampled].sum())
        frac = details["unsampled_weight_fraction"]
        details["estimand"] = (f"{INDICES[index]} of the surrogate" if frac <= 0 else
                               f"{INDICES[index]} of the surrogate, extrapolated: {frac:.0%} of its weight lies on "
                               f"kept counts never sampled (sampled {count_ranges(sampled)})")
        details["extrapolated"] = bool(frac > 0)
    if index in EFFICIENT:
        ends = np.mean([_evaluate(g, np.stack([np.ones(L, bool), np.zeros(L, bool)]), 2) for g in members], axis=0)
        total = float(np.trace(matrix) + matrix[np.triu_indices(L, k=1)].sum())
        details["efficiency"] = {"total": total, "grand_minus_empty": float(ends[0] - ends[1]),
                                 "gap": total - float(ends[0] - ends[1])}
    return Interactions(index, matrix, np.sqrt(mc_se**2 + spread**2), method, int(n_eval), details)


def count_ranges(counts) -> str:
    """'7-12' / '9-10, 12-13, 15-16': runs of consecutive kept counts."""
    c = sorted(set(int(x) for x in counts))
    runs, start = [], None
    for a, b in zip(c, c[1:] + [None]):
        start = a if start is None else start
        if b != a + 1:
            runs.append(f"{start}-{a}" if a != start else f"{a}")
            start = None
    return ", ".join(runs)
