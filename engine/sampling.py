"""Mask samplers for the layer game (numpy only; knows nothing of models).

A mask is a row of a numpy ``bool`` array, ``True`` = layer kept. Two schemes:

* ``stratified`` (the paper): strata are kept-layer counts. Mask ``i`` belongs to
  stratum ``i % n_strata`` (round-robin), and inside a stratum the masks are a
  seeded stream of distinct uniform subsets of that size. So the counts per stratum
  are equal (they differ by at most one when ``n`` is not a multiple), and the
  sequence is *prefix-stable*: the masks for ``n_masks = n`` are the first ``n``
  masks for any ``n_masks = N > n``.
  When a stratum has fewer distinct masks than its share (``C(L, k)`` is small, e.g.
  ``k = L - 1``), it contributes all of them and then drops out of the rotation; the
  other strata take its turns. This keeps every row unique and the stream
  prefix-stable; asking for more masks than all strata hold raises SamplingError.
* ``size-uniform``: the coalition size is uniform on ``0..L``, then a uniform subset
  of that size (the distribution under which a size-weighted regression recovers
  Shapley values). A draw equal to an earlier one is skipped, so rows are unique
  (the small sizes 0, 1, L-1, L saturate quickly: this is sampling *without*
  replacement). ``paired=True`` emits each drawn mask followed by its complement.

Design probabilities for estimators: ``mask_probability`` gives the probability
that one draw of the scheme equals a mask (ignoring the de-duplication), and
``size_distribution`` the probability of each kept count.
"""

from __future__ import annotations

import math

import numpy as np

from engine.config import SamplingSpec
from engine.errors import SamplingError

# The paper keeps 30, 27, 24, 21, 18 of 32 layers, i.e. removes 2, 5, 8, 11, 14 of 32.
PAPER_REMOVED = (2, 5, 8, 11, 14)
PAPER_LAYERS = 32
SCHEMES = ("stratified", "size-uniform")
# A stratum with at most this many masks is drawn as a random permutation of all of
# them (exact, exhausts cleanly); larger strata use rejection sampling (duplicates rare).
_ENUMERATE_MAX = 1 << 20
# Draws are made in chunks of this fixed size; fixed (not derived from n) so that the
# random stream, and hence the masks, do not depend on how many are asked for.
_CHUNK = 1024


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _clean_strata(L: int, kept: list[int]) -> tuple[int, ...]:
    """Clip to 1..L-1, deduplicate, order from most kept to least kept."""
    if L < 2:
        raise SamplingError(f"a model with {L} layer(s) has no layer subsets to sample; it needs at least 2 layers.")
    return tuple(sorted({min(max(k, 1), L - 1) for k in kept}, reverse=True))


def default_strata(L: int) -> tuple[int, ...]:
    """Kept-layer counts of the paper scaled to L layers.

    Removed count = round_half_up(L * r) for r in 2/32, 5/32, 8/32, 11/32, 14/32, then
    kept = L - removed clipped to 1..L-1 and deduplicated. L=32 -> (30, 27, 24, 21, 18);
    L=16 -> (15, 13, 12, 10, 9); L=12 -> (11, 10, 9, 8, 7); L=4 -> (3, 2);
    L=2 -> (1,).
    """
    return _clean_strata(L, [L - _round_half_up(L * r / PAPER_LAYERS) for r in PAPER_REMOVED])


def strata_from_remove_range(L: int, lo: float, hi: float, n_strata: int = 5) -> tuple[int, ...]:
    """Strata whose removed fraction is spread evenly over [lo, hi] (e.g. 0.1..0.4).

    Removed count = round_half_up(L * f) for n_strata fractions f evenly spaced from lo
    to hi; kept counts clipped to 1..L-1 and deduplicated (so small L may give fewer).
    """
    if not (0.0 <= lo <= hi < 1.0):
        raise SamplingError(
            f"--remove-range must be two fractions 0 <= lo <= hi < 1 (e.g. 0.1,0.4); got {lo},{hi}."
        )
    if n_strata < 1:
        raise SamplingError(f"n_strata must be at least 1; got {n_strata}.")
    fractions = np.linspace(lo, hi, n_strata)
    return _clean_strata(L, [L - _round_half_up(L * float(f)) for f in fractions])


