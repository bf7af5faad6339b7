"""Train the bundled demo model: a small Llama trained from scratch on offline English text.

Corpus (both from Debian, both redistributable):
  * in-domain: the Python 3.11 documentation sources (package python3.11-doc,
    PSF licence), split by file into train / calibration / test;
  * out-of-domain: the King James Bible (package bible-kjv, public domain),
    read through the `bible` program; never used for training.

The script installs the Debian packages if they are missing (needs root and the
Debian mirror), is seeded, logs the loss, saves a checkpoint every few hundred
steps (so a killed run still leaves a usable model) and ends by printing the
held-out perplexity and writing the model card.

    python scripts/train_demo_model.py --minutes 60 --out engine/assets/demo-lm
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

DOC_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
# Books of the KJV for the out-of-domain split: narrative prose, ~120 KB.
OOD_BOOKS = ["Ruth", "Esther", "Jonah", "Mark"]
SPLIT_SIZES = {"calibration": 150_000, "test": 150_000}  # characters, by whole files


def ensure_corpus() -> None:
    """Install the Debian packages that carry the corpus when they are missing."""
    missing = []
    if not DOC_ROOT.is_dir():
        missing.append("python3.11-doc")
    if shutil.which("bible") is None:
        missing.append("bible-kjv")
    if missing:
        print(f"installing {missing} with apt-get", flush=True)
        subprocess.run(["apt-get", "update", "-q"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=True)


def doc_files() -> list[Path]:
    files = sorted(DOC_ROOT.rglob("*.rst.txt"))
    if not files:
        raise SystemExit(f"no .rst.txt files under {DOC_ROOT}")
    return files


def split_docs(seed: int) -> dict[str, list[Path]]:
    """Whole files, shuffled by a seeded hash, fill calibration then test; the rest trains."""
    files = doc_files()
    key = lambda p: hashlib.sha256(f"{seed}:{p.relative_to(DOC_ROOT)}".encode()).hexdigest()
    splits: dict[str, list[Path]] = {"calibration": [], "test": [], "train": []}
    sizes = {k: 0 for k in splits}
    for path in sorted(files, key=key):
        n = path.stat().st_size
        for name in ("calibration", "test"):
            # Skip giant files for the small splits so each is many documents.
            if sizes[name] < SPLIT_SIZES[name] and n < 40_000:
                splits[name].append(path)
                sizes[name] += n
                break
        else:
            splits["train"].append(path)
    return splits


def read_files(paths: list[Path]) -> str:
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in paths)


def kjv_text() -> str:
    chunks = []
    for book in OOD_BOOKS:
        out = subprocess.run(["bible", "-f", f"{book} 1:1-99:999"], capture_output=True, text=True, check=True).stdout
        # Drop the "Book1:1 " verse labels: plain prose, one verse a line.
        chunks.append("\n".join(line.split(" ", 1)[1] for line in out.splitlines() if " " in line))
    return "\n\n".join(chunks)


def train_tokenizer(text: str, vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([text[i : i + 100_000] for i in range(0, len(text), 100_000)], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )


@torch.inference_mode()
def perplexity(model, ids: torch.Tensor, seq_len: int, batch: int = 16) -> float:
    """Mean-token perplexity over non-overlapping windows of `ids` (1-D)."""
    n = (len(ids) - 1) // seq_len
    windows = ids[: n * seq_len].view(n, seq_len)  # (n, T)
    total, count = 0.0, 0
    model.eval()
    for i in range(0, n, batch):
        x = windows[i : i + batch]
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        total += loss.item() * x.numel()
        count += x.numel()
    return math.exp(total / count)


def unigram_perplexity(train_ids: torch.Tensor, test_ids: torch.Tensor, vocab: int) -> float:
    counts = Counter(train_ids.tolist())
    total = len(train_ids) + vocab  # add-one smoothing
    logp = [math.log((counts.get(t, 0) + 1) / total) for t in test_ids.tolist()]
    return math.exp(-sum(logp) / len(logp))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="engine/assets/demo-lm")
    ap.add_argument("--text-out", default="engine/assets/demo-text")
    ap.add_argument("--minutes", type=float, default=60.0, help="wall-clock training budget")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    out, text_out = Path(args.out), Path(args.text_out)
    out.mkdir(parents=True, exist_ok=True)
    text_out.mkdir(parents=True, exist_ok=True)

    ensure_corpus()
    splits = split_docs(args.seed)
    texts = {name: read_files(paths) for name, paths in splits.items()}
    texts["ood"] = kjv_text()
    for name, fname in (("calibration", "calibration.txt"), ("test", "test.txt"), ("ood", "ood.txt")):
        (text_out / fname).write_text(texts[name], encoding="utf-8")
    (text_out / "splits.json").write_text(
        json.dumps({k: [str(p.relative_to(DOC_ROOT)) for p in v] for k, v in splits.items() if k != "train"}, indent=1)
    )
    print({k: len(v) for k, v in texts.items()}, "characters", flush=True)

    tokenizer = train_tokenizer(texts["train"], args.vocab)
    encode = lambda s: torch.tensor(tokenizer(s)["input_ids"], dtype=torch.long)
    train_ids = encode(texts["train"])
    test_ids, calib_ids, ood_ids = encode(texts["test"]), encode(texts["calibration"]), encode(texts["ood"])
    print(f"train tokens {len(train_ids):,}, test {len(test_ids):,}, calibration {len(calib_ids):,}", flush=True)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)

    def save(step: int, tokens: int, seconds: float) -> None:
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        (out / "training_state.json").write_text(json.dumps({"step": step, "tokens": tokens, "seconds": seconds}))

    budget = args.minutes * 60
    gen = torch.Generator().manual_seed(args.seed)
    warmup, step, tokens, t0 = 100, 0, 0, time.time()
    # The schedule runs on wall-clock progress so the budget holds on a busy machine.
    model.train()
    while (elapsed := time.time() - t0) < budget:
        progress = elapsed / budget
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(train_ids) - args.seq_len - 1, (args.batch,), generator=gen)
        x = torch.stack([train_ids[s : s + args.seq_len] for s in starts])  # (B, T)
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += x.numel()
        if step % 25 == 0:
            print(f"step {step} tokens {tokens:,} loss {loss.item():.3f} lr {lr:.2e} {time.time() - t0:.0f}s", flush=True)
        if step % 300 == 0:
            save(step, tokens, time.time() - t0)
    seconds = time.time() - t0
    save(step, tokens, seconds)

    model.eval()
    ppl_test = perplexity(model, test_ids, args.seq_len)
    ppl_calib = perplexity(model, calib_ids, args.seq_len)
    ppl_ood = perplexity(model, ood_ids, args.seq_len)
    uni = unigram_perplexity(train_ids, test_ids, len(tokenizer))
    prompt = "The default value of the argument is"
    sample = tokenizer.decode(
        model.generate(encode(prompt)[None], max_new_tokens=40, do_sample=False)[0], skip_special_tokens=True
    )
    summary = {
        "steps": step, "tokens_seen": tokens, "train_seconds": round(seconds), "params": n_params,
        "ppl_test": ppl_test, "ppl_calibration": ppl_calib, "ppl_ood": ppl_ood, "unigram_ppl_test": uni,
        "hardware": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "sample": sample,
    }
    print(json.dumps(summary, indent=1), flush=True)
    (out / "training_state.json").write_text(json.dumps(summary, indent=1))
    write_card(out, args, summary)


def write_card(out: Path, args, s: dict) -> None:
    (out / "README.md").write_text(f"""---
