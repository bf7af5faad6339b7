"""What a pruned model costs and says, measured on this machine: parameters, weight memory, forward
latency, generation speed, and greedy text, for the full model and for any keep-mask.

The pruned model is the real one: `masking.keep_only(..., renumber=True)` installs exactly the
layer list, config and layer indices an export saves, so generation with the KV cache works and
the figures are those of the exported folder (without writing it).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch

from engine.masking import keep_only
from engine.models import LoadedModel


@dataclass(frozen=True)
class Footprint:
    """One model variant on this machine. Latency: median of `repeats` forward passes over the
    calibration windows (use_cache off, like evaluation); tokens/s: greedy generation with the
    KV cache from the first window's first tokens."""

    n_layers: int
    n_params: int
    weight_mib: float  # parameters x bytes per element (what the export's weights take)
    forward_ms: float  # one forward pass over all calibration windows, median
    tokens_per_s: float  # greedy generation with the KV cache
    repeats: int

    def to_dict(self) -> dict:
        return asdict(self)


def _layer_params(lm: LoadedModel, removed: tuple[int, ...]) -> tuple[int, int]:
    """(parameters, bytes) that deleting `removed` takes away."""
    layers = lm.adapter.layers(lm.model)
    params = [p for i in removed for p in layers[i].parameters()]
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def measure(lm: LoadedModel, windows: torch.Tensor, removed: tuple[int, ...] = (), repeats: int = 3,
            new_tokens: int = 32) -> Footprint:
    """Footprint of `lm` without the `removed` layers; windows: LongTensor (n, T)."""
    mask = np.ones(lm.n_layers, dtype=bool)
    mask[list(removed)] = False
    total = sum(p.numel() for p in lm.model.parameters())
    total_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    gone, gone_bytes = _layer_params(lm, tuple(removed))
    ids = windows.to(lm.device)  # (n, T)
    prompt = ids[:1, : min(16, ids.shape[1])]  # (1, t)
    with torch.inference_mode(), keep_only(lm, lm.adapter, mask, renumber=True) as model:
        model(ids, use_cache=False)  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            model(ids, use_cache=False)
            times.append(time.perf_counter() - t)
        t = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             use_cache=True, pad_token_id=_pad_id(lm))
        gen_s = time.perf_counter() - t
    made = int(out.shape[1] - prompt.shape[1])
    return Footprint(int(mask.sum()), total - gone, (total_bytes - gone_bytes) / 2**20,
                     1000 * statistics.median(times), made / gen_s if gen_s > 0 else float("nan"), repeats)


@dataclass(frozen=True)
class SpeedComparison:
    """Pruned against full model, timed in interleaved pairs (full, pruned, full, pruned, ...) so that a
    load change on a shared machine hits both alike. speedup = t_full / t_pruned per pair: > 1 is
    faster. `low`/`high` are the smallest and largest pair ratios (the spread over `repeats` pairs).
    `busy`: the machine was loaded (1-minute load average above its cores + 0.5: the timing itself keeps
    them busy) or the full model's
    own times spread by more than 15% of their median; the figures are then noise-prone, say so."""

    forward_speedup: float  # median over pairs of forward-pass time ratios full / pruned
    forward_low: float
    forward_high: float
    generation_speedup: float  # median over pairs of tokens/s ratios pruned / full
    generation_low: float
    generation_high: float
    repeats: int
    load_average: float  # 1-minute load average before timing (nan where unavailable)
    cores: int
    full_spread: float  # (max - min) / median of the full model's forward times
    busy: bool

    def to_dict(self) -> dict:
        return asdict(self)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def compare_speed(lm: LoadedModel, windows: torch.Tensor, removed: tuple[int, ...], repeats: int = 5,
                  new_tokens: int = 32) -> SpeedComparison:
    """Interleaved timing of the full model and the model without `removed` (see SpeedComparison)."""
    import os

    mask = np.ones(lm.n_layers, dtype=bool)
    mask[list(removed)] = False
    ids = windows.to(lm.device)  # (n, T)
    prompt = ids[:1, : min(16, ids.shape[1])]  # (1, t)
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    cores = os.cpu_count() or 1
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
               pad_token_id=_pad_id(lm))
    fwd, tok = {"full": [], "pruned": []}, {"full": [], "pruned": []}
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first pair warms both up and is not counted
            for name, m in (("full", np.ones(lm.n_layers, dtype=bool)), ("pruned", mask)):
                with keep_only(lm, lm.adapter, m, renumber=True) as model:
                    fwd[name].append(_timed(lambda: model(ids, use_cache=False)))
                    tok[name].append(new_tokens / max(_timed(lambda: model.generate(prompt, **gen)), 1e-9))
    f_ratio = np.array(fwd["full"][1:]) / np.array(fwd["pruned"][1:])  # (repeats,)
    g_ratio = np.array(tok["pruned"][1:]) / np.array(tok["full"][1:])  # (repeats,)
    full_t = np.array(fwd["full"][1:])
    spread = float((full_t.max() - full_t.min()) / np.median(full_t))
    busy = bool((np.isfinite(load) and load > cores + 0.5) or spread > 0.15)  # this process itself adds ~cores
    return SpeedComparison(float(np.median(f_ratio)), float(f_ratio.min()), float(f_ratio.max()),
                           float(np.median(g_ratio)), float(g_ratio.min()), float(g_ratio.max()), int(repeats),
                           float(load), int(cores), spread, busy)


def _pad_id(lm: LoadedModel) -> int | None:
    tok = lm.tokenizer
    return None if tok is None else (tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)


def generate(lm: LoadedModel, prompt: str, removed: tuple[int, ...] = (), max_new_tokens: int = 40,
             seed: int = 0) -> Iterator[str]:
    """Greedy continuation of `prompt` by the model without `removed`, yielded piece by piece as it
    is decoded (for streaming). Seeded, so ties and any sampling in custom code repeat."""
    if lm.tokenizer is None:
        raise ValueError("generation needs the model's tokenizer")
    mask = np.ones(lm.n_layers, dtype=bool)
    mask[list(removed)] = False
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids.to(lm.device)  # (1, t)
    torch.manual_seed(seed)
    text_so_far = ""
    with torch.inference_mode(), keep_only(lm, lm.adapter, mask, renumber=True) as model:
        past, step_ids, produced = None, ids, []
        for _ in range(max_new_tokens):
            out = model(step_ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(dim=-1, keepdim=True)  # (1, 1)
            produced.append(int(nxt))
            if lm.tokenizer.eos_token_id is not None and produced[-1] == lm.tokenizer.eos_token_id:
                break
            text = lm.tokenizer.decode(produced, skip_special_tokens=True)
            if len(text) > len(text_so_far):
                yield text[len(text_so_far):]
                text_so_far = text
            step_ids = nxt
