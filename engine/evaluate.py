"""Perplexity of a model under many keep-masks: the game's value function.

Perplexity = exp(mean next-token NLL over every (window, position) pair, labels shifted by
one): the same number as the mean of transformers' `labels=` loss over one batch holding all
windows. The (B, T, V) logits are never materialised at once: the head and the loss run on
row chunks of at most `loss_chunk_elems` logits.

Prefix sharing (default). Masks are turned into their kept-layer sequences and sorted
lexicographically, so sequences with a common prefix are contiguous; walking them in that
order is a depth-first walk of their trie. A stack keeps one hidden state per depth (memory
bounded by L + 1 states of (n_windows, T, d)), so every distinct (prefix, next kept layer) is
computed once (`layer_calls` counts them; `count_prefix_computations` predicts the count).

How a single layer is run without re-implementing each family's forward: once, at start-up,
the model's own base forward runs with every decoder layer wrapped in a `_Recorder` that
stores the exact positional and keyword arguments the model passes to that layer (attention
mask for that layer's type, rotary embeddings, position ids, ...) and the layer's input (the
embedding output, the trie's root). Afterwards layer j is called directly as
`layer_j(h, *args_j, **kwargs_j)`: the same call the model makes. At a leaf the model's base
forward runs once more with its layer list replaced by a single `_Inject` that returns the
cached state, so the family's own final norm (and OPT's project_out) is applied; then the
head and the loss run chunked.

The alternative from the design notes -- running the model's forward for every layer step with
[Inject(h), layer_j, Capture] and stopping it with an exception -- repeats embedding, mask
and rotary construction for every layer step. Measured on the demo-shaped model (Llama, 16
layers, hidden 192, vocab 4096, 8 x 128 tokens, 24 stratified masks, 1 thread on 2 CPU cores
shared with other jobs (load ~9); `python -m bench.prefix_mechanism 24`): independent 1409
ms/mask (286 layer calls' worth), recorded calls 903 ms/mask, forward-step 929 ms/mask (196
layer calls each), all three identical to the last bit. Recorded calls are faster, need no
exception for control flow and no per-family code, so they are used here. (The timings are
noisy on this loaded machine; the layer-call counts are exact.)

`prefix_sharing=False` evaluates each mask independently through `masking.keep_only` and the
model's own forward: a second, independent path that the tests compare against.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.data import Windows
from engine.masking import keep_only, swapped_layers
from engine.models import LoadedModel


class _Recorder(nn.Module):
    """Runs the wrapped layer and records the arguments the model passed to it (and its input)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self._layer = [layer]  # a list, so the layer is not registered twice as a submodule
        self.args: tuple = ()
        self.kwargs: dict = {}
        self.input: torch.Tensor | None = None
        self.tuple_output = False

    def forward(self, hidden, *args, **kwargs):
        self.input, self.args, self.kwargs = hidden, args, kwargs
        out = self._layer[0](hidden, *args, **kwargs)
        self.tuple_output = isinstance(out, tuple)
        return out


class _Inject(nn.Module):
    """Stands in for the whole layer list: ignores its input, returns a cached hidden state."""

    def __init__(self, hidden: torch.Tensor, as_tuple: bool):
        super().__init__()
        self.hidden, self.as_tuple = hidden, as_tuple

    def forward(self, _hidden, *args, **kwargs):
        return (self.hidden,) if self.as_tuple else self.hidden


def _sequences(masks: np.ndarray) -> list[tuple[int, ...]]:
    return [tuple(int(i) for i in np.flatnonzero(m)) for m in masks]


def _lcp(a: tuple, b: tuple) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def count_prefix_computations(masks) -> int:
    """Distinct (kept-layer prefix, next kept layer) pairs over `masks`: layer calls with sharing."""
    seqs = sorted(set(_sequences(np.asarray(masks, dtype=bool))))
    total, prev = 0, ()
    for s in seqs:
        total += len(s) - _lcp(prev, s)
        prev = s
    return total


