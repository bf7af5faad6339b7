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
`leaves` counts the final norm + head + loss runs (one per distinct mask) and `work` is both in
token-layer calls, `fidelity.work(layer_calls, leaves, W, T)`, which `fidelity.count_work` predicts.

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

Per-window losses. The loss is accumulated per window (float64), so every mask also has its
summed NLL and target-token count per window, float64[W] and int64[W] (W = n_windows), and
perplexity = exp(sum(nll) / sum(tokens)) to float64 rounding. `iter_window_losses` /
`window_losses` / `full_window_losses` return them (the same trie walk as `iter_perplexities`);
engine.uncertainty resamples windows with them (paired bootstrap) without re-running the model.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.data import Windows
from engine.device_memory import free_memory, max_batch_states, module_device, to_device
from engine.fidelity import count_prefix_computations, work  # noqa: F401  (count_...: re-exported here)
from engine.mask_order import check_masks, common_prefix, in_mask_order, kept_sequences
from engine.masking import keep_only, swapped_layers
from engine.models import LoadedModel


class _Recorder(nn.Module):
    """Runs the wrapped layer and records the arguments the model passed to it (and its input).

    run=False: records only and passes `hidden` through (as a 1-tuple when tuple_output), so the
    model's own argument construction can be replayed at another batch size without layer work."""

    def __init__(self, layer: nn.Module, run: bool = True, tuple_output: bool = False):
        super().__init__()
        self._layer = [layer]  # a list, so the layer is not registered twice as a submodule
        self.run = run
        self.args: tuple = ()
        self.kwargs: dict = {}
        self.input: torch.Tensor | None = None
        self.tuple_output = tuple_output

    def forward(self, hidden, *args, **kwargs):
        self.input, self.args, self.kwargs = hidden, args, kwargs
        if not self.run:
            return (hidden,) if self.tuple_output else hidden
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


