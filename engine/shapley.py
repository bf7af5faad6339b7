"""Layer contributions as semivalues of a value function over keep-masks.

Every estimator takes a value function ``f(masks: bool[n, L]) -> float[n]`` (``True`` =
layer kept) and calls it on large batches, never once per mask. Nothing here knows about
models: ``f`` may be a fitted surrogate (surrogates are callable) or real perplexity evaluation.

A value function may also offer ``f.flip_values(base: bool[n, L]) -> float[n, L+1]``: f at each
base mask (column 0) and at the base with layer i flipped (column 1 + i). The Monte Carlo
semivalues need exactly these L + 1 values per base mask; a surrogate whose structure makes
them cheap (the paper's MLP: its first layer is affine in the mask) then never builds the
(n, L + 1, L) flipped masks. `flip_values` below is the one entry point and the definition.

A semivalue gives player ``i`` the weighted sum of its marginal contributions

    phi_i = sum_{S subset of N minus i} w(|S|) * (f(S + i) - f(S)),

with ``w(s)`` depending only on the size ``s`` (0..L-1) of the coalition of the *other*
players. `Weighting` describes ``w``: Shapley, Banzhaf, weighted Banzhaf(p), and the
paper's restricted strata. Rewriting the sum over all masks gives the closed form used by
the exact enumeration and the regression-adjusted estimator:

    phi_i = sum_m f(m) * q_i(m),   q_i(m) = w(|m| - 1) if m_i else -w(|m|).

Results are `Contributions` records (frozen, ``to_dict()`` for JSON).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from engine.errors import EstimationError
from engine.jsonable import jsonable

ValueFn = Callable[[np.ndarray], np.ndarray]

EXACT_MAX_L = 22  # 2^22 masks: enumeration is a few seconds on a surrogate
DEFAULT_CHUNK = 2**16  # masks per value-function call
DRAW_BLOCK = 2**16  # base masks drawn (and passed to flip_values) at a time by the Monte Carlo estimators


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class Contributions:
    """One estimate of every layer's contribution.

    values: float[L]; stderr: float[L] (Monte Carlo standard error, or spread over an
    ensemble) or None for exact results; estimator: human-readable name; n_evaluations:
    number of masks on which the value function was called; details: estimator-specific,
    JSON-able after `to_dict`.
    """

    values: np.ndarray
    stderr: np.ndarray | None
    estimator: str
    n_evaluations: int
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return jsonable(
            {
                "values": self.values,
                "stderr": self.stderr,
                "estimator": self.estimator,
                "n_evaluations": self.n_evaluations,
                "details": self.details,
            }
        )


@dataclass(frozen=True)
class Efficiency:
    """Shapley efficiency: sum(values) should equal f(all kept) - f(none kept)."""

    total: float
    grand_minus_empty: float
    gap: float

    def to_dict(self) -> dict:
        return jsonable(self.__dict__)


# ---------------------------------------------------------------- weightings


@dataclass(frozen=True)
class Weighting:
    """A semivalue's weight w(s) over the size s = 0..L-1 of the other players' coalition.

    kind: shapley | banzhaf | weighted_banzhaf (uses p) | restricted_strata (uses strata,
    the kept-layer counts of the sampling strata, and stratum_probs, default uniform).
    Build with the module constants / factories: SHAPLEY, BANZHAF, weighted_banzhaf(p),
    restricted_strata(strata).
    """

    kind: str
    p: float | None = None
    strata: tuple[int, ...] | None = None
    stratum_probs: tuple[float, ...] | None = None

    @property
    def name(self) -> str:
        if self.kind == "shapley":
            return "Shapley"
        if self.kind == "banzhaf":
            return "Banzhaf"
        if self.kind == "weighted_banzhaf":
            return f"weighted Banzhaf (p={self.p:g})"
        if self.kind == "sampled_strata":
            return f"restricted-strata semivalue on the sampled kept counts ({list(self.strata)} and the full mask)"
        return f"restricted-strata semivalue (paper; kept counts {list(self.strata)})"

    def vector(self, L: int) -> np.ndarray:
        """w(s) for s = 0..L-1, float[L]."""
        s = np.arange(L)
        comb = np.array([math.comb(L - 1, k) for k in range(L)], dtype=np.float64)
        if self.kind == "shapley":
            return 1.0 / (L * comb)
        if self.kind == "banzhaf":
            return np.full(L, 0.5 ** (L - 1))
        if self.kind == "weighted_banzhaf":
            p = float(self.p)
            return p**s * (1.0 - p) ** (L - 1 - s)
        if self.kind == "restricted_strata":
            # The paper draws m with |m| = k in the strata, then compares m with i kept and
            # with i dropped; the other players' coalition S = m minus i has size k-1 (i in m)
            # or k (i not in m), each mask of size k having probability pi_k / C(L, k).
            pi = self.size_distribution(L)
            binom = np.array([math.comb(L, k) for k in range(L + 1)], dtype=np.float64)
            return pi[s + 1] / binom[s + 1] + pi[s] / binom[s]
        if self.kind == "sampled_strata":
            return _sampled_vector(self, L)
        raise EstimationError(f"unknown semivalue weighting {self.kind!r}")

    def size_distribution(self, L: int) -> np.ndarray:
        """Distribution pi[k], k = 0..L, of the kept count of the masks the Monte Carlo
        estimator draws (uniform within a count), chosen so that the coalition S = m minus i
        has probability exactly w(|S|) for every player i: uniform counts for Shapley (from
        1/C(L,s) + 1/C(L,s+1) = (L+1) / (L C(L-1,s))), Binomial(L, p) for (weighted) Banzhaf,
        the strata for restricted_strata."""
        k = np.arange(L + 1)
        binom = np.array([math.comb(L, j) for j in k], dtype=np.float64)
        if self.kind == "shapley":
            return np.full(L + 1, 1.0 / (L + 1))
        if self.kind in ("banzhaf", "weighted_banzhaf"):
            p = 0.5 if self.kind == "banzhaf" else float(self.p)
            return binom * p**k * (1.0 - p) ** (L - k)
        if self.kind == "restricted_strata":
            pi = np.zeros(L + 1)
            probs = self.stratum_probs or tuple(1.0 / len(self.strata) for _ in self.strata)
            for kk, pk in zip(self.strata, probs):
                pi[kk] += pk
            return pi / pi.sum()
        if self.kind == "sampled_strata":
            raise EstimationError("the sampled-strata semivalue has no Monte Carlo sampler: compute it by enumeration "
                                  "(semivalue with n_samples=None, L <= 22, or contribution_intervals.semivalue_by_size)")
        raise EstimationError(f"unknown semivalue weighting {self.kind!r}")


def _sampled_vector(w: "Weighting", L: int) -> np.ndarray:
    """w(s), float[L], of sampled_strata: the paper's w(s) where both kept counts s and s + 1 are sampled
    (a stratum, or L: the full mask, known exactly), 0 elsewhere, rescaled so that sum_s C(L-1, s) w(s) = 1
    (each player's coalition weights sum to 1, as for the paper's)."""
    base = Weighting("restricted_strata", strata=w.strata, stratum_probs=w.stratum_probs).vector(L)  # (L,)
    known = set(w.strata) | {L}
    keep = np.array([s in known and s + 1 in known for s in range(L)])
    comb = np.array([math.comb(L - 1, k) for k in range(L)], dtype=np.float64)
    total = float(np.sum(comb * base * keep))
    if total <= 0:
        raise EstimationError(f"strata {list(w.strata)} hold no two adjacent kept counts (with the full mask, {L}): "
                              "the sampled-strata semivalue has no coalition to weigh; use the paper's strata weighting")
    return base * keep / total


def has_adjacent_strata(strata: Sequence[int], L: int) -> bool:
    """True when some kept counts s, s + 1 are both sampled (strata, or L): sampled_strata is defined."""
    known = set(int(k) for k in strata) | {L}
    return any(s in known and s + 1 in known for s in range(L))


SHAPLEY = Weighting("shapley")
BANZHAF = Weighting("banzhaf")


def weighted_banzhaf(p: float) -> Weighting:
    if not 0.0 < p < 1.0:
        raise EstimationError(f"weighted Banzhaf needs 0 < p < 1, got {p}")
    return Weighting("weighted_banzhaf", p=float(p))


def restricted_strata(strata: Sequence[int], stratum_probs: Sequence[float] | None = None) -> Weighting:
    """The paper's weighting: masks drawn from the given kept-layer counts (uniform over strata
    unless stratum_probs says otherwise)."""
    strata = tuple(int(k) for k in strata)
    if not strata:
        raise EstimationError("restricted strata need at least one kept-layer count")
    if stratum_probs is not None:
        if len(stratum_probs) != len(strata) or min(stratum_probs) < 0 or sum(stratum_probs) <= 0:
            raise EstimationError("stratum_probs must be one non-negative number per stratum")
        stratum_probs = tuple(float(p) for p in stratum_probs)
    return Weighting("restricted_strata", strata=strata, stratum_probs=stratum_probs)


def sampled_strata(strata: Sequence[int], stratum_probs: Sequence[float] | None = None) -> Weighting:
    """The paper's weighting restricted to the coalitions a stratified run observes: a marginal contribution
    f(S + i) - f(S) counts only when both kept counts |S| and |S| + 1 were sampled (a stratum, or the full
    mask), with the paper's relative weights, renormalised. Every mask it weighs has a kept count the run
    drew masks from, so a regression-adjusted estimate of it needs no bias allowance."""
    w = restricted_strata(strata, stratum_probs)
    return Weighting("sampled_strata", strata=w.strata, stratum_probs=w.stratum_probs)


def _check_strata(w: Weighting, L: int) -> None:
    if w.kind in ("restricted_strata", "sampled_strata") and not all(0 <= k <= L for k in w.strata):
        raise EstimationError(f"strata {list(w.strata)} must be kept-layer counts between 0 and {L}")


# ---------------------------------------------------------------- helpers


def _evaluate(f: ValueFn, masks: np.ndarray, chunk: int) -> np.ndarray:
    """f over masks in chunks of `chunk` rows, float64[n]."""
    out = np.empty(len(masks), dtype=np.float64)
    for a in range(0, len(masks), chunk):
        v = np.asarray(f(masks[a : a + chunk]), dtype=np.float64).reshape(-1)
        if len(v) != min(chunk, len(masks) - a):
            raise EstimationError(f"value function returned {len(v)} values for {min(chunk, len(masks) - a)} masks")
        out[a : a + chunk] = v
    return out


def flip_values(f: ValueFn, base: np.ndarray, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """f at each base mask and at each one-layer flip of it, float64[n, L+1]: column 0 is
    f(base), column 1 + i is f(base with layer i flipped). Uses ``f.flip_values`` when f has
    one; otherwise builds the flipped masks, (L + 1) * n evaluations in chunks of `chunk`."""
    base = np.asarray(base, dtype=bool)
    n, L = base.shape
    fast = getattr(f, "flip_values", None)
    if fast is not None:
        v = np.asarray(fast(base), dtype=np.float64)
        if v.shape != (n, L + 1):
            raise EstimationError(f"flip_values returned shape {v.shape} for {n} base masks of {L} layers")
        return v
    out = np.empty((n, L + 1), dtype=np.float64)
    idx = np.arange(L)
    per_block = max(1, chunk // (L + 1))
    for a in range(0, n, per_block):
        b = base[a : a + per_block]  # (c, L)
        flipped = np.repeat(b[:, None, :], L, axis=1)  # (c, L, L): row i = base with layer i flipped
        flipped[:, idx, idx] = ~flipped[:, idx, idx]
        allm = np.concatenate([b[:, None, :], flipped], axis=1).reshape(-1, L)  # (c*(L+1), L)
        out[a : a + len(b)] = _evaluate(f, allm, chunk).reshape(len(b), L + 1)
    return out


def _masks_from_codes(codes: np.ndarray, L: int) -> np.ndarray:
    """Integer codes -> bool[n, L]; bit j of the code is layer j."""
    return ((codes[:, None] >> np.arange(L, dtype=np.int64)[None, :]) & 1).astype(bool)


def signed_weights(masks: np.ndarray, w: np.ndarray) -> np.ndarray:
    """q_i(m) = w(|m|-1) if m_i else -w(|m|), float[n, L], so that phi = sum_m f(m) q(m)."""
    masks = np.asarray(masks, dtype=bool)
    L = masks.shape[1]
    size = masks.sum(axis=1)
    w_in = np.concatenate([[0.0], w])[size]  # w(|m|-1), 0 for the empty mask
    w_out = np.concatenate([w, [0.0]])[size]  # w(|m|), 0 for the full mask
    return np.where(masks, w_in[:, None], -w_out[:, None])  # (n, L)


def _random_masks_of_sizes(sizes: np.ndarray, L: int, rng: np.random.Generator) -> np.ndarray:
    """One uniformly random mask per requested kept count, bool[n, L].

    Floyd's sampling algorithm, vectorised over rows: each row picks its smaller side (the
    kept or the dropped layers, d = min(k, L - k)) in d steps; step j draws t in [0, j] and
    takes t, or j if t is taken already. Twice as fast as ranking random keys (the paper's
    strata keep most layers, so d is small)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    n = len(sizes)
    d = np.minimum(sizes, L - sizes)  # (n,) layers each row picks
    order = np.argsort(-d, kind="stable")  # rows by d, largest first: the rows of a step are a prefix
    n_active = np.searchsorted(-d[order], -np.arange(L + 1), side="right")  # rows with d >= r, r = 0..L
    picked = np.zeros(n * L, dtype=bool)  # flat (n, L)
    for j in range(L - int(d.max(initial=0)), L):
        offsets = order[: n_active[L - j]] * L  # rows still picking at this step
        t = rng.integers(0, j + 1, size=len(offsets))
        t = np.where(picked[offsets + t], j, t)
        picked[offsets + t] = True
    return picked.reshape(n, L) ^ (sizes > L - sizes)[:, None]  # rows that picked dropped layers: complement