def split_subtrees(masks, parts: int) -> list[list[int]]:
    """Partition the rows of `masks` (bool[n, L]) into about `parts` whole subtrees of their prefix trie.

    Each group holds every mask below one trie node (all masks that share the node's kept-layer
    prefix), so prefix sharing stays inside a group; only the node's own prefix is recomputed by
    each group that descends from it. The largest group is split at its next branching node until
    there are `parts` groups or nothing can be split (identical masks stay together). Masks that end
    exactly at a split node go with its first child. Deterministic; every index appears once.
    Measured with count_prefix_computations on the default stratified design: 32 groups cost
    +0.6% layer calls at L=32 / 1,024 masks, +2.5% at 256 masks.
    """
    seqs = _sequences(np.asarray(masks, dtype=bool))
    heap = [(-len(seqs), 0, 0, list(range(len(seqs))))] if seqs else []  # (-size, tiebreak, depth, indices)
    final: list[list[int]] = []
    tie = 1
    while heap and len(heap) + len(final) < parts:
        _, _, depth, idx = heapq.heappop(heap)
        while True:  # descend to the group's next branching node
            kids: dict[int, list[int]] = {}
            for i in idx:
                s = seqs[i]
                kids.setdefault(s[depth] if len(s) > depth else -1, []).append(i)
            if len(kids) > 1 or -1 in kids:
                break
            depth += 1
        if list(kids) == [-1]:  # identical masks: cannot be split
            final.append(idx)
            continue
        ended = kids.pop(-1, [])
        keys = sorted(kids)
        kids[keys[0]] = ended + kids[keys[0]]
        for k in keys:
            heapq.heappush(heap, (-len(kids[k]), tie, depth + 1, kids[k]))
            tie += 1
    return final + [g[3] for g in sorted(heap, key=lambda g: g[1])]


def scores(ppl, ppl_full: float) -> tuple[np.ndarray, np.ndarray]:
    """(score = ppl_full / ppl, nonfinite flag); non-finite ppl -> score 0, flag True. Order kept."""
    ppl = np.asarray(ppl, dtype=np.float64)
    nonfinite = ~np.isfinite(ppl)
    with np.errstate(divide="ignore", invalid="ignore"):
        score = np.where(nonfinite, 0.0, ppl_full / np.where(nonfinite, 1.0, ppl))
    return score, nonfinite


# Logits per head + loss chunk. On CPU small chunks (1 MiB of float32 logits): whole-window
# logits (16 MiB on the demo model) are freed and re-allocated at every leaf, and glibc hands
# such blocks back to the kernel each time; measured on `python -m engine sample` (demo, 256
# masks, one thread): 2.2 M page faults and 27.4 s with one chunk, 0.24 M and 24.5 s with
# 1 MiB chunks (GEMM speed is the same down to 64 rows). On CUDA large chunks (fewer kernels).
CPU_LOSS_CHUNK = 1 << 18
GPU_LOSS_CHUNK = 1 << 24
MIN_LOSS_ROWS = 64  # CPU chunks keep at least this many rows: the head GEMM stays efficient for large vocabularies