license: psf-2.0
language: en
library_name: transformers
pipeline_tag: text-generation
---
# demo-lm: the workbench's bundled demo model

A {args.layers}-layer Llama (hidden {args.hidden}, {args.heads} heads, MLP {args.intermediate},
vocabulary {args.vocab} byte-level BPE, {s['params'] / 1e6:.2f}M parameters, tied embeddings)
trained from scratch so that layer pruning can be explored with no model download.
It is a toy language model: good enough to show real, unequal layer contributions; not for use.

## Data and licences
* Training, calibration and in-domain test text: the reStructuredText sources of the
  Python 3.11 documentation (Debian package `python3.11-doc`, PSF License Version 2).
  Split by whole file with a seeded hash; calibration and test files were never trained on
  (file lists in `../demo-text/splits.json`).
* Out-of-domain test text: books {', '.join(OOD_BOOKS)} of the King James Bible (Debian package
  `bible-kjv`, public domain). Never trained on.

## Training
`python scripts/train_demo_model.py --minutes {args.minutes:g} --seed {args.seed}` — AdamW (lr {args.lr}, betas 0.9/0.95,
weight decay 0.1), warm-up then cosine decay, batch {args.batch} x {args.seq_len} tokens.
Steps {s['steps']:,}; tokens seen {s['tokens_seen']:,}; training time {s['train_seconds'] / 60:.1f} min on {s['hardware']}.

## Results (mean-token perplexity, {args.seq_len}-token windows)
| split | perplexity |
|---|---|
| in-domain test (Python docs, held out) | {s['ppl_test']:.2f} |
| calibration (Python docs, held out) | {s['ppl_calibration']:.2f} |
| out-of-domain (KJV) | {s['ppl_ood']:.2f} |
| unigram baseline on the test split (same tokenizer, add-one) | {s['unigram_ppl_test']:.2f} |

Greedy sample from "The default value of the argument is":

```
{s['sample']}
```
""")


if __name__ == "__main__":
    sys.exit(main())
