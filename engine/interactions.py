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


def _monte_carlo(members: Sequence[ValueFn], L: int, index: str, n_samples: int, seed: int, chunk: int):
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
    mats = np.stack([_to_matrix(s / n_samples, L) for s in sums])  # (k, L, L)
    return mats, _to_matrix(se, L), n_samples * n_var * k


def _to_matrix(flat: np.ndarray, L: int) -> np.ndarray:
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
        mats, mc_se, n_eval = _monte_carlo(members, L, index, n, seed, chunk)
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
                               f"kept counts never sampled (sampled {_ranges(sampled)})")
        details["extrapolated"] = bool(frac > 0)
    if index in EFFICIENT:
        ends = np.mean([_evaluate(g, np.stack([np.ones(L, bool), np.zeros(L, bool)]), 2) for g in members], axis=0)
        total = float(np.trace(matrix) + matrix[np.triu_indices(L, k=1)].sum())
        details["efficiency"] = {"total": total, "grand_minus_empty": float(ends[0] - ends[1]),
                                 "gap": total - float(ends[0] - ends[1])}
    return Interactions(index, matrix, np.sqrt(mc_se**2 + spread**2), method, int(n_eval), details)


# ---------------------------------------------------------------- bias check on real evaluations


def signed_coefficients(masks: np.ndarray, index: str) -> tuple[np.ndarray, np.ndarray]:
    """(float[n, L], float[n, P]): c(T) such that I = sum over all masks T of f(T) c(T), for the
    order-1 values and the pairs (np.triu_indices order). From the derivative form: T enters
    Δ_ij f(T minus {i, j}) with sign (-1)^(number of i, j not in T) and weight p_2(|T minus {i, j}|)."""
    masks = np.asarray(masks, dtype=bool)
    n, L = masks.shape
    w = index_weights(index, L)
    iu, ju = np.triu_indices(L, k=1)
    b = masks.astype(np.int64)  # (n, L)
    size = b.sum(axis=1, keepdims=True)  # (n, 1)
    single = np.where(masks, 1.0, -1.0) * w.delta1[size - b]  # (n, L)
    c2 = b[:, iu] + b[:, ju]  # (n, P): how many of i, j are kept
    pair = np.where(c2 == 1, -1.0, 1.0) * w.delta2[size - c2]  # (n, P)
    return single, pair


def residual_check(
    masks: np.ndarray,
    values: np.ndarray,
    probabilities: np.ndarray,
    fit: Callable[[np.ndarray, np.ndarray], ValueFn],
    index: str = "sii",
    folds: int = 5,
    seed: int = 0,
) -> dict:
    """Cross-fitted check of the surrogate's index against the real evaluations (the regression-
    adjusted estimator of Witter, Liu & Musco 2025, for interactions).

    For each of `folds` folds: fit(masks, values) on the other folds, its exact index, plus the
    Monte Carlo estimate of the index of the residual game from the held-out fold,
    mean of c(T) (f(T) - g(T)) / p(T) with p the design probability of one draw
    (engine.sampling.mask_probability). Unbiased for the index of the real game when every kept
    count with index weight has p > 0 (size-uniform or paired runs); on a stratified run it only
    corrects the sampled counts (`covered_weight` says how much of the index that is).
    Returns {"corrected": float[L, L], "stderr": float[L, L], "correction": float[L, L],
    "covered_weight": float, "folds": int}. Wide but honest: on the demo game (paired and mixed
    designs) 2-stderr intervals covered the exact SII of 88-96% of the pairs (bench/README.md).
    """
    masks = np.asarray(masks, dtype=bool)
    values = np.asarray(values, dtype=np.float64)
    p = np.asarray(probabilities, dtype=np.float64)
    n, L = masks.shape
    if len(values) != n or len(p) != n:
        raise EstimationError("masks, values and probabilities must have the same length")
    if np.any(~(p > 0)):
        raise EstimationError("every evaluated mask needs a positive design probability")
    if folds < 2 or n < 2 * folds:
        raise EstimationError(f"cross-fitting with {folds} folds needs at least {2 * folds} masks, got {n}")
    assign = np.random.default_rng(seed).permutation(n) % folds
    P = L * (L - 1) // 2
    surrogate = np.zeros(L + P)
    terms = np.empty((n, L + P))  # per-mask residual terms c(T) r(T) / p(T)
    iu, ju = np.triu_indices(L, k=1)
    for k in range(folds):
        test = assign == k
        g = fit(masks[~test], values[~test])
        M = matrix_from_values(all_values(g, L), index) if L <= EXACT_MAX_L else \
            _monte_carlo([g], L, index, DEFAULT_SAMPLES, seed + k, DEFAULT_CHUNK)[0][0]
        surrogate += test.mean() * np.concatenate([np.diag(M), M[iu, ju]])
        r = values[test] - _evaluate(g, masks[test], DEFAULT_CHUNK)  # (n_k,)
        single, pair = signed_coefficients(masks[test], index)
        terms[test] = np.concatenate([single, pair], axis=1) * (r / p[test])[:, None]
    correction = terms.mean(axis=0)
    se = terms.std(axis=0, ddof=1) / np.sqrt(n)
    sw = size_weight(index, L)
    covered = float(sw[np.unique(masks.sum(axis=1))].sum())
    return {"corrected": _to_matrix(surrogate + correction, L), "stderr": _to_matrix(se, L),
            "correction": _to_matrix(correction, L), "covered_weight": covered, "folds": int(folds)}


