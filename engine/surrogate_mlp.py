"""The paper's surrogate network, Linear(L, 2L) - CELU - Linear(2L, 1) - Sigmoid, MSE loss: `MLPSurrogate`
(presets ``adam`` and ``paper``, see engine/surrogate.py) and `fit_mlps_batched`, several adam MLPs trained
as one batched network (ensembles, learning curves, cross-fits)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from engine.errors import EstimationError
from engine.surrogate_base import ValueFunction, check_weight, check_xy, few_threads, few_torch_threads

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
        # small inputs on one thread: on busy cores 51 masks took ~10 ms on two threads, ~0.2 ms on one
        with torch.no_grad(), few_torch_threads(X.size):
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
    (k, L, 2L) ..., one forward (baddbmm over members), one backward of the summed losses, one Adam step
    for all. Member j trains on X[rows[j]] (default: every row) exactly as `MLPSurrogate.fit` would:
    its own seeded init, validation slice and early stopping (a stopped member's best weights stay
    frozen; it leaves the batch, which the others' numbers do not depend on). Adam is per element and
    the members' losses share no parameter, so each member follows its own sequential fit up to
    floating-point summation order (within seed noise).

    Written by hand for speed (the fit is ~3,000 steps of tiny tensors, so per-step overhead is what
    costs): the backward is the two layers' gradients written out (autograd's own sigmoid and CELU
    backward kernels), Adam is torch's single-tensor update on one (k, P) parameter block (what
    `torch.optim.Adam` does to each member's tensors), the early-stopping bookkeeping is numpy on k
    numbers, and one forward per step serves as this step's validation check and the next step's
    training forward."""
    X, y = check_xy(X, y)
    w = check_weight(sample_weight, len(y))
    n, L = X.shape
    rows = [np.arange(n)] * len(members) if rows is None else [np.asarray(r, dtype=np.int64) for r in rows]
    if any(m.preset != "adam" for m in members) or len(rows) != len(members):
        raise EstimationError("fit_mlps_batched fits adam-preset MLPs, one row set per member")
    k = len(members)
    if k == 0:
        return []
    lrs = {m.lr for m in members}
    if len(lrs) != 1:
        raise EstimationError("fit_mlps_batched needs one learning rate for all members")
    lr = lrs.pop()
    H = 2 * L
    P = L * H + 2 * H + 1  # one member's parameters: W1 (L, H), b1 (H,), w2 (H,), b2 ()
    Xt = torch.as_tensor(X, dtype=torch.float32)  # (n, L)
    XT = Xt.T.contiguous()  # (L, n)
    yt = torch.as_tensor(y, dtype=torch.float32)  # (n,)
    base = torch.ones(n) if w is None else torch.as_tensor(w, dtype=torch.float32)  # (n,)
    tr_w, val_w, n_vals = torch.zeros(k, n), torch.zeros(k, n), []  # (k, n): each member's row weights
    nets, theta = [], torch.empty(k, P)  # (k, P): every member's parameters, one row each
    for j, (m, r) in enumerate(zip(members, rows)):
        with torch.random.fork_rng(devices=[]):  # the init MLPSurrogate.fit draws
            torch.manual_seed(m.seed)
            nets.append(_Net(L))
        body = nets[-1].body
        with torch.no_grad():
            theta[j] = torch.cat([body[0].weight.T.reshape(-1), body[0].bias, body[2].weight[0], body[2].bias])
        gen = torch.Generator().manual_seed(m.seed)
        n_j = len(r)
        n_val = int(round(n_j * m.val_fraction)) if n_j >= 10 else 0
        order = torch.randperm(n_j, generator=gen)
        rt = torch.as_tensor(r)
        tr, val = rt[order[n_val:]], rt[order[:n_val]] if n_val else rt[order[n_val:]]
        tr_w[j].index_add_(0, tr, base[tr])
        val_w[j].index_add_(0, val, base[val])
        n_vals.append(n_val)
    coef = 2 * tr_w / tr_w.sum(1, keepdim=True).clamp_min(1e-12)  # (k, n): d(training loss) / d(out - y) per error
    val_sum = val_w.sum(1).clamp_min(1e-12).numpy()  # (k,) float32
    patience = np.array([m.patience for m in members])  # (k,)
    limit = np.array([m.max_steps for m in members])  # (k,)
    best = np.full(k, math.inf)  # (k,) float64: each member's best validation loss
    best_step = np.zeros(k, dtype=np.int64)
    stopped_at = np.zeros(k, dtype=np.int64)
    best_theta = theta.clone()  # (k, P)
    ids = np.arange(k)  # the batch's rows -> members (stopped members leave the batch)
    exp_avg, exp_avg_sq = torch.zeros(k, P), torch.zeros(k, P)  # (k, P): Adam's moments
    beta1, beta2, eps = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults, what MLPSurrogate uses
    max_steps = int(limit.max())
    step = 0

    def forward():  # every member of the batch on every row
        b = len(theta)
        pre = torch.baddbmm(theta[:, L * H : L * H + H].view(b, 1, H), Xt.expand(b, n, L),
                            theta[:, : L * H].view(b, L, H))  # (b, n, H)
        hid = torch.nn.functional.celu(pre)  # (b, n, H)
        out = torch.sigmoid((hid * theta[:, L * H + H : P - 1].view(b, 1, H)).sum(-1) + theta[:, P - 1 :])  # (b, n)
        return pre, hid, out, out - yt  # ..., (b, n) errors

    with torch.no_grad(), few_threads(X.size * k):
        pre, hid, out, err = forward()
        for step in range(1, max_steps + 1):
            b = len(theta)
            dz = torch.ops.aten.sigmoid_backward(coef * err, out)  # (b, n): d loss / d pre-sigmoid
            dpre = torch.ops.aten.elu_backward(dz[..., None] * theta[:, L * H + H : P - 1].view(b, 1, H),
                                               1.0, 1, 1.0, False, pre)  # (b, n, H): CELU(alpha=1) backward
            grad = torch.cat([torch.bmm(XT.expand(b, L, n), dpre).view(b, -1), dpre.sum(1),
                              (hid * dz[..., None]).sum(1), dz.sum(1, keepdim=True)],
                             dim=1)  # (b, P), in theta's layout
            exp_avg.lerp_(grad, 1 - beta1)  # torch.optim.Adam's single-tensor update, step `step`
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
            theta.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))
            pre, hid, out, err = forward()  # after this step: its validation check and the next step's forward
            v = ((err * err * val_w).sum(1).numpy() / val_sum[ids]).astype(np.float64)  # (b,) validation MSE
            better = v < best[ids] - 1e-12
            if better.any():
                best[ids[better]] = v[better]
                best_step[ids[better]] = step
                if better.all():
                    best_theta[torch.from_numpy(ids)] = theta
                else:
                    best_theta[torch.from_numpy(ids[better])] = theta[torch.from_numpy(better)]
            done = (~better & (step - best_step[ids] >= patience[ids])) | (step >= limit[ids])
            if done.any():
                stopped_at[ids[done]] = step
                if done.all():
                    break
                keep = torch.from_numpy(~done)
                ids = ids[~done]
                theta, exp_avg, exp_avg_sq = theta[keep], exp_avg[keep], exp_avg_sq[keep]
                val_w, coef = val_w[keep], coef[keep]
                pre, hid, out, err = pre[keep], hid[keep], out[keep], err[keep]
    stopped_at[ids[stopped_at[ids] == 0]] = step
    for j, (m, net) in enumerate(zip(members, nets)):
        t = best_theta[j]
        with torch.no_grad():
            net.body[0].weight.copy_(t[: L * H].view(L, H).T)
            net.body[0].bias.copy_(t[L * H : L * H + H])
            net.body[2].weight.copy_(t[L * H + H : P - 1][None])
            net.body[2].bias.copy_(t[P - 1 :])
        m.net = net.eval()
        m.history = {"steps": int(stopped_at[j]), "best_step": int(best_step[j]), "val_mse": float(best[j]),
                     "n_val": n_vals[j], "batched": k}
    return list(members)
