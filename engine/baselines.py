"""Published layer-pruning criteria, run on the same calibration windows as the game.

Every baseline returns a `BaselineResult`:
- `scores` float[L], higher = more important, in layer order;
- `order` tuple of all L layer indices, first = removed first (a permutation of range(L));
- `removed(k)` the k layers the method would delete (the first k of `order`, except for
  `angular`, whose best block is chosen afresh for each k);
- `details` JSON-able extras (per-method figures), `seconds` wall time.

Registry `BASELINES` (name -> function); `run_baseline(name, lm, windows, ...)` runs one by name.

- block-influence (ShortGPT, Men et al. 2024): BI_l = 1 - mean_t cos(h_in_l, h_out_l).
- angular (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers";
  arcee-ai PruneMe): d(l, l+n) = arccos(cos(h_l, h_{l+n})) / pi, h_l = residual stream
  entering layer l; removing layers l..l+n-1 is scored by d(l, l+n).
- ppl (Shortened LLaMA "PPL", Kim et al. 2024): perplexity with one layer removed.
- taylor (Shortened LLaMA "Taylor+"): sum over a layer's parameters of |w * dLoss/dw|, with
  the paper's "+" heuristic (the first and last few layers are never removed first).
- sleb (Song et al. 2024): greedy; each round removes the layer whose removal hurts
  calibration perplexity least, given those already removed.
- random (seeded permutation), last (L-1, L-2, ...).

Hidden states are read with forward hooks on the decoder layers, not `output_hidden_states`:
in HF models the last entry of `hidden_states` usually has the final norm applied, so it is
not the output of the last layer.

`lm` is a `models.LoadedModel` (uses `.model` and `.adapter.layers(model)`); `windows` is a
`data.Windows` (uses `.input_ids`, LongTensor (n, T)); `evaluator` is an
`evaluate.MaskEvaluator` built on the same lm and windows (uses `.perplexities(masks)` and
`.ppl_full`); pass one to reuse it across baselines, None builds one.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from engine.data import Windows
from engine.errors import WorkbenchError
from engine.evaluate import MaskEvaluator
from engine.models import LoadedModel
from engine.registry import Registry


@dataclass(frozen=True)
class BaselineResult:
    method: str  # registry name
    scores: np.ndarray  # float[L], higher = more important, layer order
    order: tuple[int, ...]  # all L layers, first = removed first
    details: dict = field(default_factory=dict)  # JSON-able per-method extras
    seconds: float = 0.0  # wall time of the computation

    def removed(self, k: int) -> tuple[int, ...]:
        """The k layers this method deletes (sorted); angular picks its best block for each k."""
        n_layers = len(self.order)
        if not 0 <= k < n_layers:
            raise WorkbenchError(f"Can remove between 0 and {n_layers - 1} layers, not {k}.")
        if k == 0:
            return ()
        blocks = self.details.get("blocks")
        if blocks is not None:
            start = blocks[k - 1]["start"]
            return tuple(range(start, start + k))
        return tuple(sorted(self.order[:k]))

    def to_json(self) -> dict:
        """Plain-JSON form (what `python -m engine baselines --json` prints)."""
        return {
            "method": self.method,
            "scores": [float(s) if math.isfinite(s) else None for s in self.scores],
            "order": list(self.order),
            "details": self.details,
            "seconds": self.seconds,
        }


# ---------------------------------------------------------------- helpers


def _layers(lm: LoadedModel) -> torch.nn.ModuleList:
    return lm.adapter.layers(lm.model)


def _input_device(lm: LoadedModel) -> torch.device:
    # The embedding's device, not the first parameter's: right for device_map="auto" too.
    return lm.model.get_input_embeddings().weight.device


def _batches(windows: Windows, batch_size: int | None):
    ids = windows.input_ids  # (n, T)
    step = ids.shape[0] if batch_size is None else max(1, int(batch_size))
    for i in range(0, ids.shape[0], step):
        yield ids[i : i + step]


def _order_from_scores(scores: np.ndarray) -> tuple[int, ...]:
    """Ascending importance (NaN counts as most important); ties keep layer order."""
    keyed = np.where(np.isfinite(scores), scores, np.inf)
    return tuple(int(i) for i in np.argsort(keyed, kind="stable"))


def _rank_scores(order: tuple[int, ...]) -> np.ndarray:
    """Scores for order-only methods: the position in the removal order (0 = removed first)."""
    scores = np.empty(len(order))
    scores[list(order)] = np.arange(len(order), dtype=float)
    return scores


def _evaluator(lm: LoadedModel, windows: Windows, evaluator: MaskEvaluator | None) -> MaskEvaluator:
    return evaluator if evaluator is not None else MaskEvaluator(lm, windows)


@contextlib.contextmanager
def _residual_capture(layers: torch.nn.ModuleList):
    """Inside: `states` fills with L+1 tensors (B, T, d) per forward: the stream entering
    layer 0, then the output of each layer. Hooks are removed in `finally`."""
    states: list[torch.Tensor] = []

    def take_input(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        states.append(hidden.detach())

    def take_output(module, args, output):
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        states.append(hidden.detach())

    handles = [layers[0].register_forward_pre_hook(take_input, with_kwargs=True)]
    handles += [layer.register_forward_hook(take_output) for layer in layers]
    try:
        yield states
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def stream_similarity(lm: LoadedModel, windows: Windows, tokens: str = "all", batch_size: int | None = 8) -> dict:
    """Mean cosine and mean angular distance between every pair of residual-stream states.

    Returns {"cos": float[L+1, L+1], "angular": float[L+1, L+1], "n_tokens": int}; index l is
    the stream entering layer l (index L: leaving the last layer, before the final norm).
    tokens="all" averages over every position of every window (each position is the last token
    of its own prefix, so this is the paper's statistic averaged over prefix lengths, with
    n*T samples instead of n); tokens="last" uses only each window's last token, as the paper
    and PruneMe do.
    """
    if tokens not in ("all", "last"):
        raise WorkbenchError(f"tokens must be 'all' or 'last', not {tokens!r}.")
    model, layers = lm.model, _layers(lm)
    device = _input_device(lm)
    was_training = model.training
    model.eval()
    sum_cos = sum_ang = None
    n_tokens = 0
    try:
        with _residual_capture(layers) as states:
            for ids in _batches(windows, batch_size):
                states.clear()
                model(input_ids=ids.to(device), use_cache=False)
                if len(states) != len(layers) + 1:
                    raise WorkbenchError(
                        f"Expected {len(layers) + 1} hidden states from {len(layers)} layers, got "
                        f"{len(states)}: this model does not call its decoder layers once each."
                    )
                h = torch.stack([s.to(device).float() for s in states])  # (L+1, B, T, d)
                if tokens == "last":
                    h = h[:, :, -1:, :]  # (L+1, B, 1, d)
                h = h.flatten(1, 2)  # (L+1, N, d)
                h = torch.nn.functional.normalize(h, dim=-1)
                cos = torch.einsum("ind,jnd->ijn", h, h).clamp(-1.0, 1.0)  # (L+1, L+1, N)
                ang = torch.arccos(cos) / math.pi  # (L+1, L+1, N)
                batch_cos, batch_ang = cos.sum(-1).double().cpu(), ang.sum(-1).double().cpu()
                sum_cos = batch_cos if sum_cos is None else sum_cos + batch_cos
                sum_ang = batch_ang if sum_ang is None else sum_ang + batch_ang
                n_tokens += h.shape[1]
    finally:
        model.train(was_training)
    return {
        "cos": (sum_cos / n_tokens).numpy(),
        "angular": (sum_ang / n_tokens).numpy(),
        "n_tokens": n_tokens,
    }


# ---------------------------------------------------------------- baselines


def block_influence(lm: LoadedModel, windows: Windows, tokens: str = "all", batch_size: int | None = 8) -> BaselineResult:
    """ShortGPT Block Influence: BI_l = 1 - mean cos(h_in_l, h_out_l); low BI is removed first."""
    t0 = time.perf_counter()
    sim = stream_similarity(lm, windows, tokens=tokens, batch_size=batch_size)
    n_layers = sim["cos"].shape[0] - 1
    bi = np.array([1.0 - sim["cos"][l, l + 1] for l in range(n_layers)])
    return BaselineResult(
        method="block-influence",
        scores=bi,
        order=_order_from_scores(bi),
        details={"tokens": tokens, "n_tokens": sim["n_tokens"]},
        seconds=time.perf_counter() - t0,
    )


def angular(lm: LoadedModel, windows: Windows, tokens: str = "all", batch_size: int | None = 8) -> BaselineResult:
    """Angular distance (Gromov et al.): for each block size n the block l..l+n-1 with the
    smallest d(l, l+n) is the one to remove (`removed(n)`, `details["blocks"][n-1]`).

    `scores` are the single-layer distances d(l, l+1) and `order` sorts them, so `order[0]`
    is the best block for n=1; for n>1 use `removed(n)`, which is not order[:n].
    `details["distances"][n-1][l]` = d(l, l+n) for every start l (a heat map's rows).
    """
    t0 = time.perf_counter()
    sim = stream_similarity(lm, windows, tokens=tokens, batch_size=batch_size)
    dist = sim["angular"]  # (L+1, L+1)
    n_layers = dist.shape[0] - 1
    rows, blocks = [], []
    for n in range(1, n_layers):
        row = np.array([dist[l, l + n] for l in range(n_layers - n + 1)])
        start = int(np.argmin(row))
        rows.append([float(d) for d in row])
        blocks.append({"n": n, "start": start, "distance": float(row[start])})
    per_layer = np.array([dist[l, l + 1] for l in range(n_layers)])
    return BaselineResult(
        method="angular",
        scores=per_layer,
        order=_order_from_scores(per_layer),
        details={"tokens": tokens, "n_tokens": sim["n_tokens"], "blocks": blocks, "distances": rows},
        seconds=time.perf_counter() - t0,
    )


def ppl(lm: LoadedModel, windows: Windows, evaluator: MaskEvaluator | None = None) -> BaselineResult:
    """Shortened LLaMA PPL criterion: score_l = PPL(without layer l) - PPL(full), one batched call."""
    t0 = time.perf_counter()
    ev = _evaluator(lm, windows, evaluator)
    n_layers = len(_layers(lm))
    masks = ~np.eye(n_layers, dtype=bool)  # (L, L): row l drops layer l
    removed = np.asarray(ev.perplexities(masks), dtype=float)  # (L,)
    increase = removed - float(ev.ppl_full)
    return BaselineResult(
        method="ppl",
        scores=increase,
        order=_order_from_scores(increase),
        details={"ppl_full": float(ev.ppl_full), "ppl_removed": _json_floats(removed)},
        seconds=time.perf_counter() - t0,
    )


def taylor_plus_protected(n_layers: int) -> tuple[int, ...]:
    """Layers the "+" heuristic never removes first: the reference code keeps layers 0-3 and the
    last 2 of Llama's 32; scaled to L (rounded half up), so 16 layers keep 0-1 and 15."""
    n_first = int(n_layers * 4 / 32 + 0.5)
    n_last = int(n_layers * 2 / 32 + 0.5)
    return tuple(range(n_first)) + tuple(range(n_layers - n_last, n_layers))


def taylor(lm: LoadedModel, windows: Windows, plus: bool = True, batch_size: int | None = None) -> BaselineResult:
    """Shortened LLaMA Taylor+: score_l = sum over layer l's parameters of |w * dLoss/dw|.

    dLoss/dw is the gradient of the mean next-token loss over all windows (accumulated over
    batches of `batch_size`; None = one batch). `torch.autograd.grad` is used instead of
    `.backward()` so no `.grad` is ever written; eval mode is used and the model's training
    flag and `requires_grad` flags are restored. With `plus`, the protected layers
    (`taylor_plus_protected`) go to the end of `order`; `scores` stay the raw Taylor sums.
    """
    t0 = time.perf_counter()
    model, layers = lm.model, _layers(lm)
    device = _input_device(lm)
    params = [list(layer.parameters()) for layer in layers]
    flat = [p for ps in params for p in ps]
    saved_flags = [p.requires_grad for p in flat]
    was_training = model.training
    n_windows = windows.input_ids.shape[0]
    salience = [torch.zeros_like(p, dtype=torch.float32) for p in flat]  # signed sum of w * g
    try:
        model.eval()
        for p in flat:
            p.requires_grad_(True)
        with torch.enable_grad():
            for ids in _batches(windows, batch_size):
                ids = ids.to(device)  # (B, T)
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                weight = ids.shape[0] / n_windows  # windows have equal length: mean over all
                grads = torch.autograd.grad(loss * weight, flat, allow_unused=True)
                for s, p, g in zip(salience, flat, grads):
                    if g is not None:
                        s.add_(p.detach().float() * g.float())
    finally:
        for p, flag in zip(flat, saved_flags):
            p.requires_grad_(flag)
        model.train(was_training)
    scores, i = [], 0
    for ps in params:
        scores.append(float(sum(salience[i + j].abs().sum().item() for j in range(len(ps)))))
        i += len(ps)
    scores = np.array(scores)
    order = _order_from_scores(scores)
    protected = taylor_plus_protected(len(layers)) if plus else ()
    if protected:
        order = tuple(l for l in order if l not in protected) + tuple(
            l for l in order if l in protected
        )
    return BaselineResult(
        method="taylor",
        scores=scores,
        order=order,
        details={"plus": plus, "protected": list(protected)},
        seconds=time.perf_counter() - t0,
    )


def sleb(lm: LoadedModel, windows: Windows, k_max: int | None = None, evaluator: MaskEvaluator | None = None,
         progress: Callable[[int, int, str], None] | None = None) -> BaselineResult:
    """SLEB: k_max greedy rounds (default L-1); round r evaluates, in one batched call, the
    current mask with each kept layer dropped and removes the one with the lowest perplexity.
    `progress(done, total, words)` is called before each round and at the end, counted in masks
    evaluated (round r costs L - r of them), so an ETA from it is not skewed by the shrinking rounds.

    `details["ppl_after"][r]` is the calibration perplexity after round r. Layers never
    removed follow in `order` by their perplexity in the last round. `scores` are positions
    in `order` (0 = removed first): SLEB gives an order, not a per-layer measure.
    """
    t0 = time.perf_counter()
    ev = _evaluator(lm, windows, evaluator)
    n_layers = len(_layers(lm))
    k_max = n_layers - 1 if k_max is None else int(k_max)
    if not 1 <= k_max <= n_layers - 1:
        raise WorkbenchError(f"SLEB removes 1 to {n_layers - 1} layers; k_max={k_max} is out of range.")
    kept = np.ones(n_layers, dtype=bool)
    order: list[int] = []
    ppl_after: list[float | None] = []
    last_round: dict[int, float] = {}
    total = sum(n_layers - r for r in range(k_max))  # masks over all rounds
    done = 0
    for r in range(k_max):
        candidates = np.flatnonzero(kept)
        if progress is not None:
            progress(done, total, f"round {r + 1}/{k_max}, measuring {len(candidates)} masks (one layer dropped each)")
        done += len(candidates)
        masks = np.repeat(kept[None, :], len(candidates), axis=0)  # (c, L)
        masks[np.arange(len(candidates)), candidates] = False
        values = np.asarray(ev.perplexities(masks), dtype=float)  # (c,)
        keyed = np.where(np.isfinite(values), values, np.inf)
        best = int(np.argmin(keyed))  # first minimum: ties go to the lower layer
        layer = int(candidates[best])
        kept[layer] = False
        order.append(layer)
        ppl_after.append(_json_float(values[best]))
        last_round = {int(c): float(k) for c, k in zip(candidates, keyed)}
    if progress is not None:
        progress(total, total, f"{k_max} rounds done")
    rest = sorted((l for l in range(n_layers) if kept[l]), key=lambda l: (last_round[l], l))
    order += rest
    return BaselineResult(
        method="sleb",
        scores=_rank_scores(tuple(order)),
        order=tuple(order),
        details={"k_max": k_max, "ppl_full": float(ev.ppl_full), "ppl_after": ppl_after},
        seconds=time.perf_counter() - t0,
    )


def random_order(lm: LoadedModel, windows: Windows, seed: int = 0) -> BaselineResult:
    """A seeded uniform permutation (numpy default_rng(seed))."""
    t0 = time.perf_counter()
    order = tuple(int(i) for i in np.random.default_rng(seed).permutation(len(_layers(lm))))
    return BaselineResult(
        method="random",
        scores=_rank_scores(order),
        order=order,
        details={"seed": seed},
        seconds=time.perf_counter() - t0,
    )


def last(lm: LoadedModel, windows: Windows) -> BaselineResult:
    """Remove from the top: L-1, L-2, ..., 0."""
    t0 = time.perf_counter()
    order = tuple(range(len(_layers(lm)) - 1, -1, -1))
    return BaselineResult(
        method="last", scores=_rank_scores(order), order=order, seconds=time.perf_counter() - t0
    )


def _json_float(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _json_floats(xs) -> list[float | None]:
    return [_json_float(float(x)) for x in xs]


BASELINES: Registry[Callable[..., BaselineResult]] = Registry("baseline", {
    "block-influence": block_influence,
    "angular": angular,
    "ppl": ppl,
    "taylor": taylor,
    "sleb": sleb,
    "random": random_order,
    "last": last,
}, error=WorkbenchError)


def run_baseline(
    name: str,
    lm: LoadedModel,
    windows: Windows,
    evaluator: MaskEvaluator | None = None,
    k_max: int | None = None,
    seed: int = 0,
    progress: Callable[[int, int, str], None] | None = None,
) -> BaselineResult:
    """Run the baseline `name`; each gets only the options it takes (evaluator, k_max, seed, progress:
    `progress(done, total, words)` from the criteria that run many evaluations, SLEB)."""
    fn = BASELINES.lookup(name)
    offered = {"evaluator": evaluator, "k_max": k_max, "seed": seed, "progress": progress}
    accepted = inspect.signature(fn).parameters
    return fn(lm, windows, **{k: v for k, v in offered.items() if k in accepted})
