"""The order keep-masks are walked in (numpy only): each mask's kept-layer sequence, the prefix two
sequences share (the trie walk of engine.evaluate computes each shared prefix once), partitions into
whole subtrees of that trie (engine.distributed's tasks), the shape check of a batch of masks, and an
evaluator's perplexities (any completion order) put back in the order of its masks."""

from __future__ import annotations

import heapq

import numpy as np


def kept_sequences(masks: np.ndarray) -> list[tuple[int, ...]]:
    """Each mask of bool[n, L] as the tuple of its kept layers, in layer order."""
    return [tuple(int(i) for i in np.flatnonzero(m)) for m in masks]


def common_prefix(a: tuple, b: tuple) -> int:
    """Length of the common prefix of two kept-layer sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


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
    seqs = kept_sequences(np.asarray(masks, dtype=bool))
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


def check_masks(masks, n_layers: int) -> np.ndarray:
    """bool (n, L) from one mask or a batch; ValueError on the wrong number of layers."""
    m = np.asarray(masks, dtype=bool)
    if m.ndim == 1:
        m = m[None, :]
    if m.ndim != 2 or m.shape[1] != n_layers:
        raise ValueError(f"masks must have shape (n, {n_layers}), got {tuple(np.shape(masks))}")
    return m


def in_mask_order(evaluator, masks) -> np.ndarray:
    """float[n]: `evaluator.iter_perplexities` (any completion order) put back in the order of `masks`."""
    m = evaluator._check(masks)
    out = np.full(m.shape[0], np.nan)
    for i, ppl, _ in evaluator.iter_perplexities(m):
        out[i] = ppl
    return out