# ---------------------------------------------------------------- resampling interval over the masks


def jackknife_interval(
    masks: np.ndarray,
    values: np.ndarray,
    fit: Callable[[np.ndarray, np.ndarray], ValueFn],
    estimate: Interactions,
    index: str = "sii",
    folds: int = 5,
    seed: int = 0,
    seed_noise: bool = False,
    n_samples: int | None = None,
    mc_seed: int = 0,
    level: float = 0.9,
    bias: np.ndarray | None = None,
    sample_weight: np.ndarray | None = None,
) -> Interactions:
    """`estimate` (the index of an ensemble fitted on all the masks) with a standard error that
    includes the sampling of the masks: the delete-a-group jackknife over `folds` random groups.

    For each group k: fit(masks without group k, their values[, their sample_weight when given]) -> one
    value function, its index
    (exact for L <= EXACT_MAX_L unless n_samples, else Monte Carlo with `mc_seed`, the same draws
    for every group). Jackknife variance: (K-1)/K * sum_k (I_k - mean)^2, float[L, L].
    seed_noise: each fit also varies with its random seed (MLP members); the jackknife multiplies
    that variance by (K-1)^2/K, so it is subtracted (estimated by the ensemble's spread over members,
    `estimate.details['ensemble_spread']`), and the ensemble mean's own seed variance spread^2/k is
    added back. bias: float[L, L], a bias allowance added in quadrature (`parts_disagreement`: the
    jackknife sees the noise of the fits, not a bias that all of them share). Returned: `estimate`
    with stderr = sqrt(jackknife (corrected) + spread^2/k + Monte Carlo variance + bias^2),
    details['interval'] = {level, low, high, folds, jackknife_stderr, bias_allowance}, float[L, L]
    each. Calibrated on the demo game in bench/README.md (Interactions: coverage).
    """
    masks = np.asarray(masks, dtype=bool)
    values = np.asarray(values, dtype=np.float64)
    n, L = masks.shape
    if len(values) != n:
        raise EstimationError("masks and values must have the same length")
    if folds < 2 or n < 2 * folds:
        raise EstimationError(f"a {folds}-group jackknife needs at least {2 * folds} masks, got {n}")
    if not 0 < level < 1:
        raise EstimationError(f"level must be in (0, 1); got {level}")
    group = np.random.default_rng(seed).permutation(n) % folds  # (n,)
    keep = [group != k for k in range(folds)]  # (n,) rows fitted without group k
    fits = [fit(masks[r], values[r]) if sample_weight is None else fit(masks[r], values[r], np.asarray(sample_weight)[r])
            for r in keep]
    parts = [interaction_index(g, L, index, n_samples=n_samples, seed=mc_seed) for g in fits]
    mats = np.stack([r.matrix for r in parts])  # (K, L, L)
    jk_var = (folds - 1) / folds * ((mats - mats.mean(axis=0)) ** 2).sum(axis=0)  # (L, L)
    spread = np.asarray(estimate.details.get("ensemble_spread", np.zeros((L, L))))  # (L, L), one member's sd
    k = int(estimate.details.get("n_members", 1))
    if seed_noise:
        jk_var = np.maximum(jk_var - (folds - 1) ** 2 / folds * spread**2, 0.0)
    mc = np.asarray(estimate.details.get("monte_carlo_stderr", np.zeros((L, L))))
    allowance = np.zeros((L, L)) if bias is None else np.abs(np.asarray(bias, dtype=np.float64))  # (L, L)
    se = np.sqrt(jk_var + spread**2 / k + mc**2 + allowance**2)  # (L, L)
    z = _normal_quantile(0.5 + level / 2)
    details = {**estimate.details,
               "interval": {"level": level, "low": estimate.matrix - z * se, "high": estimate.matrix + z * se,
                            "folds": int(folds), "jackknife_stderr": np.sqrt(jk_var), "seed_noise_removed": seed_noise,
                            "bias_allowance": allowance},
               "stderr_is": f"sqrt(delete-a-group jackknife over the masks ({folds} groups) + the ensemble mean's seed "
                            "variance + Monte Carlo variance" + (" + the surrogate parts' disagreement^2" if bias is not
                                                                 None else "") + "): the sampling noise of the evaluated "
                            "masks is included" + ("; a bias that both parts share is not" if bias is not None else
                                                   "; a bias that every fit shares (kept counts never sampled) is not")}
    n_eval = estimate.n_evaluations + sum(r.n_evaluations for r in parts)
    return Interactions(estimate.index, estimate.matrix, se, estimate.method, int(n_eval), details)