def resolve_strata(spec: SamplingSpec, L: int) -> tuple[int, ...]:
    """The kept-layer counts a stratified spec samples for an L-layer model."""
    if spec.strata is not None and spec.remove_range is not None:
        raise SamplingError("give either strata (kept-layer counts) or a remove range, not both.")
    if spec.strata is not None:
        strata = tuple(int(k) for k in spec.strata)
        bad = [k for k in strata if not 1 <= k <= L - 1]
        if not strata or bad:
            raise SamplingError(
                f"strata are kept-layer counts between 1 and {L - 1} for this {L}-layer model; "
                f"got {list(strata)}. Example: --strata {','.join(map(str, default_strata(L)))}"
            )
        if len(set(strata)) != len(strata):
            raise SamplingError(f"strata must be distinct kept-layer counts; got {list(strata)}.")
        return strata
    if spec.remove_range is not None:
        lo, hi = spec.remove_range
        return strata_from_remove_range(L, float(lo), float(hi))
    return default_strata(L)


def _unrank(rank: int, L: int, k: int) -> np.ndarray:
    """The rank-th k-subset of range(L) in lexicographic order, as a bool[L] mask."""
    mask = np.zeros(L, dtype=bool)
    start = 0
    for remaining in range(k, 0, -1):
        # Skip whole blocks of subsets whose smallest element is `start`.
        while True:
            block = math.comb(L - start - 1, remaining - 1)
            if rank < block:
                break
            rank -= block
            start += 1
        mask[start] = True
        start += 1
    return mask


def _random_subsets(rng: np.random.Generator, L: int, sizes: np.ndarray) -> np.ndarray:
    """One uniform subset per entry of `sizes`: keep the `size` smallest of L random keys."""
    keys = rng.random((len(sizes), L))  # (c, L)
    ranks = keys.argsort(axis=1).argsort(axis=1)  # (c, L) rank of each layer's key
    return ranks < sizes[:, None]  # (c, L)


class _StratumStream:
    """A seeded, prefix-stable stream of distinct k-subsets of L layers."""

    def __init__(self, L: int, k: int, seed: int):
        self.L, self.k = L, k
        self.capacity = math.comb(L, k)
        self.rng = np.random.default_rng([seed, L, k])
        self.enumerate = self.capacity <= _ENUMERATE_MAX
        self.order = self.rng.permutation(self.capacity) if self.enumerate else None
        self.seen: set[bytes] = set()
        self.buffer: list[np.ndarray] = []
        self.produced = 0

    def next(self) -> np.ndarray | None:
        """The next distinct mask, or None once all C(L, k) have been produced."""
        if self.produced >= self.capacity:
            return None
        if self.enumerate:
            mask = _unrank(int(self.order[self.produced]), self.L, self.k)
        else:
            while not self.buffer:
                chunk = _random_subsets(self.rng, self.L, np.full(_CHUNK, self.k))
                for row in chunk:
                    key = np.packbits(row).tobytes()
                    if key not in self.seen:
                        self.seen.add(key)
                        self.buffer.append(row)
                self.buffer.reverse()  # pop() from the end yields them in draw order
            mask = self.buffer.pop()
        self.produced += 1
        return mask


def _stratified(n: int, L: int, strata: tuple[int, ...], seed: int) -> np.ndarray:
    streams = [_StratumStream(L, k, seed) for k in strata]
    total = sum(s.capacity for s in streams)
    if n > total:
        raise SamplingError(
            f"asked for {n} masks but the strata {list(strata)} of a {L}-layer model hold only "
            f"{total} distinct masks; ask for at most {total} or add strata."
        )
    out = np.zeros((n, L), dtype=bool)
    active = list(streams)
    i = 0
    while i < n:
        for stream in list(active):
            if i == n:
                break
            mask = stream.next()
            if mask is None:
                active.remove(stream)
                continue
            out[i] = mask
            i += 1
    return out