# ---------------------------------------------------------------- semivalues


def _exact(f: ValueFn, L: int, weighting: Weighting, chunk: int) -> Contributions:
    if L > EXACT_MAX_L:
        raise EstimationError(
            f"exact enumeration of 2^{L} masks is too large (limit L <= {EXACT_MAX_L}); "
            "use permutation_shapley or semivalue(..., n_samples=...) instead"
        )
    w = weighting.vector(L)
    phi = np.zeros(L)
    total = 1 << L
    for start in range(0, total, chunk):
        masks = _masks_from_codes(np.arange(start, min(start + chunk, total), dtype=np.int64), L)  # (c, L)
        v = _evaluate(f, masks, chunk)  # (c,)
        phi += v @ signed_weights(masks, w)  # (L,)
    return Contributions(phi, None, f"{weighting.name}, exact (2^{L} masks)", total, {"method": "exact enumeration"})


def _monte_carlo(f: ValueFn, L: int, weighting: Weighting, n_samples: int, seed: int, chunk: int) -> Contributions:
    """Draw masks m by kept count ~ pi, compare m with each layer kept and dropped ((L+1)
    evaluations per m, batched), weight by w(s) / p(s): 1 by construction of size_distribution, kept so that
    any size distribution covering the weighting stays unbiased."""
    if n_samples < 2:
        raise EstimationError("Monte Carlo semivalue needs n_samples >= 2")
    rng = np.random.default_rng(seed)
    pi = weighting.size_distribution(L)
    w = weighting.vector(L)
    binom = np.array([math.comb(L, k) for k in range(L + 1)], dtype=np.float64)
    s = np.arange(L)
    p_s = pi[s + 1] / binom[s + 1] + pi[s] / binom[s]  # probability of a given coalition S of size s
    iw = np.divide(w, p_s, out=np.zeros(L), where=p_s > 0)  # (L,) importance weight by |S|
    # by the base's kept count k: weight of f(m+i) - f(m-i) = -(v_i - v_0) * iw(k - 1) for a
    # kept layer i (|S| = k - 1), +(v_i - v_0) * iw(k) for a dropped one (|S| = k)
    w_kept = -np.concatenate([[0.0], iw])  # (L+1,)
    w_dropped = np.concatenate([iw, [0.0]])  # (L+1,)
    mean, m2 = np.zeros(L), np.zeros(L)  # running mean and sum of squared deviations of the per-draw terms
    for a in range(0, n_samples, DRAW_BLOCK):  # draws do not depend on `chunk`: same seed, same masks
        b = min(a + DRAW_BLOCK, n_samples)
        sizes = rng.choice(L + 1, size=b - a, p=pi)
        base = _random_masks_of_sizes(sizes, L, rng)  # (c, L)
        v = flip_values(f, base, chunk)  # (c, L+1): f(base), f(base with layer i flipped)
        terms = np.subtract(v[:, 1:], v[:, :1])  # (c, L) per-draw estimate of phi
        terms *= np.where(base, w_kept[sizes][:, None], w_dropped[sizes][:, None])
        n_b = b - a
        mean_b = terms.sum(axis=0) / n_b
        m2_b = np.einsum("ij,ij->j", terms, terms) - n_b * mean_b**2
        delta = mean_b - mean  # Chan et al.'s pairwise update: exact for any split into blocks
        mean += delta * (n_b / b)
        m2 += m2_b + delta**2 * (a * n_b / b)
    values = mean
    stderr = np.sqrt(np.maximum(m2, 0.0) / (n_samples - 1) / n_samples)
    details = {"method": "Monte Carlo", "n_samples": n_samples, "seed": seed, "size_distribution": pi}
    return Contributions(values, stderr, f"{weighting.name}, Monte Carlo ({n_samples} masks x {L + 1})",
                         n_samples * (L + 1), details)