def parts_disagreement(members: Sequence, L: int, index: str = "sii", n_samples: int | None = None,
                       seed: int = 0) -> np.ndarray | None:
    """Half the absolute difference, float[L, L], between the index of the members' first parts and of
    their second parts (members with ``parts() -> (g1, g2)`` whose mean they are, e.g. the MLP and the
    log-pairwise model of surrogate mlp+log-pairwise): the index of the mean lies between the two, so
    this is a bias allowance from two model classes fitted on the same masks. None if a member has no
    parts. 2 x (k) more index computations (exact, or Monte Carlo with `n_samples` and `seed`)."""
    if not members or not all(hasattr(m, "parts") for m in members):
        return None
    first = interaction_index([m.parts()[0] for m in members], L, index, n_samples=n_samples, seed=seed).matrix
    second = interaction_index([m.parts()[1] for m in members], L, index, n_samples=n_samples, seed=seed).matrix
    return np.abs(first - second) / 2  # (L, L)


def _normal_quantile(p: float) -> float:
    """Standard normal quantile (scipy-free)."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(p)


# ---------------------------------------------------------------- the index on the sampled kept counts


@dataclass(frozen=True)
class RestrictedWeights:
    """An index's derivative-form weights kept only on coalitions whose masks all have a known kept count.

    delta2[s], s = 0..L-2: p_2(s) where s, s+1, s+2 are all in `known`, else 0; delta1[s], s = 0..L-1:
    p_1(s) where s, s+1 are. Each is rescaled so that its total weight sum_s C(L-t, s) p_t(s) is the
    full index's (1 for SII), i.e. the index's average of Δ_T f over the coalitions it can see."""

    index: str
    L: int
    known: tuple[int, ...]
    delta2: np.ndarray
    delta1: np.ndarray

    @property
    def label(self) -> str:
        return f"{INDICES[self.index]} on the sampled kept counts {_ranges(self.known)}"


def _ranges(counts) -> str:
    """'7-12' / '9-10, 12-13, 15-16': runs of consecutive kept counts."""
    c = sorted(set(int(x) for x in counts))
    runs, start = [], None
    for a, b in zip(c, c[1:] + [None]):
        start = a if start is None else start
        if b != a + 1:
            runs.append(f"{start}-{a}" if a != start else f"{a}")
            start = None
    return ", ".join(runs)


def restricted_weights(index: str, L: int, known) -> RestrictedWeights | None:
    """`index` restricted to the coalitions whose masks (S, S+i, S+j, S+ij) all have a kept count in
    `known` (the sampled counts; add L, the full mask, known exactly); None when no pair coalition
    qualifies (e.g. the demo's strata 9, 10, 12, 13, 15: no three consecutive counts)."""
    w = index_weights(index, L)
    ok = {int(k) for k in known}
    keep2 = np.array([s in ok and s + 1 in ok and s + 2 in ok for s in range(L - 1)])
    keep1 = np.array([s in ok and s + 1 in ok for s in range(L)])
    c2 = np.array([math.comb(L - 2, s) for s in range(L - 1)], dtype=np.float64)
    c1 = np.array([math.comb(L - 1, s) for s in range(L)], dtype=np.float64)
    t2, t1 = float(np.sum(c2 * w.delta2 * keep2)), float(np.sum(c1 * w.delta1 * keep1))
    if not keep2.any() or t2 == 0 or t1 == 0:
        return None
    return RestrictedWeights(index, L, tuple(sorted(ok)), w.delta2 * keep2 * (np.sum(c2 * w.delta2) / t2),
                             w.delta1 * keep1 * (np.sum(c1 * w.delta1) / t1))


def _coefficients(masks: np.ndarray, delta1: np.ndarray, delta2: np.ndarray) -> np.ndarray:
    """float[n, L + P]: c(T) of each mask T in I = sum_T f(T) c(T) (order-1 | pairs, triu order), for
    derivative weights delta1 / delta2 (see `signed_coefficients`)."""
    b = masks.astype(np.int64)  # (n, L)
    L = b.shape[1]
    iu, ju = np.triu_indices(L, k=1)
    size = b.sum(axis=1, keepdims=True)  # (n, 1)
    single = np.where(masks, 1.0, -1.0) * delta1[size - b]  # (n, L)
    c2 = b[:, iu] + b[:, ju]  # (n, P)
    d2 = np.concatenate([delta2, [0.0, 0.0]])  # index size - c2 may reach L - 1 (never weighted)
    pair = np.where(c2 == 1, -1.0, 1.0) * d2[size - c2]  # (n, P)
    return np.concatenate([single, pair], axis=1)


def index_by_size(f: ValueFn, rw: RestrictedWeights, chunk: int = 1 << 14) -> np.ndarray:
    """C[j] = sum over masks T with |T| = j of c(T) f(T), float[L+1, L+P]: C.sum(0) is the restricted
    index of f (order-1 | pairs). Exact enumeration of the 2^L masks (L <= EXACT_MAX_L)."""
    L = rw.L
    if L > EXACT_MAX_L:
        raise EstimationError(f"the index on the sampled kept counts enumerates 2^L masks (L <= {EXACT_MAX_L})")
    out = np.zeros((L + 1, L + L * (L - 1) // 2))
    for a in range(0, 1 << L, chunk):
        m = _masks_from_codes(np.arange(a, min(a + chunk, 1 << L), dtype=np.int64), L)  # (c, L)
        v = _evaluate(f, m, chunk)  # (c,)
        np.add.at(out, m.sum(axis=1), _coefficients(m, rw.delta1, rw.delta2) * v[:, None])
    return out


def restricted_index(f: ValueFn, rw: RestrictedWeights) -> np.ndarray:
    """float[L, L]: the restricted index of f (pairs off the diagonal, order-1 values on it)."""
    return _to_matrix(index_by_size(f, rw).sum(axis=0), rw.L)


def _folds_by_size(sizes: np.ndarray, k: int, seed: int) -> np.ndarray:
    """int[n]: a seeded shuffle within each kept count dealt round-robin over k folds."""
    rng = np.random.default_rng(seed)
    out = np.empty(len(sizes), dtype=np.int64)
    offset = 0
    for j in np.unique(sizes):
        idx = rng.permutation(np.flatnonzero(sizes == j))
        out[idx] = (np.arange(len(idx)) + offset) % k
        offset += len(idx)
    return out


def regression_adjusted_index(
    masks: np.ndarray,
    values: np.ndarray,
    fit: Callable[..., ValueFn],
    index: str = "sii",
    known=None,
    folds: int = 5,
    seed: int = 0,
    level: float = 0.9,
    full_score: float | None = 1.0,
    train_only: np.ndarray | None = None,
    sample_weight: np.ndarray | None = None,
) -> Interactions:
    """The index on the sampled kept counts (`restricted_weights`), estimated by cross-fitted regression
    adjustment post-stratified by kept count (engine.uncertainty.regression_adjusted, for pairs): per
    fold k a surrogate g_k fitted on the other folds gives its exact per-count index C_j(g_k) plus
    (N_j / n_jk) x the sum over fold k's masks of count j of c(T) (f(T) - g_k(T)). Every mask the
    index weighs has a sampled kept count, so this is unbiased whatever the surrogate's bias; kept
    counts whose every mask was evaluated are summed exactly. stderr: the stratified-sampling standard
    error of the correction (finite population corrected); details['interval'] at `level`.

    masks bool[n, L], values float[n] (scores); fit(X, y[, w]) -> value function; known: kept counts
    treated as sampled (default: those of `masks`, and L); full_score: the full mask's score, appended
    when no row has it. train_only bool[n]: rows that train every fold's fit but are not in the
    correction (actively chosen or partial rows); sample_weight: fit weights. EstimationError when no
    pair coalition has all four kept counts sampled."""
    X = np.asarray(masks, dtype=bool)
    y = np.asarray(values, dtype=np.float64)
    n, L = X.shape
    extra = np.zeros(n, bool) if train_only is None else np.asarray(train_only, dtype=bool)
    wts = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if full_score is not None and not X.all(axis=1).any():
        X, y = np.vstack([X, np.ones((1, L), bool)]), np.append(y, float(full_score))
        extra = np.append(extra, False)
        wts = None if wts is None else np.append(wts, 1.0)
    known = sorted(set(int(k) for k in (np.unique(X[~extra].sum(axis=1)) if known is None else known)) | {L})
    rw = restricted_weights(index, L, known)
    if rw is None:
        raise EstimationError(f"no pair coalition has all four masks' kept counts among the sampled ones "
                              f"({_ranges(known)}): the {INDICES[index]} on the sampled kept counts is empty; sample "
                              "three consecutive kept counts (e.g. --scheme size-uniform, or strata such as 9,10,11)")
    rows = np.flatnonzero(~extra)
    sizes = X[rows].sum(axis=1)
    N = np.array([math.comb(L, j) for j in range(L + 1)], dtype=np.float64)
    n_j = np.bincount(sizes, minlength=L + 1)
    exhausted = n_j == N
    fit_rows = ~exhausted[sizes]
    if 0 < fit_rows.sum() < 2 * folds:
        raise EstimationError(f"cross-fitting with {folds} folds needs at least {2 * folds} sampled masks")
    assign = _folds_by_size(sizes, folds, seed)
    coef = _coefficients(X[rows], rw.delta1, rw.delta2)  # (s, L + P)
    pred = np.zeros(len(rows))
    C = [np.zeros((L + 1, coef.shape[1]))] if not fit_rows.any() else []  # every mask known: nothing to fit
    for k in range(folds if fit_rows.any() else 0):
        test = (assign == k) & fit_rows
        train = np.ones(len(y), bool)
        train[rows[test]] = False
        g = fit(X[train], y[train]) if wts is None else fit(X[train], y[train], wts[train])
        C.append(index_by_size(g, rw))
        pred[test] = _evaluate(g, X[rows[test]], DEFAULT_CHUNK)
    C = np.stack(C)  # (K, L+1, L+P)
    ys = y[rows]
    t = coef * (ys - pred)[:, None]  # (s, L+P) residual terms
    P = C.mean(axis=0)
    var = np.zeros(P.shape[1])
    for j in np.flatnonzero(n_j):
        sel = sizes == j
        if exhausted[j]:
            P[j] = (coef[sel] * ys[sel][:, None]).sum(axis=0)
            continue
        est = np.zeros(P.shape[1])
        for k in range(folds):
            in_k = sel & (assign == k)
            if in_k.any():
                est += in_k.sum() / n_j[j] * (C[k, j] + N[j] / in_k.sum() * t[in_k].sum(axis=0))
        P[j] = est
        m = int(sel.sum())
        # each fold corrects its own fit from its own ~m/K masks: the finite population correction is per fold
        fpc = 1 - m / (folds * N[j])
        var += (N[j] ** 2 * fpc * t[sel].var(axis=0, ddof=1) / m) if m >= 2 else (N[j] * t[sel][0]) ** 2
    flat = P.sum(axis=0)
    matrix, se = _to_matrix(flat, L), _to_matrix(np.sqrt(var), L)
    z = _normal_quantile(0.5 + level / 2)
    sw = size_weight(index, L)
    details = {
        "estimand": rw.label, "known_kept_counts": list(rw.known), "restricted": True,
        "surrogate_part": _to_matrix(C.mean(axis=0).sum(axis=0), L), "n_folds": int(folds),
        "sampled_sizes": [int(j) for j in np.flatnonzero(n_j)],
        "unsampled_weight_fraction": 0.0,
        "full_index_unsampled_weight_fraction": float(1.0 - sw[[j for j in np.flatnonzero(n_j)]].sum()),
        "interval": {"level": level, "low": matrix - z * se, "high": matrix + z * se, "folds": int(folds),
                     "bias_allowance": np.zeros((L, L))},
        "stderr_is": "stratified-sampling standard error of the cross-fitted correction (by kept count, finite "
                     "population corrected); no bias term: every coalition the index weighs was sampled",
    }
    method = f"regression-adjusted ({folds} cross-fits, post-stratified by kept count), exact per fold"
    return Interactions(index, matrix, se, method, int(folds) << L, details)
