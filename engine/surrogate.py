"""Surrogate models of the score s(m) = PPL_full / PPL(m), with held-out fit diagnostics.

Inputs are numpy arrays: masks bool[n, L] (True = layer kept) and scores float[n]. Every
surrogate follows the `Surrogate` protocol: ``fit(masks, scores) -> self`` and
``predict(masks) -> float[n]`` (vectorised, chunked; safe on 2^20 masks).

Kinds (`SurrogateSpec.kind`):
- ``mlp``: the paper's network Linear(L, 2L) - CELU - Linear(2L, 1) - Sigmoid, MSE loss.
  Presets: ``adam`` (default; full-batch Adam, lr 0.01, up to 3000 steps, early stopping on a
  validation slice of the training data, best weights restored: converges at any budget) and
  ``paper`` (the reference schedule: SGD momentum 0.9, lr 0.008, StepLR(100, x0.1), 300 epochs,
  shuffled minibatches of 300, no validation).
- ``ridge-pairwise``: RidgeCV on the mask and all pairwise products (second-order game).
- ``gbt``: scikit-learn HistGradientBoostingRegressor.
- ``log-pairwise``: exp of a second-order game: RidgeCV on the mask and all pairwise products of
  log(score), each mask weighted by score^2 (so the fit approximates least squares on the score).
- ``mlp+log-pairwise``: the mean of the MLP (adam) and the log-pairwise model. On the demo game it
  ranks the pairwise Shapley interactions best at 256 stratified masks (bench/README.md), so
  `engine interactions` uses it by default (`INTERACTION_SURROGATE`).

`Ensemble` fits k members (MLP and mlp+log-pairwise: different init and validation split; others:
bootstrap resamples) for error bars. `split` holds out a stratified (by kept count) test part;
`diagnose`, `fit_with_diagnostics`, `learning_curve` and `compare` report R², Spearman and MAE
in score space and in perplexity space (predicted PPL = ppl_full / max(score, SCORE_FLOOR)),
overall and per kept count. Everything is seeded and deterministic.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, replace
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.linear_model import RidgeCV
from threadpoolctl import threadpool_limits

from engine.config import INTERACTION_SURROGATE, MIN_MASKS, SurrogateSpec  # noqa: F401 (re-exported)
from engine.errors import EstimationError
from engine.jsonable import jsonable
from engine.registry import Registry

SCORE_FLOOR = 1e-3  # scores are clipped here before conversion to perplexity (PPL <= 1000 x full)
PREDICT_CHUNK = 2**16
PRESETS = ("adam", "paper")
LOG_FLOOR = 1e-4  # scores are clipped here before the log of the log-pairwise surrogate
# Ensembles, learning curves, work curves and cross-fits fit their adam MLPs as one batched network
# (fit_mlps_batched) and the comparison reuses the ensemble's first MLP; False: one after another, each
# fitted anew (the code before issue 23, which bench/fit_speed.py times against).
BATCHED_FITS = True


def _check_weight(sample_weight, n: int) -> np.ndarray | None:
    """float64[n] non-negative finite weights with a positive sum, or None (every row counts 1)."""
    if sample_weight is None:
        return None
    w = np.asarray(sample_weight, dtype=np.float64).reshape(-1)
    if len(w) != n or not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise EstimationError(f"sample_weight must be {n} finite non-negative weights with a positive sum")
    return w


def _check_xy(masks, scores) -> tuple[np.ndarray, np.ndarray]:
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
def _few_threads(work: int):
    """Fit small problems on one thread (torch, BLAS and OpenMP); restored afterwards.

    Thread start-up dominates such small problems (several times slower on two busy cores than on
    one); the numbers are the same either way.
    """
    if work >= SINGLE_THREAD_WORK:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(before)


class Surrogate(Protocol):
    # sample_weight float[n] (None: all 1): each row's weight in the loss (partially evaluated rows
    # count less, engine.fidelity.fit_weights).
    def fit(self, masks: np.ndarray, scores: np.ndarray, sample_weight: np.ndarray | None = None) -> "Surrogate": ...

    def predict(self, masks: np.ndarray) -> np.ndarray: ...

    def __call__(self, masks: np.ndarray) -> np.ndarray: ...  # = predict: a fitted surrogate is a value function


class _ValueFunction:
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


# ---------------------------------------------------------------- MLP


class _Net(torch.nn.Module):
    """The paper's network: Linear(L, 2L) -> CELU -> Linear(2L, 1) -> Sigmoid."""

    def __init__(self, L: int):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(L, 2 * L), torch.nn.CELU(), torch.nn.Linear(2 * L, 1), torch.nn.Sigmoid()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, L) -> (n,)
        return self.body(x).squeeze(-1)