def semivalue(
    f: ValueFn,
    L: int,
    weighting: Weighting,
    n_samples: int | None = None,
    seed: int = 0,
    chunk: int = DEFAULT_CHUNK,
) -> Contributions:
    """Any semivalue of f. Exact by enumeration when n_samples is None and L <= 22;
    otherwise Monte Carlo with n_samples base masks (default 20,000), each evaluated with
    every layer kept and dropped, (L+1) * n_samples evaluations in chunks of `chunk`."""
    _check_strata(weighting, L)
    if n_samples is None and L <= EXACT_MAX_L:
        return _exact(f, L, weighting, chunk)
    return _monte_carlo(f, L, weighting, 20_000 if n_samples is None else int(n_samples), seed, chunk)


def exact_shapley(f: ValueFn, L: int, chunk: int = DEFAULT_CHUNK) -> Contributions:
    """Shapley values by enumerating all 2^L masks (L <= 22), one pass in chunks."""
    if L > EXACT_MAX_L:
        raise EstimationError(
            f"exact Shapley over 2^{L} masks is too large (limit L <= {EXACT_MAX_L}); use permutation_shapley"
        )
    return semivalue(f, L, SHAPLEY, chunk=chunk)


def restricted_strata_semivalue(
    f: ValueFn, L: int, strata: Sequence[int], n_masks: int = 80_000, seed: int = 0, chunk: int = DEFAULT_CHUNK
) -> Contributions:
    """The paper's estimator: mean over masks m from the strata of f(m, i kept) - f(m, i dropped).

    This is a restricted-strata semivalue (only coalitions near the strata count), not the
    Shapley value. Masks are drawn with equal probability per stratum, uniform within it;
    (L+1) * n_masks evaluations in chunks.
    """
    return semivalue(f, L, restricted_strata(strata), n_samples=n_masks, seed=seed, chunk=chunk)


