"""LoRA healing of a pruned model: train low-rank adapters on the kept layers, merge them in.

Contract:
- `healing_windows(tokenizer, text, seq_len, held_back, seed) -> HealWindows`: the text cut into
  aligned blocks of `seq_len` tokens; `held_back` of them (chosen with `seed`) are kept out of
  training for ppl_before / ppl_after, the rest train. DataError when fewer than held_back + 1 fit.
- `text_overlap(a, b)` / `check_overlap(name, text, heldout, allow)`: shared word 13-grams (the
  contamination measure of the GPT-3 paper). A healing text sharing >= OVERLAP_REFUSE of its own or a
  held-out text's 13-grams (or named like one) raises HealDataOverlap, or with `allow` returns a warning.
- `heal_model(lm, kept, windows, spec, checkpoint=None, progress=None) -> HealOutcome`: inside
  export.pruned_view (the model IS the pruned model), peft LoRA (rank, alpha, dropout of `spec`) on the
  linear layers of the kept decoder layers that `spec.modules` names (all, attn, mlp), trained on
  `spec.objective`: "lm" is next-token cross-entropy on the text; "distill" is the KL from the full
  (unpruned) model's next-token distribution at every position, over its KD_TOPK most likely tokens plus
  one bin for all the others (`teacher_targets`, computed once before training; `distill_loss`), AdamW with 5% linear warm-up then linear decay, batches in a
  seeded order fixed up front; after training `merge_and_unload` writes the adapters into the base weights,
  so afterwards `lm.model` holds the healed kept layers (the removed ones untouched) and
  export.prune_model(lm, removed, ...) exports the healed pruned model. `lm` is modified in place.
- Resume: with a `HealCheckpoint`, the adapter, optimizer, scheduler, RNG states, losses and step are
  saved there every `spec.checkpoint_every` steps and at the end (torch.save to a temporary file
  beside, then rename); a call with the same checkpoint continues from its step (a finished one only
  merges). The checkpoint's `key` hashes everything that decides the result, so other settings never
  resume from it.

A hand-written loop rather than transformers.Trainer: the Trainer needs accelerate (not installed
here) and keeps its own output folders, checkpoint layout and logging; 40 lines keep the checkpoint
atomic inside the workbench's cache and the progress in the workbench's format.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from engine.config import HealSpec, stable_hash
from engine.errors import DataError, WorkbenchError
from engine.export import pruned_view

NGRAM = 13  # words per shingle of the overlap check (GPT-3's contamination check)
OVERLAP_REFUSE = 0.01  # share of 13-grams above which a healing text counts as overlapping a held-out text
WARMUP = 0.05  # share of the steps with a linear warm-up of the learning rate
PREFIX_TOKENS = 8  # tokens of a healing-text window that each sampled window continues
KD_TOPK = 128  # teacher tokens kept per position for distillation (the rest share one bin)


class HealDataOverlap(WorkbenchError):
    """The healing text overlaps a held-out text: healing on it would make held-out perplexity lie."""


@dataclass(frozen=True)
class HealWindows:
    train: torch.Tensor  # LongTensor (n_train, T)
    held_back: torch.Tensor  # LongTensor (n_held, T), no token shared with `train`
    text_sha256: str
    n_tokens: int


@dataclass(frozen=True)
class HealOutcome:
    steps: int  # optimizer steps of the whole healing (the budget)
    resumed_from: int  # step the checkpoint held when this call started (0: fresh)
    losses: tuple[float, ...]  # training loss of every step 1..steps
    seconds: float  # training time of this call
    trainable_params: int
    target_modules: tuple[str, ...]  # module names (pruned numbering) that got an adapter

    @property
    def loss_first(self) -> float:
        return float(np.mean(self.losses[: max(1, len(self.losses) // 10)]))

    @property
    def loss_last(self) -> float:
        return float(np.mean(self.losses[-max(1, len(self.losses) // 10):]))


def healing_windows(tokenizer, text: str, seq_len: int, held_back: int, seed: int = 0) -> HealWindows:
    """Aligned blocks of `seq_len` tokens of `text`: `held_back` of them for measuring, the rest to train."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    n = len(ids) // seq_len
    if n < held_back + 1:
        raise DataError(f"the healing text has {len(ids)} tokens: {n} windows of {seq_len}, but {held_back} are held "
                        f"back and at least one must train; give more text, or lower --held-back / --heal-seq-len.")
    blocks = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)  # (n, T)
    held = np.zeros(n, dtype=bool)
    held[np.random.default_rng([seed, 29]).choice(n, size=held_back, replace=False)] = True
    return HealWindows(blocks[torch.from_numpy(~held)], blocks[torch.from_numpy(held)],
                       hashlib.sha256(text.encode("utf-8")).hexdigest(), len(ids))