def _size_uniform(n: int, L: int, paired: bool, seed: int) -> np.ndarray:
    if n > 2**L:
        raise SamplingError(f"asked for {n} masks but a {L}-layer model has only {2**L} distinct masks.")
    rng = np.random.default_rng([seed, L, 1 if paired else 0])
    out = np.zeros((n, L), dtype=bool)
    seen: set[bytes] = set()
    i = 0
    while i < n:
        sizes = rng.integers(0, L + 1, size=_CHUNK)
        for row in _random_subsets(rng, L, sizes):
            group = (row, ~row) if paired else (row,)
            key = np.packbits(row).tobytes()
            if key in seen:  # its complement was emitted with it too
                continue
            for mask in group:
                seen.add(np.packbits(mask).tobytes())
                if i < n:
                    out[i] = mask
                    i += 1
            if i == n:
                break
    return out


def sample_masks(spec: SamplingSpec, L: int) -> np.ndarray:
    """`spec.n_masks` distinct masks, bool[n, L], seeded and prefix-stable (see module doc)."""
    if spec.n_masks < 0:
        raise SamplingError(f"the number of masks must be >= 0; got {spec.n_masks}.")
    if spec.scheme == "stratified":
        if spec.paired:
            raise SamplingError("--paired applies to --scheme size-uniform only.")
        return _stratified(spec.n_masks, L, resolve_strata(spec, L), spec.seed)
    if spec.scheme == "size-uniform":
        if spec.strata is not None or spec.remove_range is not None:
            raise SamplingError("--strata/--remove-range apply to --scheme stratified only.")
        return _size_uniform(spec.n_masks, L, spec.paired, spec.seed)
    raise SamplingError(f"unknown sampling scheme {spec.scheme!r}; choose one of {', '.join(SCHEMES)}.")


def size_distribution(spec: SamplingSpec, L: int) -> np.ndarray:
    """float[L + 1]: probability that one draw keeps exactly k layers, k = 0..L."""
    p = np.zeros(L + 1)
    if spec.scheme == "stratified":
        strata = resolve_strata(spec, L)
        p[list(strata)] = 1.0 / len(strata)
    elif spec.scheme == "size-uniform":
        p[:] = 1.0 / (L + 1)
    else:
        raise SamplingError(f"unknown sampling scheme {spec.scheme!r}; choose one of {', '.join(SCHEMES)}.")
    return p


def mask_probability(spec: SamplingSpec, L: int, masks: np.ndarray) -> np.ndarray:
    """float[n]: probability that one draw of the scheme equals each mask.

    stratified: 1 / (n_strata * C(L, k)) for k in the strata, else 0;
    size-uniform: 1 / ((L + 1) * C(L, k)). With ``paired`` the same holds for every
    position (the complement of a size-uniform draw is itself size-uniform).
    De-duplication is ignored: these are the design probabilities.
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 2 or masks.shape[1] != L:
        raise SamplingError(f"masks must have shape (n, {L}); got {masks.shape}.")
    kept = masks.sum(axis=1)  # (n,)
    comb = np.array([math.comb(L, k) for k in range(L + 1)], dtype=float)  # (L+1,)
    return size_distribution(spec, L)[kept] / comb[kept]


def masks_to_strings(masks: np.ndarray) -> list[str]:
    """bool[n, L] -> ['0101...', ...] (the store's and JSON's mask format)."""
    return ["".join("1" if b else "0" for b in row) for row in np.asarray(masks, dtype=bool)]


def strings_to_masks(strings: list[str], L: int | None = None) -> np.ndarray:
    """['0101...', ...] -> bool[n, L]."""
    if not strings:
        return np.zeros((0, L or 0), dtype=bool)
    arr = np.array([[c == "1" for c in s] for s in strings], dtype=bool)
    if L is not None and arr.shape[1] != L:
        raise SamplingError(f"mask strings have {arr.shape[1]} layers, expected {L}.")
    return arr
