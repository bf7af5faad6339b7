"""The paper's surrogate network, Linear(L, 2L) - CELU - Linear(2L, 1) - Sigmoid, MSE loss: `MLPSurrogate`
(presets ``adam`` and ``paper``, see engine/surrogate.py) and `fit_mlps_batched`, several adam MLPs trained
as one batched network (ensembles, learning curves, cross-fits)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from engine.errors import EstimationError
from engine.surrogate_base import ValueFunction, check_weight, check_xy, few_threads

PRESETS = ("adam", "paper")


class _Net(torch.nn.Module):
    """The paper's network: Linear(L, 2L) -> CELU -> Linear(2L, 1) -> Sigmoid."""

    def __init__(self, L: int):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(L, 2 * L), torch.nn.CELU(), torch.nn.Linear(2 * L, 1), torch.nn.Sigmoid()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, L) -> (n,)
        return self.body(x).squeeze(-1)


class MLPSurrogate(ValueFunction):
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
        X, y = check_xy(masks, scores)
        w = check_weight(sample_weight, len(y))
        Xt = torch.as_tensor(X, dtype=torch.float32)  # (n, L)
        yt = torch.as_tensor(y, dtype=torch.float32)  # (n,)
        self._w = None if w is None else torch.as_tensor(w, dtype=torch.float32)  # (n,)
        with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
            torch.manual_seed(self.seed)
            self.net = _Net(X.shape[1])
        gen = torch.Generator().manual_seed(self.seed)
        with few_threads(X.size):
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
    X, y = check_xy(X, y)
    w = check_weight(sample_weight, len(y))
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
    with few_threads(X.size * k):
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
