"""The scikit-learn surrogates: ridge on pairwise features (`RidgePairwiseSurrogate`, the best second-order
game), the exp of such a game fitted in log space (`LogPairwiseSurrogate`) and gradient-boosted trees
(`GBTSurrogate`). Deterministic given the seed; numpy in, numpy out."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.linear_model import RidgeCV

from engine.surrogate_base import ValueFunction, check_weight, check_xy, few_threads

LOG_FLOOR = 1e-4  # scores are clipped here before the log of the log-pairwise surrogate


# ---------------------------------------------------------------- ridge on pairwise features


class RidgePairwiseSurrogate(ValueFunction):
    """RidgeCV on [m, m_i m_j (i < j)]: the best second-order game (linear + pairwise terms).

    predict evaluates b + m.a + m^T B m directly (B upper-triangular), so 2^20 masks never
    materialise the L(L-1)/2 pairwise features.
    """

    def __init__(self, seed: int = 0, alphas: Sequence[float] = tuple(np.logspace(-4, 2, 13))):
        self.seed, self.alphas = seed, tuple(alphas)
        self.coef_lin: np.ndarray | None = None
        self.coef_pair: np.ndarray | None = None
        self.intercept = 0.0

    @staticmethod
    def features(X: np.ndarray) -> np.ndarray:
        iu, ju = np.triu_indices(X.shape[1], k=1)
        Xf = X.astype(np.float64)
        return np.concatenate([Xf, Xf[:, iu] * Xf[:, ju]], axis=1)  # (n, L + L(L-1)/2)

    def fit(self, masks, scores, sample_weight=None) -> "RidgePairwiseSurrogate":
        X, y = check_xy(masks, scores)
        w = check_weight(sample_weight, len(y))
        L = X.shape[1]
        with few_threads(X.size):
            model = RidgeCV(alphas=self.alphas).fit(self.features(X), y, sample_weight=w)
        self.alpha = float(model.alpha_)
        self.intercept = float(model.intercept_)
        self.coef_lin = model.coef_[:L].copy()
        B = np.zeros((L, L))
        B[np.triu_indices(L, k=1)] = model.coef_[L:]
        self.coef_pair = B
        return self

    def _is_fitted(self) -> bool:
        return self.coef_lin is not None

    def _predict_chunk(self, X: np.ndarray) -> np.ndarray:
        xb = X.astype(np.float64)  # (c, L)
        return self.intercept + xb @ self.coef_lin + np.einsum("nj,nj->n", xb @ self.coef_pair, xb)


class LogPairwiseSurrogate(ValueFunction):
    """exp of a second-order game: score ~ exp(b + m.a + m^T B m).

    Fit: RidgeCV on the features of RidgePairwiseSurrogate with target log(max(score, LOG_FLOOR))
    and sample weights max(score, LOG_FLOOR)^2 (a log-space error e costs about score * e in score
    space, so this is least squares on the score to first order; masks whose score is ~0 carry no
    weight). predict: exp of the fitted game, capped at `cap` (twice the largest of 1 and the highest
    training score) so that extrapolation cannot blow up. Deterministic; `seed` is unused.
    """

    def __init__(self, seed: int = 0, alphas: Sequence[float] = tuple(np.logspace(-4, 2, 13))):
        self.game = RidgePairwiseSurrogate(seed=seed, alphas=alphas)
        self.cap = math.inf

    def fit(self, masks, scores, sample_weight=None) -> "LogPairwiseSurrogate":
        """Weighted ridge in log space: row weight score^2 x sample_weight (None: 1)."""
        X, y = check_xy(masks, scores)
        w = check_weight(sample_weight, len(y))
        yc = np.maximum(y, LOG_FLOOR)  # (n,)
        L = X.shape[1]
        weight = yc**2 if w is None else yc**2 * w  # (n,)
        with few_threads(X.size):
            model = RidgeCV(alphas=self.game.alphas).fit(self.game.features(X), np.log(yc), sample_weight=weight)
        g = self.game
        g.alpha, g.intercept, g.coef_lin = float(model.alpha_), float(model.intercept_), model.coef_[:L].copy()
        g.coef_pair = np.zeros((L, L))
        g.coef_pair[np.triu_indices(L, k=1)] = model.coef_[L:]
        self.cap = 2.0 * max(1.0, float(y.max()))
        return self

    @property
    def alpha(self) -> float:
        return self.game.alpha

    def _is_fitted(self) -> bool:
        return self.game._is_fitted()

    def _predict_chunk(self, X: np.ndarray) -> np.ndarray:
        return np.minimum(np.exp(np.minimum(self.game._predict_chunk(X), 700.0)), self.cap)  # (c,)

# ---------------------------------------------------------------- gradient-boosted trees


class GBTSurrogate(ValueFunction):
    """scikit-learn HistGradientBoostingRegressor on the raw mask bits."""

    def __init__(self, seed: int = 0, max_iter: int = 300, learning_rate: float = 0.1):
        self.seed, self.max_iter, self.learning_rate = seed, max_iter, learning_rate
        self.model: HistGradientBoostingRegressor | None = None

    def fit(self, masks, scores, sample_weight=None) -> "GBTSurrogate":
        X, y = check_xy(masks, scores)
        w = check_weight(sample_weight, len(y))
        model = HistGradientBoostingRegressor(
            max_iter=self.max_iter, learning_rate=self.learning_rate, min_samples_leaf=min(20, max(2, len(y) // 10)),
            early_stopping=False, random_state=self.seed,
        )
        with few_threads(X.size):
            self.model = model.fit(X.astype(np.float32), y, sample_weight=w)
        return self

    def _is_fitted(self) -> bool:
        return self.model is not None

    def _predict_chunk(self, X: np.ndarray) -> np.ndarray:
        # one thread for small inputs: each of the max_iter trees is an OpenMP region, and on busy cores a
        # region waiting for a descheduled thread made 51 held-out masks take 0.5-4 s instead of 0.01 s
        with few_threads(X.size):
            return self.model.predict(X.astype(np.float32))