class MLPSurrogate(_ValueFunction):
    """The paper's network. preset 'adam' (default) or 'paper' (see module docstring).

    adam: full-batch Adam(lr) for up to max_steps; `val_fraction` of the training masks (chosen
    with `seed`) is held back for early stopping with `patience` steps; the best weights are
    restored. With fewer than 10 training masks no validation slice is taken.
    """

    def __init__(self, preset: str = "adam", seed: int = 0, lr: float | None = None, max_steps: int = 3000,
                 patience: int = 200, val_fraction: float = 0.15, epochs: int = 300, batch_size: int = 300):
        if preset not in PRESETS:
            raise EstimationError(f"unknown MLP preset {preset!r}; choose one of {', '.join(PRESETS)}")
        self.preset, self.seed = preset, seed
        self.lr = lr if lr is not None else (0.01 if preset == "adam" else 0.008)
        self.max_steps, self.patience, self.val_fraction = max_steps, patience, val_fraction
        self.epochs, self.batch_size = epochs, batch_size
        self.net: _Net | None = None
        self.history: dict = {}

    def fit(self, masks, scores, sample_weight=None) -> "MLPSurrogate":
        """Minimise the (sample_weight-weighted) mean squared error; weights None = plain MSE."""
        X, y = _check_xy(masks, scores)
        w = _check_weight(sample_weight, len(y))
        Xt = torch.as_tensor(X, dtype=torch.float32)  # (n, L)
        yt = torch.as_tensor(y, dtype=torch.float32)  # (n,)
        self._w = None if w is None else torch.as_tensor(w, dtype=torch.float32)  # (n,)
        with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
            torch.manual_seed(self.seed)
            self.net = _Net(X.shape[1])
        gen = torch.Generator().manual_seed(self.seed)
        with _few_threads(X.size):
            if self.preset == "paper":
                self._fit_paper(Xt, yt, gen)
            else:
                self._fit_adam(Xt, yt, gen)
        self.net.eval()
        del self._w
        return self

    def _loss(self, pred: torch.Tensor, y: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """MSE over the rows `idx` (None: all), weighted by the fit's sample weights when given."""
        if self._w is None:
            return torch.nn.functional.mse_loss(pred, y)
        w = self._w if idx is None else self._w[idx]
        return (w * (pred - y) ** 2).sum() / w.sum().clamp_min(1e-12)

    def _fit_paper(self, X: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> None:
        net = self.net
        opt = torch.optim.SGD(net.parameters(), lr=self.lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=100, gamma=0.1)
        for _ in range(self.epochs):
            order = torch.randperm(len(X), generator=gen)
            for a in range(0, len(X), self.batch_size):
                idx = order[a : a + self.batch_size]
                opt.zero_grad()
                loss = self._loss(net(X[idx]), y[idx], idx)
                loss.backward()
                opt.step()
            sched.step()
        with torch.no_grad():
            self.history = {"epochs": self.epochs, "train_mse": float(self._loss(net(X), y))}

    def _fit_adam(self, X: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> None:
        net = self.net
        n = len(X)
        n_val = int(round(n * self.val_fraction)) if n >= 10 else 0
        order = torch.randperm(n, generator=gen)
        val, tr = order[:n_val], order[n_val:]
        Xtr, ytr = X[tr], y[tr]
        Xv, yv, iv = (X[val], y[val], val) if n_val else (Xtr, ytr, tr)  # no slice: stop on training loss
        opt = torch.optim.Adam(net.parameters(), lr=self.lr)
        best, best_step, best_state = math.inf, 0, None
        step = 0
        for step in range(1, self.max_steps + 1):
            opt.zero_grad()
            loss = self._loss(net(Xtr), ytr, tr)
            loss.backward()
            opt.step()
            with torch.no_grad():
                v = float(self._loss(net(Xv), yv, iv))
            if v < best - 1e-12:
                best, best_step = v, step
                best_state = {k: t.detach().clone() for k, t in net.state_dict().items()}
            elif step - best_step >= self.patience:
                break
        if best_state is not None:
            net.load_state_dict(best_state)
        self.history = {"steps": step, "best_step": best_step, "val_mse": best, "n_val": n_val}

    def _is_fitted(self) -> bool:
        return self.net is not None

    def _predict_chunk(self, X: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.net(torch.as_tensor(X, dtype=torch.float32)).numpy()  # (c, L) -> (c,)

    def flip_values(self, base) -> np.ndarray:
        """predict at each base mask and its L one-layer flips, float64[n, L+1] (column 0 = base,
        column 1 + i = layer i flipped), without building the flipped masks: see
        engine/flip_kernel.py. engine.shapley's Monte Carlo estimators use it."""
        from engine.flip_kernel import mlp_flip_values  # numba loads on first use, not on import

        self._require_fitted()
        lin1, celu, lin2 = self.net.body[0], self.net.body[1], self.net.body[2]
        if celu.alpha != 1.0:
            raise EstimationError("the flip kernel assumes CELU(alpha=1), the paper's network")
        with torch.no_grad():
            W1, b1 = lin1.weight.numpy(), lin1.bias.numpy()  # (H, L), (H,)
            w2, b2 = lin2.weight[0].numpy(), float(lin2.bias[0])  # (H,), ()
            return mlp_flip_values(W1, b1, w2, b2, np.asarray(base, dtype=bool))


def fit_mlps_batched(members: Sequence[MLPSurrogate], X: np.ndarray, y: np.ndarray,
                     rows: Sequence[np.ndarray] | None = None, sample_weight: np.ndarray | None = None) -> list:
    """Fit several adam-preset MLPSurrogates at once as ONE batched network: their weights stacked
    (k, 2L, L) ..., one forward (einsum over members), one backward of the summed losses, one Adam step
    for all. Member j trains on X[rows[j]] (default: every row) exactly as `MLPSurrogate.fit` would:
    its own seeded init, validation slice and early stopping (a stopped member's best weights stay
    frozen while the others go on). Adam is per element and the members' losses share no parameter, so
    each member follows its own sequential fit up to floating-point summation order (within seed noise).
    Written by hand because torch.func.stack_module_state + vmap does not batch per-member early
    stopping and row subsets; this is the paper network's two layers, nothing more."""
    X, y = _check_xy(X, y)
    w = _check_weight(sample_weight, len(y))
    n, L = X.shape
    rows = [np.arange(n)] * len(members) if rows is None else [np.asarray(r, dtype=np.int64) for r in rows]
    if any(m.preset != "adam" for m in members) or len(rows) != len(members):
        raise EstimationError("fit_mlps_batched fits adam-preset MLPs, one row set per member")
    k = len(members)
    if k == 0:
        return []
    Xt = torch.as_tensor(X, dtype=torch.float32)  # (n, L)
    yt = torch.as_tensor(y, dtype=torch.float32)  # (n,)
    base = torch.ones(n) if w is None else torch.as_tensor(w, dtype=torch.float32)  # (n,)
    tr_w, val_w, n_vals = torch.zeros(k, n), torch.zeros(k, n), []  # (k, n): each member's row weights
    nets = []
    for j, (m, r) in enumerate(zip(members, rows)):
        with torch.random.fork_rng(devices=[]):  # the init MLPSurrogate.fit draws
            torch.manual_seed(m.seed)
            nets.append(_Net(L))
        gen = torch.Generator().manual_seed(m.seed)
        n_j = len(r)
        n_val = int(round(n_j * m.val_fraction)) if n_j >= 10 else 0
        order = torch.randperm(n_j, generator=gen)
        rt = torch.as_tensor(r)
        tr, val = rt[order[n_val:]], rt[order[:n_val]] if n_val else rt[order[n_val:]]
        tr_w[j].index_add_(0, tr, base[tr])
        val_w[j].index_add_(0, val, base[val])
        n_vals.append(n_val)
    W1 = torch.stack([net.body[0].weight.detach().T for net in nets]).contiguous().requires_grad_()  # (k, L, H)
    b1 = torch.stack([net.body[0].bias.detach()[None] for net in nets]).requires_grad_()  # (k, 1, H)
    w2 = torch.stack([net.body[2].weight.detach().T for net in nets]).contiguous().requires_grad_()  # (k, H, 1)
    b2 = torch.stack([net.body[2].bias.detach() for net in nets]).requires_grad_()  # (k, 1)
    params = [W1, b1, w2, b2]
    lr = {m.lr for m in members}
    if len(lr) != 1:
        raise EstimationError("fit_mlps_batched needs one learning rate for all members")
    try:  # the fused kernel: the same update, one call for all parameters
        opt = torch.optim.Adam(params, lr=lr.pop(), fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.Adam(params, lr=min(m.lr for m in members))
    tr_sum, val_sum = tr_w.sum(1).clamp_min(1e-12), val_w.sum(1).clamp_min(1e-12)  # (k,)
    Xk = Xt.expand(k, n, L)  # (k, n, L), a view

    def forward():  # (k, n): every member on every row
        h = torch.nn.functional.celu(torch.baddbmm(b1, Xk, W1))  # (k, n, H)
        return torch.sigmoid(torch.bmm(h, w2)[..., 0] + b2)  # (k, n)

    max_steps = max(m.max_steps for m in members)
    patience = torch.tensor([m.patience for m in members])
    limit = torch.tensor([m.max_steps for m in members])
    best = torch.full((k,), math.inf, dtype=torch.float64)
    best_step = torch.zeros(k, dtype=torch.long)
    stopped_at = torch.zeros(k, dtype=torch.long)
    active = torch.ones(k, dtype=torch.bool)
    best_state = [p.detach().clone() for p in params]
    step = 0
    with _few_threads(X.size * k):
        out = forward()
        for step in range(1, max_steps + 1):
            opt.zero_grad()
            ((tr_w * (out - yt) ** 2).sum(1) / tr_sum).sum().backward()
            opt.step()
            out = forward()  # the parameters after this step: next step's training forward and this step's check
            with torch.no_grad():
                v = ((val_w * (out.detach() - yt) ** 2).sum(1) / val_sum).double()  # (k,)
                better = active & (v < best - 1e-12)
                if better.any():
                    best = torch.where(better, v, best)
                    best_step = torch.where(better, torch.tensor(step), best_step)
                    for p, b in zip(params, best_state):
                        b[better] = p.detach()[better]
                done = active & ~better & (step - best_step >= patience)
                done |= active & (step >= limit)
                stopped_at = torch.where(done, torch.tensor(step), stopped_at)
                active &= ~done
            if not active.any():
                break
    stopped_at = torch.where(stopped_at == 0, torch.tensor(step), stopped_at)
    for j, (m, net) in enumerate(zip(members, nets)):
        with torch.no_grad():
            net.body[0].weight.copy_(best_state[0][j].T)
            net.body[0].bias.copy_(best_state[1][j, 0])
            net.body[2].weight.copy_(best_state[2][j].T)
            net.body[2].bias.copy_(best_state[3][j])
        m.net = net.eval()
        m.history = {"steps": int(stopped_at[j]), "best_step": int(best_step[j]), "val_mse": float(best[j]),
                     "n_val": n_vals[j], "batched": k}
    return list(members)


def fit_on_rows(spec: SurrogateSpec, X: np.ndarray, y: np.ndarray, rows: Sequence[np.ndarray],
                sample_weight: np.ndarray | None = None, seeds: Sequence[int] | None = None, **options) -> list:
    """One surrogate of `spec` (seed spec.seed) fitted on X[r] for each row set r: the adam MLPs (alone or
    inside mlp+log-pairwise) as one batched network (`fit_mlps_batched`), any other kind one after another.
    The same fitted functions as `make_surrogate(spec).fit(X[r], y[r], w[r])` for each r (within seed noise)."""
    seeds = [spec.seed] * len(rows) if seeds is None else list(seeds)  # one seed per row set (default spec.seed)
    models = [make_surrogate(spec, seed=seed, **options) for seed in seeds]
    w = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if BATCHED_FITS and spec.kind in ("mlp", "mlp+log-pairwise") and spec.preset == "adam" and len(rows) > 1:
        fit_mlps_batched([m if isinstance(m, MLPSurrogate) else m.mlp for m in models], X, y, rows, w)
        for m, r in zip(models, rows):
            if isinstance(m, HybridSurrogate):
                m.log_pairwise.fit(X[r], y[r], sample_weight=None if w is None else w[r])
        return models
    return [m.fit(X[r], y[r], sample_weight=None if w is None else w[r]) for m, r in zip(models, rows)]


class SingleFit:
    """`fit(X, y[, sample_weight]) -> value function` of one surrogate of `spec` (what estimators and intervals
    refit with), plus `on_rows(X, y, rows, sample_weight) -> [value function]`: one fit per row set, the adam
    MLPs batched (`fit_on_rows`; cross-fits and jackknife folds use it)."""

    def __init__(self, spec: SurrogateSpec, **options):
        self.spec, self.options = spec, options

    def __call__(self, X, y, sample_weight=None):
        return make_surrogate(self.spec, **self.options).fit(X, y, sample_weight=sample_weight).predict

    def on_rows(self, X, y, rows, sample_weight=None) -> list:
        return [m.predict for m in fit_on_rows(self.spec, X, y, rows, sample_weight, **self.options)]


# ---------------------------------------------------------------- ridge on pairwise features


class RidgePairwiseSurrogate(_ValueFunction):
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
        X, y = _check_xy(masks, scores)
        w = _check_weight(sample_weight, len(y))
        L = X.shape[1]
        with _few_threads(X.size):
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


class LogPairwiseSurrogate(_ValueFunction):
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
        X, y = _check_xy(masks, scores)
        w = _check_weight(sample_weight, len(y))
        yc = np.maximum(y, LOG_FLOOR)  # (n,)
        L = X.shape[1]
        weight = yc**2 if w is None else yc**2 * w  # (n,)
        with _few_threads(X.size):
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


class HybridSurrogate(_ValueFunction):
    """The mean of the paper's MLP (preset adam, `seed`) and a LogPairwiseSurrogate, both fitted on
    the same masks: the MLP's errors and the log-pairwise model's differ, and at 256 stratified masks
    their mean ranked the pairwise interactions of the demo game better than either (bench/README.md,
    Interactions). `parts()` gives both (their disagreement is the map's bias allowance)."""

    def __init__(self, seed: int = 0, **mlp_options):
        self.mlp = MLPSurrogate(preset="adam", seed=seed, **mlp_options)
        self.log_pairwise = LogPairwiseSurrogate(seed=seed)
        self.seed = seed

    def fit(self, masks, scores, sample_weight=None) -> "HybridSurrogate":
        self.mlp.fit(masks, scores, sample_weight=sample_weight)
        self.log_pairwise.fit(masks, scores, sample_weight=sample_weight)
        return self

    def parts(self) -> tuple[_ValueFunction, _ValueFunction]:
        """(the MLP, the log-pairwise model): the two value functions whose mean this is."""
        return self.mlp, self.log_pairwise

    def _is_fitted(self) -> bool:
        return self.mlp._is_fitted() and self.log_pairwise._is_fitted()

    def _predict_chunk(self, X: np.ndarray) -> np.ndarray:
        return 0.5 * (self.mlp._predict_chunk(X) + self.log_pairwise._predict_chunk(X))  # (c,)


# ---------------------------------------------------------------- gradient-boosted trees


class GBTSurrogate(_ValueFunction):
    """scikit-learn HistGradientBoostingRegressor on the raw mask bits."""

    def __init__(self, seed: int = 0, max_iter: int = 300, learning_rate: float = 0.1):
        self.seed, self.max_iter, self.learning_rate = seed, max_iter, learning_rate
        self.model: HistGradientBoostingRegressor | None = None

    def fit(self, masks, scores, sample_weight=None) -> "GBTSurrogate":
        X, y = _check_xy(masks, scores)
        w = _check_weight(sample_weight, len(y))
        model = HistGradientBoostingRegressor(
            max_iter=self.max_iter, learning_rate=self.learning_rate, min_samples_leaf=min(20, max(2, len(y) // 10)),
            early_stopping=False, random_state=self.seed,
        )
        with _few_threads(X.size):
            self.model = model.fit(X.astype(np.float32), y, sample_weight=w)
        return self

    def _is_fitted(self) -> bool:
        return self.model is not None

    def _predict_chunk(self, X: np.ndarray) -> np.ndarray:
        return self.model.predict(X.astype(np.float32))


@dataclass(frozen=True)
class SurrogateKind:
    """One registered surrogate: `make(seed, preset, **options)` returns an unfitted Surrogate."""

    name: str
    label: str  # short, for selectboxes and tables
    help: str
    make: Callable[..., Surrogate]
    presets: tuple[str, ...] = ()  # training presets (SurrogateSpec.preset); () = preset ignored
    bootstrap: bool = True  # ensemble members fitted on bootstrap resamples (False: all masks, seeds differ)


# The only list of surrogate kinds: the CLI's --surrogate choices, the app's selectbox and
# `compare` read it. Adding a kind is one entry here (a class with fit/predict) plus its test.
SURROGATES: Registry[SurrogateKind] = Registry("surrogate kind", {
    k.name: k for k in (
        SurrogateKind("mlp", "the paper's MLP", "Linear(L,2L)-CELU-Linear(2L,1)-Sigmoid; preset adam (full-batch, "
                      "early stopping) or paper (the reference SGD schedule)",
                      lambda seed, preset, **o: MLPSurrogate(preset=preset, seed=seed, **o), PRESETS, bootstrap=False),
        SurrogateKind("ridge-pairwise", "ridge, pairwise", "RidgeCV on the mask and all pairwise products "
                      "(the best second-order game)", lambda seed, preset, **o: RidgePairwiseSurrogate(seed=seed, **o)),
        SurrogateKind("gbt", "gradient-boosted trees", "scikit-learn HistGradientBoostingRegressor on the mask bits",
                      lambda seed, preset, **o: GBTSurrogate(seed=seed, **o)),
        SurrogateKind("log-pairwise", "exp of pairwise", "exp of a second-order game fitted by ridge on log(score), "
                      "weighted by score^2", lambda seed, preset, **o: LogPairwiseSurrogate(seed=seed, **o)),
        SurrogateKind("mlp+log-pairwise", "MLP + exp of pairwise", "mean of the MLP (adam) and the log-pairwise "
                      "model; the default of engine interactions",
                      lambda seed, preset, **o: HybridSurrogate(seed=seed, **o), bootstrap=False),
    )
}, error=EstimationError)
KINDS = tuple(SURROGATES)


def variants() -> tuple[str, ...]:
    """Every kind with each of its presets ('mlp:adam', 'mlp:paper', 'ridge-pairwise', 'gbt')."""
    return tuple(f"{k.name}:{p}" for k in SURROGATES.values() for p in k.presets) + tuple(
        k.name for k in SURROGATES.values() if not k.presets)


def variant_label(variant: str) -> str:
    name, _, preset = variant.partition(":")
    label = SURROGATES[name].label if name in SURROGATES else name
    return f"{label} ({preset})" if preset else label


def make_surrogate(spec: SurrogateSpec = SurrogateSpec(), seed: int | None = None, **options) -> Surrogate:
    """An unfitted surrogate of spec.kind (and spec.preset for mlp); `options` go to its constructor."""
    return SURROGATES.lookup(spec.kind).make(seed=spec.seed if seed is None else seed, preset=spec.preset, **options)


# ---------------------------------------------------------------- ensembles


class Ensemble(_ValueFunction):
    """k fitted surrogates. Members of kinds with ``bootstrap=False`` (mlp, mlp+log-pairwise) differ in
    seed (init and validation slice); other kinds are fitted on bootstrap resamples. predict = mean
    of members."""

    def __init__(self, spec: SurrogateSpec = SurrogateSpec(), k: int | None = None, batched: bool | None = None,
                 **options):
        self.spec = spec
        self.batched = BATCHED_FITS if batched is None else batched  # adam MLP members trained as one network
        self.k = spec.ensemble if k is None else k
        if self.k < 1:
            raise EstimationError("an ensemble needs at least one member")
        self.options = options
        self.members: list[Surrogate] = []

    def fit(self, masks, scores, sample_weight=None) -> "Ensemble":
        """Fit every member; sample_weight float[n] (None: all 1) goes to each member's fit (bootstrap
        members get the weights of the rows they drew)."""
        X, y = _check_xy(masks, scores)
        w = _check_weight(sample_weight, len(y))
        self.members = []
        if self.batched and self.k > 1 and self.spec.kind in ("mlp", "mlp+log-pairwise") and self.spec.preset == "adam":
            members = [make_surrogate(self.spec, seed=self.spec.seed + j, **self.options) for j in range(self.k)]
            mlps = [m if isinstance(m, MLPSurrogate) else m.mlp for m in members]
            fit_mlps_batched(mlps, X, y, sample_weight=w)  # one batched network for every member's MLP
            for m in members:
                if isinstance(m, HybridSurrogate):
                    m.log_pairwise.fit(X, y, sample_weight=w)
            self.members = members
            return self
        for j in range(self.k):
            seed = self.spec.seed + j
            member = make_surrogate(self.spec, seed=seed, **self.options)
            if not SURROGATES[self.spec.kind].bootstrap:
                member.fit(X, y, sample_weight=w)
            else:
                idx = np.random.default_rng(seed).integers(0, len(y), len(y)) if self.k > 1 else np.arange(len(y))
                member.fit(X[idx], y[idx], sample_weight=None if w is None else w[idx])
            self.members.append(member)
        return self

    def predict_all(self, masks) -> np.ndarray:
        """float[k, n]: every member's prediction."""
        if not self.members:
            raise EstimationError("ensemble is not fitted yet: call fit(masks, scores) first")
        return np.stack([m.predict(masks) for m in self.members])

    def predict(self, masks) -> np.ndarray:
        return self.predict_all(masks).mean(axis=0)

    def value_functions(self) -> list:
        """Each fitted member (a callable value function), for shapley.with_ensemble."""
        return list(self.members)


# ---------------------------------------------------------------- split and diagnostics


@dataclass(frozen=True)
class Split:
    """Indices into the masks: train / test (held out). stratified: by kept-layer count."""

    train: np.ndarray
    test: np.ndarray
    stratified: bool
    note: str = ""

    def to_dict(self) -> dict:
        return {"n_train": len(self.train), "n_test": len(self.test), "stratified": self.stratified, "note": self.note}


def split(masks, scores, holdout: float = 0.2, seed: int = 0, testable=None) -> Split:
    """Hold out ~`holdout` of each kept-count stratum (at least one mask from every stratum with
    two or more; strata with a single mask stay in training). Falls back to an unstratified
    random split (with a note) when stratifying leaves either side empty.

    testable bool[n] (None: every row): only these rows may be held out, ~`holdout` of them per
    stratum; the others always train (partially evaluated rows: their scores are estimates, so
    held-out metrics are computed on completely evaluated rows only)."""
    X, y = _check_xy(masks, scores)
    ok = np.ones(len(y), dtype=bool) if testable is None else np.asarray(testable, dtype=bool).reshape(-1)
    if not 0.0 < holdout < 1.0:
        raise EstimationError(f"holdout must be a fraction between 0 and 1, got {holdout}")
    rng = np.random.default_rng(seed)
    n = len(y)
    counts = X.sum(axis=1)
    train, test, singles = [], [], []
    for k in np.unique(counts):
        idx = rng.permutation(np.flatnonzero(counts == k))
        if len(idx) < 2:
            singles.append(int(k))
            train.append(idx)
            continue
        n_ok = int(ok[idx].sum())
        idx = np.concatenate([idx[ok[idx]], idx[~ok[idx]]])  # testable rows first, shuffled order kept
        n_test = min(max(int(round(n_ok * holdout)), 1), len(idx) - 1, n_ok)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    train_i = np.sort(np.concatenate(train)) if train else np.array([], int)
    test_i = np.sort(np.concatenate(test)) if test else np.array([], int)
    note = f"kept counts {singles} have a single mask and stay in training" if singles else ""
    if len(test_i) == 0 or len(train_i) < MIN_MASKS // 2:
        order = rng.permutation(n)
        order = np.concatenate([order[ok[order]], order[~ok[order]]])
        n_test = min(max(int(round(int(ok.sum()) * holdout)), 1), n - 1, int(ok.sum()))
        return Split(np.sort(order[n_test:]), np.sort(order[:n_test]), False,
                     "no kept-count stratum could be split: unstratified random split")
    return Split(train_i, test_i, True, note)


@dataclass(frozen=True)
class Metrics:
    """Fit quality on n masks. *_ppl: in perplexity (ppl_full / max(score, SCORE_FLOOR));
    mape_ppl: mean |predicted - true| / true perplexity. NaN where undefined (n < 2 or constant)."""

    n: int
    r2: float
    spearman: float
    mae: float
    mae_ppl: float
    mape_ppl: float

    def to_dict(self) -> dict:
        return jsonable(self.__dict__)


def metrics(y_true, y_pred, ppl_full: float = 1.0) -> Metrics:
    y = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    n = len(y)
    if n == 0:
        return Metrics(0, math.nan, math.nan, math.nan, math.nan, math.nan)
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum((y - p) ** 2)) / ss_tot if n >= 2 and ss_tot > 0 else math.nan
    rho = float(spearmanr(y, p).statistic) if n >= 2 and np.ptp(y) > 0 and np.ptp(p) > 0 else math.nan
    ppl_t = ppl_full / np.maximum(y, SCORE_FLOOR)
    ppl_p = ppl_full / np.maximum(p, SCORE_FLOOR)
    return Metrics(n, r2, rho, float(np.mean(np.abs(y - p))), float(np.mean(np.abs(ppl_t - ppl_p))),
                   float(np.mean(np.abs(ppl_t - ppl_p) / ppl_t)))


@dataclass(frozen=True)
class Diagnostics:
    """Metrics overall and per kept-layer count (stratum)."""

    overall: Metrics
    per_stratum: dict  # kept count (int) -> Metrics

    def to_dict(self) -> dict:
        return {"overall": self.overall.to_dict(), "per_stratum": {str(k): m.to_dict() for k, m in self.per_stratum.items()}}


def diagnose(masks, y_true, y_pred, ppl_full: float = 1.0) -> Diagnostics:
    counts = np.asarray(masks, dtype=bool).sum(axis=1)
    y_true, y_pred = np.asarray(y_true, float), np.asarray(y_pred, float)
    per = {int(k): metrics(y_true[counts == k], y_pred[counts == k], ppl_full) for k in np.unique(counts)}
    return Diagnostics(metrics(y_true, y_pred, ppl_full), per)


@dataclass(frozen=True)
class FitReport:
    """Held-out diagnostics of an ensemble fitted on the training part of a split."""

    spec: SurrogateSpec
    split: Split
    test: Diagnostics
    train: Metrics
    fit_seconds: float
    member_history: tuple = ()

    def to_dict(self) -> dict:
        return {
            "spec": dict(self.spec.__dict__),
            "split": self.split.to_dict(),
            "test": self.test.to_dict(),
            "train": self.train.to_dict(),
            "fit_seconds": self.fit_seconds,
            "member_history": jsonable(list(self.member_history)),
        }


@dataclass(frozen=True)
class FittedSurrogate:
    ensemble: Ensemble
    report: FitReport


def fit_with_diagnostics(masks, scores, spec: SurrogateSpec = SurrogateSpec(), ppl_full: float = 1.0,
                         sample_weight=None, testable=None, **options) -> FittedSurrogate:
    """Split (spec.holdout, spec.seed; only `testable` rows held out), fit an Ensemble of
    spec.ensemble members on the training part (weighted by `sample_weight`), and report held-out
    metrics. The returned ensemble is the one that was diagnosed."""
    X, y = _check_xy(masks, scores)
    w = _check_weight(sample_weight, len(y))
    sp = split(X, y, spec.holdout, spec.seed, testable)
    t0 = time.perf_counter()
    ens = Ensemble(spec, **options).fit(X[sp.train], y[sp.train], None if w is None else w[sp.train])
    secs = time.perf_counter() - t0
    report = FitReport(
        spec, sp, diagnose(X[sp.test], y[sp.test], ens.predict(X[sp.test]), ppl_full),
        metrics(y[sp.train], ens.predict(X[sp.train]), ppl_full), secs,
        tuple(getattr(m, "history", {}) for m in ens.members),
    )
    return FittedSurrogate(ens, report)


def fit_with_curve(masks, scores, spec: SurrogateSpec, sizes: Sequence[int], ppl_full: float = 1.0,
                   sample_weight=None, testable=None, **options) -> tuple[FittedSurrogate, "LearningCurve"]:
    """`fit_with_diagnostics(spec)` and `learning_curve(sizes, spec with ensemble=1)` on the same split, the
    ensemble's and the curve's adam MLPs trained as ONE batched network (`fit_on_rows`); other kinds, or
    BATCHED_FITS off, call the two functions. The same fitted functions either way (within seed noise)."""
    if not (BATCHED_FITS and spec.kind in ("mlp", "mlp+log-pairwise") and spec.preset == "adam"):
        fitted = fit_with_diagnostics(masks, scores, spec, ppl_full, sample_weight, testable, **options)
        one = replace(spec, ensemble=1)
        return fitted, learning_curve(masks, scores, sizes, one, ppl_full, sample_weight, testable, **options)
    X, y = _check_xy(masks, scores)
    w = _check_weight(sample_weight, len(y))
    sp = split(X, y, spec.holdout, spec.seed, testable)
    order = np.random.default_rng(spec.seed).permutation(sp.train)  # the learning curve's nested subsets
    kept = sorted({int(s) for s in sizes if MIN_MASKS <= int(s) <= len(order)})
    dropped = sorted({int(s) for s in sizes} - set(kept))
    if not kept:
        raise EstimationError(f"no size in {list(sizes)} fits: need {MIN_MASKS}..{len(order)} training masks")
    train = np.asarray(sp.train)
    k = spec.ensemble
    t0 = time.perf_counter()
    models = fit_on_rows(spec, X, y, [train] * k + [order[:s] for s in kept], w,
                         seeds=[spec.seed + j for j in range(k)] + [spec.seed] * len(kept), **options)
    secs = time.perf_counter() - t0
    ens = Ensemble(spec, **options)
    ens.members = models[:k]
    report = FitReport(
        spec, sp, diagnose(X[sp.test], y[sp.test], ens.predict(X[sp.test]), ppl_full),
        metrics(y[sp.train], ens.predict(X[sp.train]), ppl_full), secs,
        tuple(getattr(m, "history", {}) for m in ens.members),
    )
    curve = [metrics(y[sp.test], m.predict(X[sp.test]), ppl_full) for m in models[k:]]
    note = f"sizes {dropped} skipped (outside {MIN_MASKS}..{len(order)})" if dropped else ""
    return FittedSurrogate(ens, report), LearningCurve(tuple(kept), tuple(curve), len(sp.test), note)


@dataclass(frozen=True)
class LearningCurve:
    """Held-out metrics against the number of training masks (same test set for every size)."""

    sizes: tuple[int, ...]
    metrics: tuple[Metrics, ...]
    n_test: int
    note: str = ""

    def to_dict(self) -> dict:
        return {"sizes": list(self.sizes), "metrics": [m.to_dict() for m in self.metrics], "n_test": self.n_test,
                "note": self.note}


def learning_curve(masks, scores, sizes: Sequence[int], spec: SurrogateSpec = SurrogateSpec(),
                   ppl_full: float = 1.0, sample_weight=None, testable=None, **options) -> LearningCurve:
    """Fit one surrogate (seed spec.seed) on the first `size` masks of a seeded shuffle of the
    training part, for each size (nested subsets), and score it on the same held-out part
    (sample_weight / testable as in `fit_with_diagnostics`)."""
    X, y = _check_xy(masks, scores)
    w = _check_weight(sample_weight, len(y))
    sp = split(X, y, spec.holdout, spec.seed, testable)
    order = np.random.default_rng(spec.seed).permutation(sp.train)
    kept = sorted({int(s) for s in sizes if MIN_MASKS <= int(s) <= len(order)})
    dropped = sorted({int(s) for s in sizes} - set(kept))
    if not kept:
        raise EstimationError(f"no size in {list(sizes)} fits: need {MIN_MASKS}..{len(order)} training masks")
    models = fit_on_rows(spec, X, y, [order[:s] for s in kept], w, **options)  # one batched fit for the MLP
    out = [metrics(y[sp.test], model.predict(X[sp.test]), ppl_full) for model in models]
    note = f"sizes {dropped} skipped (outside {MIN_MASKS}..{len(order)})" if dropped else ""
    return LearningCurve(tuple(kept), tuple(out), len(sp.test), note)


def _parse_kind(kind: str, base: SurrogateSpec) -> SurrogateSpec:
    """'mlp', 'mlp:paper', 'ridge-pairwise', 'gbt' -> a spec."""
    name, _, preset = kind.partition(":")
    return replace(base, kind=name, preset=preset or base.preset)


@dataclass(frozen=True)
class Comparison:
    """One row per surrogate kind: held-out metrics on the same split."""

    rows: tuple[dict, ...]
    split: Split

    def to_dict(self) -> dict:
        return {"rows": jsonable(list(self.rows)), "split": self.split.to_dict()}


def compare(masks, scores, kinds: Sequence[str] | None = None,
            spec: SurrogateSpec = SurrogateSpec(), ppl_full: float = 1.0, sample_weight=None,
            testable=None, adam_mlp: "MLPSurrogate | None" = None) -> Comparison:
    """Fit each kind ('mlp:paper' picks a preset) once (seed spec.seed) on the same training part;
    held-out metrics and fit time per kind (sample_weight / testable as in `fit_with_diagnostics`).
    `adam_mlp`: an adam MLP already fitted with seed spec.seed on that training part (the ensemble's first
    member): mlp:adam is that fit and mlp+log-pairwise's MLP part too (`reused`; fit_seconds then count
    only what was fitted here)."""
    X, y = _check_xy(masks, scores)
    w = _check_weight(sample_weight, len(y))
    sp = split(X, y, spec.holdout, spec.seed, testable)
    rows = []
    for kind in variants() if kinds is None else kinds:
        s = _parse_kind(kind, spec)
        t0 = time.perf_counter()
        tw = None if w is None else w[sp.train]
        reused = adam_mlp is not None and s.kind in ("mlp", "mlp+log-pairwise") and s.preset == "adam"
        if reused and s.kind == "mlp":
            model = adam_mlp
        elif reused:
            model = make_surrogate(s)
            model.mlp = adam_mlp  # the same network: same seed, same rows
            model.log_pairwise.fit(X[sp.train], y[sp.train], sample_weight=tw)
        else:
            model = make_surrogate(s).fit(X[sp.train], y[sp.train], sample_weight=tw)
        secs = time.perf_counter() - t0
        m = metrics(y[sp.test], model.predict(X[sp.test]), ppl_full)
        rows.append({"kind": s.kind, "preset": s.preset if s.kind == "mlp" else None, **m.__dict__,
                     "fit_seconds": secs, **({"reused": "the ensemble's first member's MLP"} if reused else {})})
    return Comparison(tuple(rows), sp)