def _grams(text: str, n: int = NGRAM) -> set[int]:
    w = text.split()
    return {hash(" ".join(w[i : i + n])) for i in range(len(w) - n + 1)}


def text_overlap(a: str, b: str) -> dict:
    """Shared word 13-grams of two texts: count and the share of each text's 13-grams."""
    ga, gb = _grams(a), _grams(b)
    shared = len(ga & gb)
    return {"shared": shared, "of_heal": shared / max(1, len(ga)), "of_heldout": shared / max(1, len(gb))}


def check_overlap(name: str, text: str, heldout: dict[str, str], allow: bool = False) -> tuple[dict, list[str]]:
    """({held-out name: overlap}, warnings); HealDataOverlap when the healing text overlaps one (unless allow)."""
    found, warnings = {}, []
    for other, other_text in heldout.items():
        ov = text_overlap(text, other_text)
        found[other] = ov
        same = name == other
        if same or max(ov["of_heal"], ov["of_heldout"]) >= OVERLAP_REFUSE:
            why = ("is that held-out text" if same else f"shares {ov['shared']} word {NGRAM}-grams with it "
                   f"({ov['of_heal']:.1%} of its own, {ov['of_heldout']:.1%} of the held-out text's)")
            msg = (f"the healing text {name!r} {why}: {other!r} is a held-out text, so its perplexity after "
                   "healing would not be held-out any more.")
            if not allow:
                raise HealDataOverlap(msg + " Heal on another text (--heal-data), or pass --allow-overlap to heal "
                                            "anyway.")
            warnings.append(msg)
    return found, warnings


@dataclass(frozen=True)
class HealCheckpoint:
    """Where one healing's checkpoint lives (`folder`/checkpoint.pt) and what it must match (`key`)."""

    folder: Path
    key: str

    @property
    def path(self) -> Path:
        return self.folder / "checkpoint.pt"

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        return state if state.get("key") == self.key else None

    def save(self, state: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        torch.save({**state, "key": self.key}, tmp)
        os.replace(tmp, self.path)  # atomic: a kill leaves the previous checkpoint or this one


def checkpoint_key(identity: str, kept: Sequence[int], n_layers: int, spec: HealSpec, text_sha256: str,
                   tokenizer_hash: str, dtype: str, seq_len: int) -> str:
    """Hash of what decides a healing's numbers (checkpoint_every and the held-out settings do not)."""
    settings = {k: v for k, v in spec.__dict__.items() if k not in ("checkpoint_every", "eval_windows",
                                                                      "allow_overlap", "data")}
    return stable_hash({"model": identity, "kept": list(kept), "L": n_layers, "spec": settings, "seq_len": seq_len,
                        "text": text_sha256, "tokenizer": tokenizer_hash, "dtype": dtype,
                        "kd_topk": KD_TOPK if spec.objective == "distill" else None}, n=16)


def total_steps(spec: HealSpec, n_train: int, default: int) -> int:
    if spec.steps is not None:
        return spec.steps
    if spec.epochs is not None:
        return max(1, math.ceil(spec.epochs * n_train / spec.batch))
    return default


def batch_order(n_train: int, steps: int, batch: int, seed: int) -> np.ndarray:
    """int[steps, batch]: window indices of every step, epoch after epoch of seeded permutations."""
    rng = np.random.default_rng([seed, 30])
    need = steps * batch
    order = np.concatenate([rng.permutation(n_train) for _ in range(math.ceil(need / n_train))])
    return order[:need].reshape(steps, batch)


def linear_targets(model: nn.Module, adapter) -> list[str]:
    """Full names of every linear layer inside the decoder layers (nn.Linear, and GPT-2's Conv1D)."""
    from transformers.pytorch_utils import Conv1D

    layer_ids = {id(m) for m in adapter.layers(model)}
    names = []
    prefix = next(n for n, m in model.named_modules() if m is adapter.layers(model))
    for name, mod in model.named_modules():
        if name.startswith(prefix + ".") and isinstance(mod, (nn.Linear, Conv1D)) and id(mod) not in layer_ids:
            names.append(name)
    return names


def select_targets(names: Sequence[str], modules: str) -> list[str]:
    """The linear layers `modules` names: all, attn (a path part containing attn/attention) or mlp (the rest)."""
    def is_attn(name: str) -> bool:
        return any("attn" in part or "attention" in part for part in name.lower().split("."))

    if modules == "all":
        return list(names)
    return [n for n in names if is_attn(n) == (modules == "attn")]


@dataclass(frozen=True)
class TeacherTargets:
    """The full model's top-k next-token distribution on every training window."""

    probs: torch.Tensor  # float32 (n_train, T, K), the teacher's probabilities of its top K (rows sum to <= 1)
    index: torch.Tensor  # int64 (n_train, T, K), token ids
    seconds: float


@torch.no_grad()
def sample_windows(model: nn.Module, train: torch.Tensor, n: int, seed: int, prefix: int = PREFIX_TOKENS,
                   batch: int = 64, progress: Callable[[int, int, str], None] | None = None) -> torch.Tensor:
    """LongTensor (n, T): `n` windows sampled from `model` (temperature 1, no truncation), each continuing
    the first `prefix` tokens of a training window drawn with `seed` (so the samples stay in the healing
    text's domain), T = train.shape[1]. `progress(done, n, words)` before each batch and at the end."""
    device = next(model.parameters()).device
    T = train.shape[1]
    prefix = min(prefix, T - 1)
    rows = torch.from_numpy(np.random.default_rng([seed, 31]).choice(len(train), size=n))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, n, batch):
            if progress is not None:
                progress(i, n, f"sampling {n} windows of {T} tokens from the full model")
            ids = train[rows[i : i + batch], :prefix].to(device)  # (b, prefix)
            past = None
            step_ids = ids
            seq = [ids]
            for _ in range(T - prefix):
                o = model(input_ids=step_ids, past_key_values=past, use_cache=True)
                past = o.past_key_values
                probs = torch.softmax(o.logits[:, -1].float(), dim=-1).cpu()  # (b, V)
                step_ids = torch.multinomial(probs, 1, generator=gen).to(device)  # (b, 1)
                seq.append(step_ids)
            out.append(torch.cat(seq, dim=1).cpu())  # (b, T)
    finally:
        model.train(was_training)
    if progress is not None:
        progress(n, n, f"sampled {n} windows from the full model")
    return torch.cat(out)


