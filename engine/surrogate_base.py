"""What every surrogate shares: the `Surrogate` protocol, the value-function base class, the input checks
and the thread limit for small fits (numpy + torch's thread setting; no model).

Masks are bool[n, L] (True = layer kept), scores float[n]. A fitted surrogate is a value function:
``s(masks) == s.predict(masks)``, evaluated in chunks of PREDICT_CHUNK masks (safe on 2^20 masks).
"""

from __future__ import annotations

import contextlib
from typing import Protocol

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from engine.config import MIN_MASKS
from engine.errors import EstimationError

SCORE_FLOOR = 1e-3  # scores are clipped here before conversion to perplexity (PPL <= 1000 x full)
PREDICT_CHUNK = 2**16


def check_weight(sample_weight, n: int) -> np.ndarray | None:
    """float64[n] non-negative finite weights with a positive sum, or None (every row counts 1)."""
    if sample_weight is None:
        return None
    w = np.asarray(sample_weight, dtype=np.float64).reshape(-1)
    if len(w) != n or not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise EstimationError(f"sample_weight must be {n} finite non-negative weights with a positive sum")
    return w


def check_xy(masks, scores) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(masks, dtype=bool)
    y = np.asarray(scores, dtype=np.float64).reshape(-1)
    if X.ndim != 2 or len(X) != len(y):
        raise EstimationError(f"masks must be bool[n, L] with one score each; got {X.shape} and {y.shape}")
    if len(y) < MIN_MASKS:
        raise EstimationError(f"a surrogate needs at least {MIN_MASKS} evaluated masks, got {len(y)}: sample more masks")
    if not np.all(np.isfinite(y)):
        raise EstimationError("scores contain NaN/inf: map non-finite perplexities to score 0 first (evaluate.scores)")
    return X, y


SINGLE_THREAD_WORK = 400_000  # n_masks * L below which the MLP fits on one thread


@contextlib.contextmanager
def few_threads(work: int, blas: bool = True):
    """Fit small problems on one thread (torch, and with `blas` BLAS and OpenMP too); restored afterwards.

    Thread start-up dominates such small problems (several times slower on two busy cores than on
    one); the numbers are the same either way. blas=False (`few_torch_threads`, predicting with a small
    network): torch's thread setting is free to change, threadpoolctl's scan of the loaded libraries
    costs about a millisecond per use.
    """
    if work >= SINGLE_THREAD_WORK:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1) if blas else contextlib.nullcontext():
            yield
    finally:
        torch.set_num_threads(before)


def few_torch_threads(work: int):
    """`few_threads` for torch alone (see there)."""
    return few_threads(work, blas=False)


class Surrogate(Protocol):
    # sample_weight float[n] (None: all 1): each row's weight in the loss (partially evaluated rows
    # count less, engine.fidelity.fit_weights).
    def fit(self, masks: np.ndarray, scores: np.ndarray, sample_weight: np.ndarray | None = None) -> "Surrogate": ...

    def predict(self, masks: np.ndarray) -> np.ndarray: ...

    def __call__(self, masks: np.ndarray) -> np.ndarray: ...  # = predict: a fitted surrogate is a value function


class ValueFunction:
    """Base of the surrogates: ``predict`` checks the fit and runs ``_predict_chunk`` over chunks of
    PREDICT_CHUNK masks; ``s(masks) == s.predict(masks)``, so a fitted surrogate is a value
    function for engine.shapley."""

    def _is_fitted(self) -> bool:
        raise NotImplementedError

    def _predict_chunk(self, X: np.ndarray) -> np.ndarray:  # bool (c, L) -> float (c,)
        raise NotImplementedError

    def _require_fitted(self) -> None:
        if not self._is_fitted():
            raise EstimationError("surrogate is not fitted yet: call fit(masks, scores) first")

    def predict(self, masks) -> np.ndarray:
        self._require_fitted()
        X = np.asarray(masks, dtype=bool)
        out = np.empty(len(X), dtype=np.float64)
        for a in range(0, len(X), PREDICT_CHUNK):
            out[a : a + PREDICT_CHUNK] = self._predict_chunk(X[a : a + PREDICT_CHUNK])
        return out

    def __call__(self, masks) -> np.ndarray:
        return self.predict(masks)
