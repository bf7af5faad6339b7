"""Multi-fidelity evaluation: work counting, partial masks, and their full-fidelity estimates (numpy only).

A mask's *fidelity* is the set of calibration windows it has been evaluated on. A partial row has
per-window losses with ``tokens == 0`` (and nll NaN) for the windows not evaluated yet; completing
it evaluates only those. Everything here is a pure function of such arrays.

Work is counted in token-layer calls: one decoder layer applied to one token of one window. A leaf
(the final norm, the LM head and the loss of one mask) counts as one layer call, so the work of a
batch evaluated with prefix sharing is ``(layer calls + distinct masks) x windows x seq_len``; the
evaluator (`engine.evaluate.MaskEvaluator.work`) and the benchmark replays (`count_work`) use this
one definition.

Full-fidelity estimate of a partial row (a *ratio estimator*, Cochran, Sampling Techniques ch. 6):
with per-token loss increases over the unmodified model ``d(S) = sum_S (nll - nll_full) / sum_S tokens``
on the evaluated windows S and ``D = d(all windows)`` (so score = ppl_full / ppl = exp(-D)), the
complete rows calibrate ``D ~ beta_S * d(S)`` for each pattern S of evaluated windows, with residual
variance proportional to ``|d(S)|`` (the model under which the ratio estimator is the best linear
unbiased one). Every partial row of pattern S then gets ``D_hat = beta_S * d(S)`` and a standard
error from that variance plus beta's own.

Which windows a mask is first evaluated on (`first_windows`): `first` consecutive windows from a start
drawn per mask (a hash of the mask and the sampling seed), so the partial rows spread over every
window pattern and the error of each one's first look is independent of the others'. An earlier
version gave every mask the same first windows (common random numbers): the masks' differences were
then measured on identical text, but the surrogate learnt the first windows' game, which ranks layers
differently from the full game (per-window loss increases correlate 0.78-0.97 on the demo model):
with 1 first window and 10% completed it reached Spearman 0.80 with the exact Shapley values at 512
masks (0.94 M token-layer calls), per-mask draws 0.94 at 512 masks (1.20 M), about what full-fidelity
stratified sampling reaches for the same work (bench/README.md, `adaptive`).
Selecting which rows to complete at random within each kept count (`to_complete`) keeps the
calibration rows like the rows it extrapolates to, and makes the complete design rows a uniform
subsample for the estimators.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

MIN_CALIBRATION = 8  # complete rows needed to calibrate a pattern; fewer: beta = 1 and a wide error


# ---------------------------------------------------------------- work


def work(layer_calls: int, leaves: int, n_windows: int, seq_len: int) -> int:
    """Evaluation work in token-layer calls: (layer_calls + leaves) x n_windows x seq_len."""
    return int((int(layer_calls) + int(leaves)) * int(n_windows) * int(seq_len))


def count_work(masks, n_windows: int, seq_len: int) -> int:
    """The work `MaskEvaluator` does for `masks` (bool[n, L]) in one prefix-shared batch on
    `n_windows` windows of `seq_len` tokens: trie nodes + one leaf per distinct mask."""
    m = np.atleast_2d(np.asarray(masks, dtype=bool))
    if m.shape[0] == 0:
        return 0
    distinct = len(np.unique(m, axis=0))
    return work(count_prefix_computations(m), distinct, n_windows, seq_len)


def count_prefix_computations(masks) -> int:
    """Distinct (kept-layer prefix, next kept layer) pairs over `masks` (bool[n, L]): the layer calls
    a prefix-shared walk of their trie makes (engine.evaluate re-exports it)."""
    m = np.atleast_2d(np.asarray(masks, dtype=bool))  # (n, L)
    seqs = sorted({tuple(int(i) for i in np.flatnonzero(row)) for row in m})  # distinct kept-layer sequences
    total, prev = 0, ()
    for s in seqs:
        shared = 0
        for x, y in zip(prev, s):
            if x != y:
                break
            shared += 1
        total += len(s) - shared
        prev = s
    return total


# ---------------------------------------------------------------- partial rows


def first_windows(mask_strings: Sequence[str], n_windows: int, first: int, seed: int = 0) -> list[tuple[int, ...]]:
    """Each mask's windows of a first evaluation: `first` consecutive windows (wrapping) of `n_windows`,
    starting at a window drawn from a hash of the mask's '0/1' string and `seed` (module docstring).
    A pure function of the mask, so a resumed, extended or replayed run gives it the same windows.
    first = 0 or >= n_windows: every window."""
    if first <= 0 or first >= n_windows:
        return [tuple(range(n_windows))] * len(mask_strings)
    out = []
    for s in mask_strings:
        h = hashlib.blake2b(f"{seed}:{s}".encode(), digest_size=8).digest()
        start = int.from_bytes(h, "little") % n_windows
        out.append(tuple(sorted((start + j) % n_windows for j in range(first))))
    return out


def evaluated(window_tokens) -> np.ndarray:
    """bool[n, W]: which windows of each row have been evaluated (tokens > 0)."""
    return np.asarray(window_tokens) > 0


def _increase(window_nll, window_tokens, full_nll, on: np.ndarray) -> np.ndarray:
    """float[n]: per-token loss increase over the unmodified model on the windows `on` (bool[n, W])."""
    nll = np.where(on, np.asarray(window_nll, dtype=np.float64), 0.0)  # (n, W)
    full = np.where(on, np.asarray(full_nll, dtype=np.float64)[None, :], 0.0)  # (n, W)
    tokens = np.where(on, np.asarray(window_tokens, dtype=np.float64), 0.0).sum(axis=1)  # (n,)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        return (nll - full).sum(axis=1) / tokens


def row_scores(ppl, ppl_full: float | None, window_nll=None, window_tokens=None, full_nll=None,
               full_tokens=None) -> tuple[np.ndarray, np.ndarray]:
    """(score float[n], nonfinite bool[n]) of evaluated rows: the one definition of a score, for fresh rows
    (the sampler) and completions (store.Writer.complete). With per-window losses (window_nll float[n, W],
    window_tokens int[n, W], the full model's full_nll float[W]): `subset_scores`, over each row's evaluated
    windows (= ppl_full / ppl when every window is evaluated); without: ppl_full / ppl, a non-finite ppl
    scoring 0 and flagged."""
    if window_nll is not None:
        return subset_scores(window_nll, window_tokens, full_nll, full_tokens)
    ppl = np.asarray(ppl, dtype=np.float64)
    nonfinite = ~np.isfinite(ppl)
    with np.errstate(divide="ignore", invalid="ignore"):
        score = np.where(nonfinite, 0.0, ppl_full / np.where(nonfinite, 1.0, ppl))
    return score, nonfinite


def subset_scores(window_nll, window_tokens, full_nll, full_tokens=None) -> tuple[np.ndarray, np.ndarray]:
    """(score float[n], nonfinite bool[n]): ppl_full / ppl over each row's evaluated windows (the
    unmodified model on the same windows); equals today's score for complete rows. A row with a
    non-finite loss on an evaluated window scores 0 and is flagged, as the evaluator does."""
    on = evaluated(window_tokens)
    d = _increase(window_nll, window_tokens, full_nll, on)
    nonfinite = ~np.isfinite(d) | ~on.any(axis=1)
    with np.errstate(over="ignore"):
        score = np.where(nonfinite, 0.0, np.exp(-np.where(nonfinite, 0.0, d)))
    return score, nonfinite


@dataclass(frozen=True)
class FullEstimate:
    """Full-fidelity estimates of every row (complete rows: exact, se 0)."""

    score: np.ndarray  # float[n]: estimated ppl_full / ppl on all windows (0 for non-finite rows)
    se: np.ndarray  # float[n]: standard error of `score` (0 for complete or non-finite rows)
    complete: np.ndarray  # bool[n]: every window evaluated
    n_windows: np.ndarray  # int[n]: windows evaluated
    beta: dict  # evaluated-window pattern ('0110..') -> (beta, tau2, calibration rows) used for it


def _calibrate(d_sub: np.ndarray, D: np.ndarray) -> tuple[float, float, int]:
    """(beta, tau2, n) of D ~ beta * d_sub with Var = tau2 * |d_sub| over finite calibration rows."""
    ok = np.isfinite(d_sub) & np.isfinite(D) & (np.abs(d_sub) > 1e-12)
    n = int(ok.sum())
    if n < MIN_CALIBRATION:
        return 1.0, float("nan"), n
    x, y = d_sub[ok], D[ok]
    beta = float(y.sum() / x.sum())  # the ratio estimator (BLUE when Var is proportional to x)
    tau2 = float(((y - beta * x) ** 2 / np.abs(x)).sum() / (n - 1))
    return beta, tau2, n


def estimate_full(window_nll, window_tokens, full_nll, full_tokens=None) -> FullEstimate:
    """Estimated full-fidelity score of every row from its evaluated windows (module docstring).

    window_nll float[n, W] (NaN where not evaluated), window_tokens int[n, W] (0 there),
    full_nll float[W]: the unmodified model's summed NLL per window. A pattern with fewer than
    MIN_CALIBRATION complete rows to learn from gets beta = 1 and a relative error of
    sqrt(1 - |S|/W) (as if every unseen window could differ by as much as the mean)."""
    nll = np.asarray(window_nll, dtype=np.float64)
    tokens = np.asarray(window_tokens)
    on = evaluated(tokens)  # (n, W)
    n, W = on.shape
    complete = on.all(axis=1)
    D = _increase(nll, tokens, full_nll, on)  # (n,): exact for complete rows, d(S) for partial ones
    D_hat, var_D = D.copy(), np.zeros(n)
    betas: dict = {}
    partial = np.flatnonzero(~complete & on.any(axis=1))
    patterns = {}
    for i in partial:
        patterns.setdefault(on[i].tobytes(), []).append(i)
    full_rows = np.flatnonzero(complete)
    for key, rows in patterns.items():
        S = np.frombuffer(key, dtype=bool)  # (W,)
        rows = np.asarray(rows)
        d_cal = _increase(nll[full_rows], tokens[full_rows], full_nll, np.broadcast_to(S, (len(full_rows), W)))
        beta, tau2, n_cal = _calibrate(d_cal, D[full_rows])
        x = D[rows]  # d(S) of the partial rows
        if np.isfinite(tau2):
            sx = np.abs(d_cal[np.isfinite(d_cal) & np.isfinite(D[full_rows])]).sum()
            var_beta = tau2 / max(sx, 1e-12)
            var_D[rows] = tau2 * np.abs(x) + x**2 * var_beta
        else:
            var_D[rows] = (1.0 - S.sum() / W) * x**2
        D_hat[rows] = beta * x
        betas["".join("1" if b else "0" for b in S)] = (beta, tau2, n_cal)
    nonfinite = ~np.isfinite(D_hat) | ~on.any(axis=1)
    safe = np.where(nonfinite, 0.0, D_hat)
    with np.errstate(over="ignore"):
        score = np.where(nonfinite, 0.0, np.exp(-safe))
    se = np.where(nonfinite, 0.0, score * np.sqrt(np.where(nonfinite, 0.0, var_D)))  # delta method on exp(-D)
    return FullEstimate(score, se, complete, on.sum(axis=1), betas)


def fit_weights(se, scale: float | None = None) -> np.ndarray:
    """float[n] sample weights for the surrogate fit: scale^2 / (scale^2 + se^2), 1 for exact rows.

    Inverse-variance weighting needs the surrogate's own residual variance, unknown before the fit;
    `scale` stands in for it (default: the median standard error of the partial rows, so a typical
    partial row counts half as much as a complete one and noisier ones less)."""
    se = np.asarray(se, dtype=np.float64)
    noisy = se > 0
    if not noisy.any():
        return np.ones_like(se)
    s = float(np.median(se[noisy])) if scale is None else float(scale)
    return s**2 / (s**2 + se**2)


def to_complete(estimate: FullEstimate, masks, fraction: float, seed=0) -> np.ndarray:
    """int[]: the partial rows to complete, about `fraction` of the partial rows of each kept-layer
    count, drawn uniformly at random within the count (seeded by `seed`, an int or a sequence).

    Random, not the best rows: the completed rows are then a uniform subsample of the design, so
    (1) the ratio estimator is calibrated on rows like the ones it extrapolates to, and (2) the
    regression-adjusted estimator can take its correction from the complete design rows alone
    (engine.estimators.real_rows) and stay unbiased for the full-fidelity game, while the partial
    rows still train the surrogate. Measured on the demo game (bench/adaptive.py): completing the
    best rows of each count and correcting with every row left the contributions at the first
    window's game (Spearman with the exact Shapley values stuck near 0.65 however many masks)."""
    masks = np.asarray(masks, dtype=bool)
    partial = np.flatnonzero(~estimate.complete & (estimate.n_windows > 0))
    if len(partial) == 0 or fraction <= 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    kept = masks[partial].sum(axis=1)
    picks = []
    for k in np.unique(kept):
        rows = partial[kept == k]
        m = min(len(rows), int(np.ceil(fraction * len(rows))))
        picks.append(rng.permutation(rows)[:m])
    return np.sort(np.concatenate(picks))


def plan_completion(estimate: FullEstimate, masks, share: float, seed=0) -> np.ndarray:
    """int[]: the partial rows to complete now so that about `share` of all evaluated rows are
    complete (the run's completion target; rows completed earlier count), picked by `to_complete`.
    The pipeline calls this after each batch of partial evaluations, the benchmark replays it."""
    n_rows = int((estimate.n_windows > 0).sum())
    n_partial = int((~estimate.complete & (estimate.n_windows > 0)).sum())
    need = int(np.ceil(share * n_rows)) - int(estimate.complete.sum())
    if need <= 0 or n_partial == 0:
        return np.zeros(0, dtype=np.int64)
    picks = to_complete(estimate, masks, min(1.0, need / n_partial), seed)
    return np.random.default_rng(seed).permutation(picks)[:need]