# ---------------------------------------------------------------- permutation sampling


def permutation_shapley(
    f: ValueFn,
    L: int,
    n_permutations: int = 2000,
    seed: int = 0,
    paired: bool = True,
    chunk: int = DEFAULT_CHUNK,
    n_checkpoints: int = 10,
) -> Contributions:
    """Shapley values by permutation sampling: each permutation adds the layers one at a time
    (L+1 masks, evaluated in one batch with many others). paired=True uses each permutation
    and its reverse (antithetic); n_permutations is then rounded up to an even number.

    details['convergence'] holds the running estimate at n_checkpoints points, and
    details['max_change_last_half'] the largest |running - final| over the second half.
    """
    if n_permutations < 2:
        raise EstimationError("permutation_shapley needs n_permutations >= 2")
    rng = np.random.default_rng(seed)
    n_units = (n_permutations + 1) // 2 if paired else n_permutations  # independent samples
    per_unit = 2 if paired else 1
    units_per_chunk = max(1, chunk // ((L + 1) * per_unit))
    steps = np.arange(L + 1)
    unit_est = np.empty((n_units, L))  # per independent unit, estimate of phi
    for a in range(0, n_units, units_per_chunk):
        b = min(a + units_per_chunk, n_units)
        ranks = np.argsort(rng.random((b - a, L)), axis=1).argsort(axis=1)  # (u, L) position of layer i
        if paired:
            ranks = np.stack([ranks, L - 1 - ranks], axis=1).reshape(-1, L)  # reverse permutation follows
        masks = ranks[:, None, :] < steps[None, :, None]  # (P, L+1, L): first t layers of the order kept
        v = _evaluate(f, masks.reshape(-1, L), chunk).reshape(len(ranks), L + 1)
        marg = np.take_along_axis(v, ranks + 1, axis=1) - np.take_along_axis(v, ranks, axis=1)  # (P, L)
        unit_est[a:b] = marg.reshape(b - a, per_unit, L).mean(axis=1)
    running = np.cumsum(unit_est, axis=0) / np.arange(1, n_units + 1)[:, None]
    values = running[-1]
    stderr = unit_est.std(axis=0, ddof=1) / math.sqrt(n_units) if n_units > 1 else None
    marks = sorted({max(1, round(n_units * (j + 1) / n_checkpoints)) for j in range(n_checkpoints)})
    half = running[n_units // 2 :]
    details = {
        "method": "permutation sampling" + (" (antithetic pairs)" if paired else ""),
        "n_permutations": n_units * per_unit,
        "seed": seed,
        "convergence": [{"n_permutations": m * per_unit, "values": running[m - 1]} for m in marks],
        "max_change_last_half": float(np.max(np.abs(half - values))),
        "max_stderr": float(np.max(stderr)) if stderr is not None else None,
    }
    return Contributions(values, stderr, f"Shapley, permutation sampling ({n_units * per_unit} permutations)",
                         n_units * per_unit * (L + 1), details)


# ---------------------------------------------------------------- ensembles, checks


def ensemble_mean(results: Sequence[Contributions]) -> Contributions:
    """One estimate from the same estimator run on each ensemble member's value function (`results`, one
    Contributions per member): values = mean, stderr = standard deviation over members (the spread of the
    fits); details keep the members' values and standard errors."""
    results = list(results)
    if not results:
        raise EstimationError("an ensemble estimate needs at least one value function")
    vals = np.stack([r.values for r in results])  # (k, L)
    spread = vals.std(axis=0, ddof=1) if len(results) > 1 else np.zeros(vals.shape[1])
    return Contributions(
        vals.mean(axis=0),
        spread,
        f"{results[0].estimator}, mean over {len(results)} surrogates",
        sum(r.n_evaluations for r in results),
        {"members": vals, "member_stderr": [r.stderr for r in results], "stderr_is": "std over ensemble members"},
    )


def efficiency_check(values: np.ndarray, f: ValueFn, L: int) -> Efficiency:
    """sum(values) against f(all kept) - f(none kept); a Shapley estimate should close the gap."""
    v = _evaluate(f, np.stack([np.ones(L, bool), np.zeros(L, bool)]), 2)
    total = float(np.sum(values))
    return Efficiency(total, float(v[0] - v[1]), total - float(v[0] - v[1]))
