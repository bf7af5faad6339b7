"""How should one prefix-sharing step run a single decoder layer? Measures three ways.

Demo-shaped model (random Llama: 16 layers, hidden 192, 4 heads, MLP 512, vocab 4096, tied)
on 8 windows x 128 tokens, the same random masks for each way:

  independent   keep_only + the model's own forward, one per mask (no sharing)
  recorded      engine.evaluate default: layer_j(h, *recorded args) called directly
  forward-step  the model's forward with [Inject(h), layer_j, Capture] per layer step,
                stopped by an exception (repeats embedding/mask/rotary set-up per step)

Run: .venv/bin/python -m bench.prefix_mechanism [n_masks]
Prints ms per mask and layer calls for each way, and the largest relative difference.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from engine.evaluate import MaskEvaluator, _Inject, count_prefix_computations
from engine.masking import swapped_layers
from engine.models import wrap_model


class _Stop(Exception):
    pass


class _Capture(nn.Module):
    def forward(self, hidden, *args, **kwargs):
        self.hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        raise _Stop


class ForwardStepEvaluator(MaskEvaluator):
    """Runs each layer step through the model's own forward (the design notes' first idea)."""

    def _layer(self, j, hidden):
        self.layer_calls += 1
        outs = []
        for c in self._chunks:
            capture = _Capture()
            stack = nn.ModuleList([_Inject(hidden[c], self._tuple_output), self._layers[j], capture])
            with swapped_layers(self.model, self.adapter, stack, {}):
                try:
                    self._base(self.input_ids[c])
                except _Stop:
                    pass
            outs.append(capture.hidden)
        return torch.cat(outs)


def main(n_masks: int = 64) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # 2 shared cores here: one thread gives steadier timings
    config = LlamaConfig(vocab_size=4096, hidden_size=192, intermediate_size=512, num_hidden_layers=16,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    lm = wrap_model(LlamaForCausalLM(config))
    ids = torch.randint(0, 4096, (8, 128))  # (n, T)
    rng = np.random.default_rng(0)
    # stratified like the paper: keep 15, 13, 12, 10, 9 of 16 layers
    masks = np.zeros((n_masks, 16), dtype=bool)
    for r in range(n_masks):
        masks[r, rng.choice(16, size=[15, 13, 12, 10, 9][r % 5], replace=False)] = True
    print(f"{n_masks} masks, {int(masks.sum())} kept layers in all, "
          f"{count_prefix_computations(masks)} distinct (prefix, layer) pairs")
    results = {}
    for name, cls, sharing in [("independent", MaskEvaluator, False), ("recorded", MaskEvaluator, True),
                               ("forward-step", ForwardStepEvaluator, True)]:
        ev = cls(lm, ids, prefix_sharing=sharing)
        ev.perplexities(masks[:2])  # warm-up
        ev.layer_calls = 0
        t0 = time.perf_counter()
        results[name] = ev.perplexities(masks)
        dt = time.perf_counter() - t0
        print(f"{name:13s} {1000 * dt / n_masks:7.1f} ms/mask  layer calls {ev.layer_calls}")
    ref = results["independent"]
    for name in ("recorded", "forward-step"):
        print(f"max rel diff {name} vs independent: {np.max(np.abs(results[name] / ref - 1)):.2e}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 64)
