"""Bootstrap resamples shared by every interval in the engine (numpy only): indices drawn with
replacement within groups (kept counts), and window counts (how often each of W windows is drawn in
each resample). `LEVEL` is the default interval level. Callers seed their own generator, so the
draws here depend only on it."""

from __future__ import annotations

import numpy as np

LEVEL = 0.9  # default interval level (config.MethodSpec.level has the same default)


def stratified_resample(groups: np.ndarray, rng: np.random.Generator, fixed=()) -> np.ndarray:
    """Indices of a bootstrap resample drawn with replacement within each group (kept count), int[n];
    groups in `fixed` (kept counts whose every mask was evaluated: no sampling noise) are kept as they are."""
    out = []
    for j in np.unique(groups):
        idx = np.flatnonzero(groups == j)
        out.append(idx if j in fixed else rng.choice(idx, size=len(idx), replace=True))
    return np.concatenate(out)


def stratified_resamples(groups: np.ndarray, rng: np.random.Generator, n_boot: int, fixed=()) -> np.ndarray:
    """int[n_boot, n]: `n_boot` calls of `stratified_resample(groups, rng, fixed)`, the same draws in the same
    order (rng.choice with replacement draws rng.integers(0, len(idx), len(idx))), the groups found once."""
    parts = [(np.flatnonzero(groups == j), j in fixed) for j in np.unique(groups)]
    out = np.empty((int(n_boot), sum(len(idx) for idx, _ in parts)), dtype=np.int64)
    for b in range(int(n_boot)):
        a = 0
        for idx, keep in parts:
            out[b, a : a + len(idx)] = idx if keep else idx[rng.integers(0, len(idx), len(idx))]
            a += len(idx)
    return out


def window_counts(rng: np.random.Generator, n_windows: int, n_boot: int) -> np.ndarray:
    """float[n_boot, n_windows]: how many times each window is drawn in each of `n_boot` resamples of the
    windows with replacement (a resampled sum over windows is counts @ per_window)."""
    W = int(n_windows)
    return np.stack([np.bincount(rng.integers(0, W, W), minlength=W) for _ in range(n_boot)]).astype(float)