@torch.no_grad()
def teacher_targets(model: nn.Module, train: torch.Tensor, k: int = KD_TOPK, batch: int = 8,
                    progress: Callable[[int, int, str], None] | None = None) -> TeacherTargets:
    """Top-`k` softmax of `model` (the full model, eval mode) at every position of `train` (n, T);
    `progress(done, n, words)` before each batch."""
    t0 = time.monotonic()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    probs, index = [], []
    try:
        for i in range(0, len(train), batch):
            if progress is not None:
                progress(i, len(train), f"the full model's top-{k} targets on {len(train)} windows")
            logits = model(input_ids=train[i : i + batch].to(device), use_cache=False).logits.float()  # (b, T, V)
            top, idx = logits.topk(min(k, logits.shape[-1]), dim=-1)  # (b, T, K)
            probs.append(torch.exp(top - torch.logsumexp(logits, dim=-1, keepdim=True)).cpu())
            index.append(idx.cpu())
    finally:
        model.train(was_training)
    return TeacherTargets(torch.cat(probs), torch.cat(index), time.monotonic() - t0)


def distill_loss(logits: torch.Tensor, probs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) over K + 1 outcomes: the teacher's top K tokens and
    one bin for the rest. logits (B, T, V) of the student; probs (B, T, K) and index (B, T, K) of the teacher."""
    logq = torch.log_softmax(logits.float(), dim=-1).gather(-1, index)  # (B, T, K)
    p_rest = (1.0 - probs.sum(-1)).clamp_min(0.0)  # (B, T)
    logq_rest = torch.log1p(-logq.exp().sum(-1).clamp_max(1 - 1e-6))  # (B, T)
    kl = (torch.xlogy(probs, probs) - probs * logq).sum(-1) + torch.xlogy(p_rest, p_rest) - p_rest * logq_rest
    return kl.mean()


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def heal_model(lm, kept: Sequence[int], windows: HealWindows, spec: HealSpec, steps: int,
               checkpoint: HealCheckpoint | None = None,
               progress: Callable[[int, int, float, float], None] | None = None,
               phase: Callable[[int, int, str], None] | None = None) -> HealOutcome:
    """Train LoRA on the pruned view of `lm` for `steps` steps, merge it in (see the module docstring).

    `progress(step, steps, loss, lr)` is called after every step; `phase(done, total, words)` during the
    work before the first step (sampling windows from the full model, the teacher's targets)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    model, adapter = lm.model, lm.adapter
    device = next(model.parameters()).device
    warm = max(1, round(WARMUP * steps))
    t0 = time.monotonic()
    saved = checkpoint.load() if checkpoint is not None else None
    train = windows.train  # (n_train, T)
    generated = None
    if spec.generated:  # the full model's own samples, kept in the checkpoint (a resume trains on the same)
        generated = saved["generated"] if saved is not None and "generated" in saved else sample_windows(
            model, windows.train, spec.generated, spec.seed, progress=phase)
        train = torch.cat([train, generated])  # (n_train + generated, T)
    order = batch_order(len(train), steps, spec.batch, spec.seed)  # (steps, batch)
    teacher = teacher_targets(model, train, progress=phase) if spec.objective == "distill" else None  # full model
    with pruned_view(model, adapter, list(kept)):
        targets = select_targets(linear_targets(model, adapter), spec.modules)
        if not targets:
            raise WorkbenchError(f"{type(model).__name__} has no linear layers ({spec.modules}) in its decoder "
                                 "layers for LoRA; choose --lora-modules all.")
        torch.manual_seed(spec.seed)  # LoRA's A matrices are drawn from the global generator
        config = LoraConfig(r=spec.rank, lora_alpha=spec.lora_alpha, lora_dropout=spec.dropout,
                            target_modules=targets, bias="none", task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, config)
        merged = False
        try:
            params = [p for p in peft_model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: min(1.0, (s + 1) / warm) * max(0.0, (steps - s) / max(1, steps - warm + 1)))
            start, losses = 0, []
            if saved is not None:
                set_peft_model_state_dict(peft_model, saved["adapter"])
                opt.load_state_dict(saved["optimizer"])
                sched.load_state_dict(saved["scheduler"])
                _set_rng_state(saved["rng"], device)
                start, losses = int(saved["step"]), list(saved["losses"])

            def save(step: int) -> None:
                if checkpoint is not None:
                    checkpoint.save({"step": step, "steps": steps, "losses": losses, "rng": _rng_state(device),
                                     **({"generated": generated} if generated is not None else {}),
                                     "adapter": get_peft_model_state_dict(peft_model),
                                     "optimizer": opt.state_dict(), "scheduler": sched.state_dict()})

            peft_model.train()
            for s in range(start, steps):
                rows = torch.from_numpy(order[s])
                batch = train[rows].to(device)  # (B, T)
                if teacher is None:
                    loss = peft_model(input_ids=batch, labels=batch, use_cache=False).loss
                else:
                    logits = peft_model(input_ids=batch, use_cache=False).logits  # (B, T, V)
                    loss = distill_loss(logits, teacher.probs[rows].to(device), teacher.index[rows].to(device))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                lr = opt.param_groups[0]["lr"]
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                if progress is not None:
                    progress(s + 1, steps, losses[-1], lr)
                if (s + 1) % spec.checkpoint_every == 0 or s + 1 == steps:
                    save(s + 1)
            n_trainable = sum(p.numel() for p in params)
            peft_model.merge_and_unload()  # adapters written into the base weights; plain Linear modules again
            merged = True
        finally:
            if not merged:  # stopped (Ctrl-C, error): adapters removed unmerged, the model as it was
                peft_model.unload()
    model.eval()
    return HealOutcome(steps=steps, resumed_from=start, losses=tuple(losses), seconds=time.monotonic() - t0,
                       trainable_params=n_trainable, target_modules=tuple(targets))


# ---------------------------------------------------------------- measuring before / after


def window_losses(lm, input_ids: torch.Tensor, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(nll float64[W], tokens int64[W], ppl_full) of `lm` keeping `mask` bool[L] on windows (W, T)."""
    from engine.evaluate import MaskEvaluator

    ev = MaskEvaluator(lm, input_ids)
    nll, tok = ev.window_losses(np.asarray(mask, dtype=bool)[None])  # (1, W) each
    return nll[0], tok[0], float(ev.ppl_full)


def compare(before: tuple, after: tuple, ppl_full: float, level: float = 0.9, seed: int = 0) -> dict:
    """Perplexity before/after healing on the same windows, the after/before ratio with its paired
    bootstrap interval over the windows (uncertainty.compare_candidates), and the share of the loss
    to the full model that healing won back (`recovered`: 1 = back to the full model's perplexity)."""
    from engine.uncertainty import compare_candidates

    nll = np.stack([before[0], after[0]])  # (2, W)
    tok = np.stack([before[1], after[1]])
    cmp = compare_candidates([(0,), (1,)], nll, tok, level=level, seed=seed, chosen=0)
    ppl_before, ppl_after = cmp.ppl
    lost = ppl_before - ppl_full
    return {"ppl_full": ppl_full, "ppl_before": ppl_before, "ppl_after": ppl_after, "ratio": cmp.ratio[1],
            "ratio_low": cmp.ci_low[1], "ratio_high": cmp.ci_high[1], "level": level, "n_windows": int(nll.shape[1]),
            "recovered": (ppl_before - ppl_after) / lost if lost > 0 else None}