class MaskEvaluator:
    """Perplexities of `lm` on `windows` for batches of keep-masks (bool[n, L], True = kept).

    batch_size: windows per layer call (None = all windows at once); lower it when activations
    do not fit. compile: wrap each layer call in torch.compile (prefix-sharing path only).
    loss_chunk_elems: logits per head + loss chunk; None = CPU_LOSS_CHUNK (at least MIN_LOSS_ROWS
    rows) on CPU, GPU_LOSS_CHUNK on CUDA.
    """

    def __init__(
        self,
        lm: LoadedModel,
        windows: Windows | torch.Tensor,
        prefix_sharing: bool = True,
        batch_size: int | None = None,
        compile: bool = False,
        loss_chunk_elems: int | None = None,
    ):
        self.lm = lm
        self.model = lm.model.eval()
        self.adapter = lm.adapter
        self.n_layers = lm.n_layers
        ids = windows.input_ids if isinstance(windows, Windows) else windows
        self.input_ids = ids.to(lm.device)  # (n, T)
        n = self.input_ids.shape[0]
        self.batch_size = max(1, min(batch_size or n, n))
        self.prefix_sharing = prefix_sharing
        if loss_chunk_elems is None:
            vocab = self.model.get_output_embeddings().out_features
            on_cpu = lm.device.type == "cpu"
            loss_chunk_elems = max(CPU_LOSS_CHUNK, MIN_LOSS_ROWS * vocab) if on_cpu else GPU_LOSS_CHUNK
        self.loss_chunk_elems = loss_chunk_elems
        self.layer_calls = 0
        self._layers = list(self.adapter.layers(self.model))
        self._compiled = [torch.compile(layer) for layer in self._layers] if compile else self._layers
        self._chunks = [slice(s, min(s + self.batch_size, n)) for s in range(0, n, self.batch_size)]
        self._n_targets = n * (self.input_ids.shape[1] - 1)
        self._record()

    # ------------------------------------------------------------ model pieces

    def _record(self) -> None:
        """Full forward per chunk with recorders: ppl_full, the root state, each layer's call args."""
        self._calls: list[list[tuple[tuple, dict]]] = []  # [chunk][layer] -> (args, kwargs)
        roots, nll = [], 0.0
        recorders = nn.ModuleList([_Recorder(layer) for layer in self._layers])
        with torch.inference_mode(), swapped_layers(self.model, self.adapter, recorders, {}):
            for c in self._chunks:
                hidden = self._base(self.input_ids[c])  # (b, T, d), final norm applied
                nll += self._nll_sum(hidden, self.input_ids[c])
                roots.append(recorders[0].input)
                self._calls.append([(r.args, r.kwargs) for r in recorders])
        self._tuple_output = recorders[0].tuple_output
        self._root = torch.cat(roots) if roots else None  # (n, T, d)
        self.ppl_full = self._ppl(nll)

    def _base(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model.base_model(input_ids=ids, use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def _nll_sum(self, hidden: torch.Tensor, ids: torch.Tensor) -> float:
        """Summed next-token NLL of normed `hidden` (b, T, d) against `ids` (b, T), head run in chunks."""
        head = self.model.get_output_embeddings()
        d = hidden.shape[-1]
        h = hidden[:, :-1].reshape(-1, d)  # (b*(T-1), d)
        y = ids[:, 1:].reshape(-1)  # (b*(T-1),)
        rows = max(1, self.loss_chunk_elems // head.out_features)
        total = torch.zeros((), dtype=torch.float64, device=h.device)
        for s in range(0, h.shape[0], rows):
            logits = head(h[s : s + rows]).float()  # (rows, V)
            total += F.cross_entropy(logits, y[s : s + rows], reduction="sum").double()
        return float(total)

    def _layer(self, j: int, hidden: torch.Tensor) -> torch.Tensor:
        """Layer j on all windows, chunk by chunk, with the arguments the model itself passes."""
        self.layer_calls += 1
        outs = []
        for k, c in enumerate(self._chunks):
            args, kwargs = self._calls[k][j]
            out = self._compiled[j](hidden[c], *args, **kwargs)
            outs.append(out[0] if isinstance(out, tuple) else out)
        return torch.cat(outs) if len(outs) > 1 else outs[0]  # (n, T, d)

    def _leaf_nll(self, hidden: torch.Tensor) -> float:
        """Final norm (the model's own, via its base forward) + head + loss for a cached state."""
        nll = 0.0
        for c in self._chunks:
            inject = nn.ModuleList([_Inject(hidden[c], self._tuple_output)])
            with swapped_layers(self.model, self.adapter, inject, {}):
                normed = self._base(self.input_ids[c])
            nll += self._nll_sum(normed, self.input_ids[c])
        return nll

    def _independent_nll(self, mask) -> float:
        nll = 0.0
        with keep_only(self.model, self.adapter, mask):
            for c in self._chunks:
                nll += self._nll_sum(self._base(self.input_ids[c]), self.input_ids[c])
        return nll

    def _ppl(self, nll: float) -> float:
        with np.errstate(over="ignore", invalid="ignore"):
            return float(np.exp(nll / self._n_targets))  # inf on overflow, NaN stays NaN

    # ------------------------------------------------------------ public

    def _check(self, masks) -> np.ndarray:
        m = np.asarray(masks, dtype=bool)
        if m.ndim == 1:
            m = m[None, :]
        if m.ndim != 2 or m.shape[1] != self.n_layers:
            raise ValueError(f"masks must have shape (n, {self.n_layers}), got {tuple(np.shape(masks))}")
        return m

    def iter_perplexities(self, masks) -> Iterator[tuple[int, float, float]]:
        """Yield (index into masks, perplexity, seconds spent since the previous yield) per mask.

        With prefix sharing, masks come out in trie order (indices tell which); every mask is
        yielded exactly once, duplicates included.
        """
        m = self._check(masks)
        t0 = time.perf_counter()
        if not self.prefix_sharing:
            for i in range(m.shape[0]):
                with torch.inference_mode():
                    ppl = self._ppl(self._independent_nll(m[i]))
                t1 = time.perf_counter()
                yield i, ppl, t1 - t0
                t0 = t1
            return
        seqs = _sequences(m)
        order = sorted(range(len(seqs)), key=lambda i: seqs[i])
        stack: list[torch.Tensor] = [self._root]  # stack[d]: state after the first d kept layers
        prev: tuple[int, ...] = ()
        for rank, i in enumerate(order):
            s = seqs[i]
            if rank > 0 and s == prev:
                yield i, ppl, 0.0
                continue
            with torch.inference_mode():
                del stack[_lcp(prev, s) + 1 :]
                for j in s[len(stack) - 1 :]:
                    stack.append(self._layer(j, stack[-1]))
                ppl = self._ppl(self._leaf_nll(stack[-1]))
            prev = s
            t1 = time.perf_counter()
            yield i, ppl, t1 - t0
            t0 = t1

    def perplexities(self, masks) -> np.ndarray:
        """float[n] in the order of `masks`; NaN/inf kept in place."""
        m = self._check(masks)
        out = np.full(m.shape[0], np.nan)
        for i, ppl, _ in self.iter_perplexities(m):
            out[i] = ppl
        return out
