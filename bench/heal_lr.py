"""Learning-rate sweep behind engine heal's default --lr (HEAL_LR in engine/config.py).

The demo model without layers 2, 3, 4, 6 (a 4-layer set chosen by hand), LoRA r=8, alpha 16, dropout
0.05 on every linear layer of the kept layers, AdamW (weight decay 0) with 5% linear warm-up then
linear decay, batches of 8 x 128 tokens drawn in a seeded order from every aligned block of the
calibration text, the same seed for every lr; perplexity on 64 windows of demo-test before and after.
This is the scratch loop the default was chosen with (kept as it ran: no gradient clipping, no
held-back windows), not engine.heal itself; `python -m bench.heal --lr X` measures the engine's.

Usage: python -m bench.heal_lr STEPS LR[,LR...]
"""

import sys
import time

import numpy as np
import torch

from engine.config import DataSpec, ModelSpec
from engine.data import load_text, make_windows
from engine.evaluate import MaskEvaluator
from engine.models import load_model
from engine.export import pruned_view


def main() -> None:
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(1)
    steps = int(sys.argv[1])
    lrs = [float(x) for x in sys.argv[2].split(",")]
    lm0 = load_model(ModelSpec())
    ids = lm0.tokenizer(load_text("demo"), add_special_tokens=False)["input_ids"]
    print("tokens", len(ids))
    T = 128
    blocks = torch.tensor(ids[: len(ids) // T * T]).view(-1, T)  # (n, T)
    test = make_windows(lm0.tokenizer, DataSpec(source="demo-test", n_windows=64, seq_len=128)).input_ids
    removed = [2, 3, 4, 6]
    kept = [i for i in range(16) if i not in removed]
    mask = np.ones(16, bool)
    mask[removed] = False
    ev = MaskEvaluator(lm0, test)
    print("full", ev.ppl_full, "pruned", ev.perplexities(mask[None])[0], flush=True)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for lr in lrs:
        lm = load_model(ModelSpec())
        g = torch.Generator().manual_seed(0)
        with pruned_view(lm.model, lm.adapter, kept):
            torch.manual_seed(0)
            pm = get_peft_model(lm.model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=targets))
            opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr, weight_decay=0)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: min(1, (s + 1) / max(1, steps // 20)) * max(0.0, 1 - s / steps))
            pm.train()
            t = time.time()
            perm = torch.randperm(len(blocks), generator=g)
            pos = 0
            for _ in range(steps):
                if pos + 8 > len(perm):
                    perm, pos = torch.randperm(len(blocks), generator=g), 0
                b = blocks[perm[pos : pos + 8]]
                pos += 8
                loss = pm(input_ids=b, labels=b, use_cache=False).loss
                loss.backward()
                opt.step()
                sched.step()
                opt.zero_grad()
            pm.merge_and_unload()
        lm.model.eval()
        print("lr", lr, "after", MaskEvaluator(lm, test).perplexities(mask[None])[0], "sec", time.time() - t, flush=True)


if __name__ == "__main__":
    main()