def scores(ppl, ppl_full: float) -> tuple[np.ndarray, np.ndarray]:
    """(score = ppl_full / ppl, nonfinite flag); non-finite ppl -> score 0, flag True. Order kept
    (fidelity.row_scores without per-window losses)."""
    from engine.fidelity import row_scores

    return row_scores(ppl, ppl_full)


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
    batch_masks: walk the trie layer by layer over groups of masks, so trie nodes that apply the
    same layer to different prefix states run as one batched call (see `_iter_batched`);
    batch_states: states per call and per group (None = `max_batch_states` from the model shape
    and the free memory of the layers' devices).
    layer_devices: the device each decoder layer computes on (None = read from the model:
    accelerate's device_map hooks or the layers' parameters). Hidden states move to a layer's
    device before it runs, only where consecutive kept layers sit on different devices; every
    such move is recorded in `moves` as (layer, from, to).
    head_float32: compute the head's logits in float32 from a float32 copy of its weight when
    the model is in bfloat16/float16 (the loss is always float32, summed in float64).
    """

    def __init__(
        self,
        lm: LoadedModel,
        windows: Windows | torch.Tensor,
        prefix_sharing: bool = True,
        batch_size: int | None = None,
        compile: bool = False,
        loss_chunk_elems: int | None = None,
        batch_masks: bool = False,
        batch_states: int | None = None,
        layer_devices=None,
        head_float32: bool = True,
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
        self.layer_calls = 0  # trie nodes computed (each: one layer on all windows for one prefix)
        self.batched_calls = 0  # layer invocations that computed them (== layer_calls unless batch_masks)
        self.leaves = 0  # final norm + head + loss runs (one per distinct mask evaluated, on all windows)
        self.moves: list[tuple[int, str, str]] = []  # hidden-state moves between devices: (layer, from, to)
        self._layers = list(self.adapter.layers(self.model))
        self._compiled = [torch.compile(layer) for layer in self._layers] if compile else self._layers
        self._chunks = [slice(s, min(s + self.batch_size, n)) for s in range(0, n, self.batch_size)]
        self._n_targets = n * (self.input_ids.shape[1] - 1)
        if layer_devices is None:
            layer_devices = [module_device(layer, lm.device) for layer in self._layers]
        self._layer_devices = [torch.device(d) for d in layer_devices]
        if len(self._layer_devices) != self.n_layers:
            raise ValueError(f"layer_devices has {len(self._layer_devices)} entries for {self.n_layers} layers")
        head = self.model.get_output_embeddings()
        self._head_device = module_device(head, lm.device)
        self._head32 = None
        w = getattr(head, "weight", None)
        if (head_float32 and isinstance(head, nn.Linear) and w is not None and w.device.type != "meta"
                and w.dtype in (torch.bfloat16, torch.float16)):
            bias = head.bias.detach().float() if head.bias is not None else None
            self._head32 = (w.detach().float(), bias)  # (V, d), (V,): a float32 copy, V x d x 4 bytes
        self._memo: dict = {}  # (id(tensor), device) -> tensor on that device (recorded arguments)
        self._record()
        self.batch_masks = batch_masks
        self.batch_states = batch_states
        if batch_masks and batch_states is None:
            free = min(free_memory(d) for d in {*self._layer_devices, self._root_device})
            dtype = self._root.dtype if self._root is not None else torch.float32
            self.batch_states = max_batch_states(self.model.config, n, self.input_ids.shape[1], dtype, free)
        self._batch_args: dict[int, list[list[tuple[tuple, dict]]]] = {}  # k -> [chunk][layer] -> (args, kwargs)

    # ------------------------------------------------------------ model pieces

    def _record(self) -> None:
        """Full forward per chunk with recorders: ppl_full, the root state, each layer's call args."""
        self._calls: list[list[tuple[tuple, dict]]] = []  # [chunk][layer] -> (args, kwargs)
        roots, window_nll = [], []
        recorders = nn.ModuleList([_Recorder(layer) for layer in self._layers])
        with torch.inference_mode(), swapped_layers(self.model, self.adapter, recorders, {}):
            for c in self._chunks:
                hidden = self._base(self.input_ids[c])  # (b, T, d), final norm applied
                window_nll.append(self._nll_rows(hidden, self.input_ids[c]).cpu().numpy())
                roots.append(recorders[0].input)
                self._calls.append([(r.args, r.kwargs) for r in recorders])
        self._tuple_output = recorders[0].tuple_output
        self._root = torch.cat(roots) if roots else None  # (n, T, d)
        self._root_device = self._root.device if self._root is not None else self.lm.device
        self._recorded = self._calls  # the originals stay referenced (their ids key self._memo)
        self._calls = [[self._on_layer_device(j, *call) for j, call in enumerate(chunk)] for chunk in self._calls]
        self._full_window_nll = np.concatenate(window_nll)  # (n,)
        self.ppl_full = self._ppl(float(self._full_window_nll.sum()))

    def _on_layer_device(self, j: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Layer j's recorded arguments on layer j's device (each tensor moved once per device)."""
        dev = self._layer_devices[j]
        return to_device(args, dev, self._memo), to_device(kwargs, dev, self._memo)

    def _args_for_batch(self, k: int) -> list[list[tuple[tuple, dict]]]:
        """[chunk][layer] -> (args, kwargs) for k prefix states at once (k x b windows per chunk).

        Recorded like `_record`, but with pass-through layers on the chunk's ids repeated k times,
        so no decoder layer runs: only the embedding and what the model builds for its layers
        (attention masks, rotary tables) at the larger batch."""
        if k not in self._batch_args:
            calls = []
            for c in self._chunks:
                recorders = nn.ModuleList([_Recorder(layer, run=False, tuple_output=self._tuple_output)
                                           for layer in self._layers])
                with torch.inference_mode(), swapped_layers(self.model, self.adapter, recorders, {}):
                    self._base(self.input_ids[c].repeat(k, 1))  # (k*b, T)
                self._recorded.append([(r.args, r.kwargs) for r in recorders])  # keep alive (memo ids)
                calls.append([self._on_layer_device(j, r.args, r.kwargs) for j, r in enumerate(recorders)])
            self._batch_args[k] = calls
        return self._batch_args[k]

    def _base(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model.base_model(input_ids=ids, use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def _nll_rows(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Summed next-token NLL per window of normed `hidden` (b, T, d) against `ids` (b, T), head
        run in row chunks: float64 (b,) on the head's device."""
        head = self.model.get_output_embeddings()
        b, T, d = hidden.shape
        h = hidden[:, :-1].reshape(-1, d).to(self._head_device)  # (b*(T-1), d)
        y = ids[:, 1:].reshape(-1).to(self._head_device)  # (b*(T-1),)
        window = torch.arange(b, device=h.device).repeat_interleave(T - 1)  # (b*(T-1),): row -> window
        rows = max(1, self.loss_chunk_elems // head.out_features)
        total = torch.zeros(b, dtype=torch.float64, device=h.device)
        for s in range(0, h.shape[0], rows):
            if self._head32 is not None:
                logits = F.linear(h[s : s + rows].float(), *self._head32)  # (rows, V) float32
            else:
                logits = head(h[s : s + rows]).float()  # (rows, V)
            loss = F.cross_entropy(logits, y[s : s + rows], reduction="none").double()  # (rows,)
            total.index_add_(0, window[s : s + rows], loss)
        return total

    def _window_nll(self, ids_of_chunk, normed_of_chunk) -> float:
        """Per-window NLL over all chunks, kept in `_last_window_nll` (float64[W]); returns the sum."""
        parts = [self._nll_rows(normed_of_chunk(c), ids_of_chunk(c)).cpu().numpy() for c in self._chunks]
        self._last_window_nll = np.concatenate(parts)  # (W,)
        return float(self._last_window_nll.sum())

    def _layer(self, j: int, hidden: torch.Tensor) -> torch.Tensor:
        """Layer j on all windows, chunk by chunk, with the arguments the model itself passes."""
        self.layer_calls += 1
        outs = []
        for k, c in enumerate(self._chunks):
            args, kwargs = self._calls[k][j]
            out = self._compiled[j](hidden[c], *args, **kwargs)
            outs.append(out[0] if isinstance(out, tuple) else out)
        return torch.cat(outs) if len(outs) > 1 else outs[0]  # (n, T, d)

    def _move(self, j: int, hidden: torch.Tensor, src: torch.device) -> torch.Tensor:
        """`hidden` (on logical device src) on layer j's device; a move is recorded only across devices."""
        dst = self._layer_devices[j]
        if src == dst:
            return hidden
        self.moves.append((j, str(src), str(dst)))
        return hidden.to(dst)

    def _layer_batch(self, j: int, states: list[tuple[torch.Tensor, torch.device]]) -> list[torch.Tensor]:
        """Layer j on k prefix states in one call per window chunk: cat to (k*b, T, d), split back."""
        xs = [self._move(j, h, src) for h, src in states]  # k x (n, T, d)
        k = len(xs)
        self.layer_calls += k
        self.batched_calls += 1
        calls = self._args_for_batch(k) if k > 1 else self._calls
        outs: list[list[torch.Tensor]] = [[] for _ in range(k)]
        for ci, c in enumerate(self._chunks):
            args, kwargs = calls[ci][j]
            x = torch.cat([h[c] for h in xs]) if k > 1 else xs[0][c]  # (k*b, T, d)
            out = self._compiled[j](x, *args, **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            for piece, acc in zip(out.split(c.stop - c.start), outs):
                acc.append(piece)
        return [torch.cat(acc) if len(acc) > 1 else acc[0] for acc in outs]  # k x (n, T, d)

    def _leaf_nll(self, hidden: torch.Tensor) -> float:
        """Final norm (the model's own, via its base forward) + head + loss for a cached state."""
        self.leaves += 1

        def normed(c):
            inject = nn.ModuleList([_Inject(hidden[c], self._tuple_output)])
            with swapped_layers(self.model, self.adapter, inject, {}):
                return self._base(self.input_ids[c])

        return self._window_nll(lambda c: self.input_ids[c], normed)

    def _independent_nll(self, mask) -> float:
        self.layer_calls += int(np.count_nonzero(mask))  # no sharing: every kept layer runs
        self.leaves += 1
        with keep_only(self.model, self.adapter, mask):
            return self._window_nll(lambda c: self.input_ids[c], lambda c: self._base(self.input_ids[c]))

    @property
    def work(self) -> int:
        """Evaluation work so far in token-layer calls: fidelity.work(layer_calls, leaves, W, T)
        (a leaf counts as one layer call; the recording forward behind `ppl_full` is not counted)."""
        n, T = self.input_ids.shape
        return work(self.layer_calls, self.leaves, n, T)

    def _ppl(self, nll: float) -> float:
        with np.errstate(over="ignore", invalid="ignore"):
            return float(np.exp(nll / self._n_targets))  # inf on overflow, NaN stays NaN

    # ------------------------------------------------------------ public

    def _check(self, masks) -> np.ndarray:
        return check_masks(masks, self.n_layers)

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
        seqs = kept_sequences(m)
        if self.batch_masks:
            yield from self._iter_batched(seqs, t0)
            return
        order = sorted(range(len(seqs)), key=lambda i: seqs[i])
        stack: list[torch.Tensor] = [self._root]  # stack[d]: state after the first d kept layers
        devs: list[torch.device] = [self._root_device]  # devs[d]: the (logical) device stack[d] is on
        prev: tuple[int, ...] = ()
        for rank, i in enumerate(order):
            s = seqs[i]
            if rank > 0 and s == prev:
                yield i, ppl, 0.0
                continue
            with torch.inference_mode():
                keep = common_prefix(prev, s) + 1
                del stack[keep:], devs[keep:]
                for j in s[len(stack) - 1 :]:
                    stack.append(self._layer(j, self._move(j, stack[-1], devs[-1])))
                    devs.append(self._layer_devices[j])
                ppl = self._ppl(self._leaf_nll(stack[-1]))
            prev = s
            t1 = time.perf_counter()
            yield i, ppl, t1 - t0
            t0 = t1

    def _iter_batched(self, seqs: list[tuple[int, ...]], t0: float) -> Iterator[tuple[int, float, float]]:
        """Batched walk: distinct kept-layer sequences in trie order, in groups of `batch_states`.

        Inside a group the trie is computed layer by layer (j = 0..L-1; kept layers are increasing
        along every sequence, so a node's parent is always ready): all of the group's nodes that
        end in layer j run as one call of layer j on their parents' states. A state is freed once
        its last child is computed, so at most one state per unfinished mask of the group is alive
        (<= batch_states). Every node is computed once per group (layer_calls counts nodes,
        batched_calls the calls); only prefixes shared across group edges are computed again."""
        members: dict[tuple[int, ...], list[int]] = {}
        for i in sorted(range(len(seqs)), key=lambda i: seqs[i]):
            members.setdefault(seqs[i], []).append(i)
        distinct = list(members)
        step = max(1, self.batch_states or 1)
        for g in range(0, len(distinct), step):
            group = distinct[g : g + step]
            ends = set(group)  # nodes where one of the group's masks ends
            at_layer: list[dict[tuple, tuple]] = [{} for _ in range(self.n_layers)]  # j -> {node: parent}
            children: dict[tuple, int] = {}
            for s in group:
                for t, j in enumerate(s):
                    node = s[: t + 1]
                    if node not in at_layer[j]:
                        at_layer[j][node] = s[:t]
                        children[s[:t]] = children.get(s[:t], 0) + 1
            states = {(): (self._root, self._root_device)}
            with torch.inference_mode():
                if group[0] == ():  # the empty mask (no layer kept) sorts first
                    ppl = self._ppl(self._leaf_nll(self._root))
                    for r, i in enumerate(members[()]):
                        t1 = time.perf_counter()
                        yield i, ppl, (t1 - t0) if r == 0 else 0.0
                        t0 = t1
                for j in range(self.n_layers):
                    todo = list(at_layer[j].items())
                    for b in range(0, len(todo), step):
                        part = todo[b : b + step]
                        outs = self._layer_batch(j, [states[parent] for _, parent in part])
                        for (node, parent), out in zip(part, outs):
                            states[node] = (out, self._layer_devices[j])
                            children[parent] -= 1
                            if children[parent] == 0 and parent:
                                del states[parent]
                        for node, _ in part:
                            if node in ends:
                                ppl = self._ppl(self._leaf_nll(states[node][0]))
                                for r, i in enumerate(members[node]):
                                    t1 = time.perf_counter()
                                    yield i, ppl, (t1 - t0) if r == 0 else 0.0
                                    t0 = t1
                            if children.get(node, 0) == 0:
                                del states[node]

    def perplexities(self, masks) -> np.ndarray:
        """float[n] in the order of `masks`; NaN/inf kept in place."""
        return in_mask_order(self, masks)

    # ------------------------------------------------------------ per-window losses

    @property
    def window_tokens(self) -> np.ndarray:
        """int64[W]: target tokens per window (T - 1 each: labels are shifted by one)."""
        n, T = self.input_ids.shape
        return np.full(n, T - 1, dtype=np.int64)

    def full_window_losses(self) -> tuple[np.ndarray, np.ndarray]:
        """(nll float64[W], tokens int64[W]) of the unmodified model: ppl_full = exp(nll.sum() / tokens.sum())."""
        return self._full_window_nll.copy(), self.window_tokens

    def iter_window_losses(self, masks) -> Iterator[tuple[int, float, np.ndarray, np.ndarray, float]]:
        """Yield (index into masks, perplexity, nll float64[W], tokens int64[W], seconds) per mask,
        exactly as `iter_perplexities` walks them; perplexity == exp(nll.sum() / tokens.sum()).
        A duplicate mask repeats the losses of its twin (computed last), as its perplexity does."""
        tokens = self.window_tokens
        for i, ppl, seconds in self.iter_perplexities(masks):
            yield i, ppl, self._last_window_nll.copy(), tokens, seconds

    def window_losses(self, masks) -> tuple[np.ndarray, np.ndarray]:
        """(nll float64[n, W], tokens int64[n, W]) in the order of `masks`."""
        m = self._check(masks)
        W = self.input_ids.shape[0]
        nll = np.full((m.shape[0], W), np.nan)
        tokens = np.zeros((m.shape[0], W), dtype=np.int64)
        for i, _, v, t, _ in self.iter_window_losses(m):
            nll[i], tokens[i] = v, t
        return nll, tokens


def ppl_from_window_losses(nll, tokens) -> np.ndarray:
    """Perplexity from per-window losses: exp(sum nll / sum tokens) over the last axis.
    nll float[..., W], tokens int[..., W] -> float[...]; inf on overflow, NaN stays NaN."""
    nll = np.asarray(nll, dtype=np.float64)
    tokens = np.asarray(tokens, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return np.exp(nll.sum(axis=-1) / tokens.sum(axis=-1))
