"""Shared pieces of the benchmarks: the reference mask evaluator, timing, and the output format.

Output contract of every benchmark: a few human-readable lines with the ratio and the absolute
seconds of both sides, and with ``--json`` one JSON object as the LAST stdout line.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from engine.models import LoadedModel


def sync(device) -> None:
    """Wait for queued kernels so wall-clock timings are honest on CUDA (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, repeats: int, device) -> tuple[float, float]:
    """Median (wall, process CPU) seconds of `fn()` over `repeats` calls (after one untimed call)."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return float(np.median(wall)), float(np.median(cpu))


def run_script(main) -> None:
    """Entry point of every bench script: a WorkbenchError prints its message (no traceback), exit 2."""
    from engine.errors import WorkbenchError

    try:
        main()
    except WorkbenchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def emit(lines: list[str], result: dict, json_mode: bool) -> dict:
    """Print the human lines, then (with --json) the result as the last stdout line; returns result."""
    for line in lines:
        print(line)
    if json_mode:
        print(json.dumps(result, default=_jsonable), flush=True)
    return result


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


# ---------------------------------------------------------------- the reference approach


class ZeroingReference:
    """REFERENCE APPROACH, for comparison only (what the paper's public code does), not the engine.

    For each mask, one at a time: save a copy of every parameter of each dropped decoder layer
    and zero it, run the FULL model over all windows in one batch with ``labels=input_ids``
    (transformers' mean next-token loss), take exp(loss), then restore the saved parameters.
    In a pre-norm residual layer (Llama) zero weights make the layer an exact identity:
    the normed input is 0, so attention and MLP add 0 to the residual stream
    (`zeroed_identity_error` checks this). Every layer is still computed.
    """

    def __init__(self, lm: LoadedModel, input_ids: torch.Tensor):
        self.model = lm.model.eval()
        self.layers = list(lm.adapter.layers(self.model))
        self.input_ids = input_ids.to(lm.device)  # (n, T)

    @contextlib.contextmanager
    def zeroed(self, mask) -> Iterator[None]:
        """Inside the block the layers where `mask` is False have all-zero parameters."""
        saved: list[tuple[nn.Parameter, torch.Tensor]] = []
        try:
            with torch.no_grad():
                for i in np.flatnonzero(~np.asarray(mask, dtype=bool)):
                    for p in self.layers[i].parameters():
                        saved.append((p, p.detach().clone()))
                        p.zero_()
            yield
        finally:
            with torch.no_grad():
                for p, data in saved:
                    p.copy_(data)

    def perplexity(self, mask) -> float:
        with torch.no_grad(), self.zeroed(mask):
            loss = self.model(self.input_ids, labels=self.input_ids).loss
        return float(torch.exp(loss.float()))

    def perplexities(self, masks) -> np.ndarray:
        return np.array([self.perplexity(m) for m in np.asarray(masks, dtype=bool)])

    def zeroed_identity_error(self, mask) -> float:
        """Max |output - input| over the zeroed layers during one full forward (0.0 = exact identity)."""
        worst = [0.0]

        def hook(_module, args, kwargs, out):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = out[0] if isinstance(out, tuple) else out
            worst[0] = max(worst[0], float((h_out.float() - h_in.float()).abs().max()))

        dropped = np.flatnonzero(~np.asarray(mask, dtype=bool))
        handles = [self.layers[i].register_forward_hook(hook, with_kwargs=True) for i in dropped]
        try:
            with torch.no_grad(), self.zeroed(mask):
                self.model(self.input_ids)
        finally:
            for h in handles:
                h.remove()
        return worst[0] if len(dropped) else math.nan
