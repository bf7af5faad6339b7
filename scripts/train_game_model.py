"""Train a small held-out model for the coverage benches: another family, other text than the demo model.

The demo model (scripts/train_demo_model.py) is a Llama trained on the Python 3.11 *documentation*
(reStructuredText). The games built here are scored by `bench.ground_truth` (every mask) and used
by `bench.uncertainty` / `bench.interactions` to check that intervals hold on games nobody tuned on:

  * ``neox-stdlib``: a GPT-NeoX-shaped model trained on the Python 3.11 standard library's *source*
    (/usr/lib/python3.11/*.py, PSF licence): code, not prose;
  * ``qwen2-man``: a Qwen2-shaped model (grouped-query attention, SwiGLU, RMSNorm) trained on English
    man pages (/usr/share/man/man1,5,8 except the generated gcloud ones, troff markup stripped; each page under its package's licence).

Text is split by whole file with a seeded hash into calibration (`--calibration-chars`, written to
``<out>/calibration.txt`` for the ground truth's windows), test and train. Training runs a fixed
number of steps (cosine schedule over steps, seeded), so the same command rebuilds the same model on
the same torch build; `--minutes` only stops a run that is far too slow (and says so).

    nice -n 10 python scripts/train_game_model.py --game neox-stdlib --out /work/scratch/neox-stdlib
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_demo_model import perplexity, train_tokenizer  # noqa: E402  (same tokenizer recipe and metric)

GAMES = {
    "neox-stdlib": {"family": "gpt_neox", "layers": 12, "corpus": "python-stdlib-source"},
    "qwen2-man": {"family": "qwen2", "layers": 12, "corpus": "man-pages"},
}


# ---------------------------------------------------------------- corpora


def stdlib_files() -> list[Path]:
    root = Path(f"/usr/lib/python{sys.version_info.major}.{sys.version_info.minor}")
    files = sorted(p for p in root.rglob("*.py") if "test" not in p.parts and "site-packages" not in p.parts
                   and "dist-packages" not in p.parts and p.stat().st_size < 400_000)
    if not files:
        raise SystemExit(f"no Python source under {root}")
    return files


_TROFF_FONT = re.compile(r"\\f(\[[^\]]*\]|\(..|.)")
_TROFF_ESC = re.compile(r"\\(\(..|\[[^\]]*\]|[-e&|^%c0 ~'`])")


def troff_to_text(src: str) -> str:
    """Plain text of a man page: macro lines keep their arguments, font and escape codes dropped."""
    out = []
    for line in src.splitlines():
        if line.startswith(('.\\"', "'\\\"", '.\\}')):
            continue
        if line.startswith((".", "'")):
            parts = line[1:].split(None, 1)
            if not parts or parts[0] in ("TH", "so", "de", "ds", "nr", "if", "ie", "el", "ig", "..", "ft", "ta",
                                         "in", "ti", "sp", "br", "PD", "nh", "ad", "na", "fi", "nf", "ne", "RS", "RE",
                                         "PP", "LP", "P", "UC", "hy", "ll", "ce", "bp"):
                continue
            line = parts[1] if len(parts) > 1 else ""
            line = line.replace('"', "")
        line = _TROFF_FONT.sub("", line)
        line = _TROFF_ESC.sub(lambda m: "-" if m.group(1) == "-" else " ", line)
        line = line.replace("\\", "")
        if line.strip():
            out.append(line.rstrip())
    return "\n".join(out)


def man_files() -> list[Path]:
    files = sorted(p for s in ("man1", "man5", "man8") for p in (Path("/usr/share/man") / s).glob("*.gz")
                   if not p.name.startswith("gcloud"))  # ~15,000 near-identical generated CLI pages
    if not files:
        raise SystemExit("no man pages under /usr/share/man")
    return files


def read_file(game: str, path: Path) -> str:
    if GAMES[game]["corpus"] == "man-pages":
        try:
            return troff_to_text(gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace"))
        except (OSError, EOFError):
            return ""
    return path.read_text(encoding="utf-8", errors="replace")


def split_corpus(game: str, seed: int, cal_chars: int, test_chars: int, train_chars: int) -> dict[str, str]:
    """Whole files in seeded-hash order fill calibration, then test, then train (up to train_chars)."""
    files = stdlib_files() if GAMES[game]["corpus"] == "python-stdlib-source" else man_files()
    key = lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest()
    parts: dict[str, list[str]] = {"calibration": [], "test": [], "train": []}
    size = dict.fromkeys(parts, 0)
    limit = {"calibration": cal_chars, "test": test_chars, "train": train_chars}
    for p in sorted(files, key=key):
        if all(size[k] >= limit[k] for k in parts):
            break
        text = read_file(game, p)
        if len(text) < 200:
            continue
        for name in ("calibration", "test", "train"):
            if size[name] < limit[name] and (name == "train" or len(text) < 30_000):
                parts[name].append(text)
                size[name] += len(text)
                break
    return {k: "\n\n".join(v) for k, v in parts.items()}


# ---------------------------------------------------------------- models


def make_model(family: str, vocab: int, layers: int, hidden: int, heads: int, kv_heads: int, inter: int, tok):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, Qwen2Config, Qwen2ForCausalLM

    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    if family == "gpt_neox":
        cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=inter, max_position_embeddings=512, use_parallel_residual=True,
                            tie_word_embeddings=False, **ids)
        return GPTNeoXForCausalLM(cfg)
    if family == "qwen2":
        cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=kv_heads, intermediate_size=inter, max_position_embeddings=512,
                          tie_word_embeddings=True, **ids)
        return Qwen2ForCausalLM(cfg)
    raise SystemExit(f"unknown family {family!r}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--game", required=True, choices=sorted(GAMES))
    ap.add_argument("--out", required=True, help="folder for the model, its tokenizer and calibration.txt")
    ap.add_argument("--layers", type=int, default=None, help="default: the game's (12)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2, help="Qwen2 only (grouped-query attention)")
    ap.add_argument("--intermediate", type=int, default=192)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--minutes", type=float, default=30.0, help="safety stop (the schedule is over --steps)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calibration-chars", type=int, default=60_000)
    ap.add_argument("--test-chars", type=int, default=60_000)
    ap.add_argument("--train-chars", type=int, default=3_000_000)
    a = ap.parse_args(argv)

    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    game = GAMES[a.game]
    layers = a.layers or game["layers"]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    texts = split_corpus(a.game, a.seed, a.calibration_chars, a.test_chars, a.train_chars)
    (out / "calibration.txt").write_text(texts["calibration"], encoding="utf-8")
    print({k: len(v) for k, v in texts.items()}, f"characters ({time.time() - t0:.0f} s)", flush=True)
    tok = train_tokenizer(texts["train"], a.vocab)
    enc = lambda s: torch.tensor(tok(s)["input_ids"], dtype=torch.long)
    train_ids, test_ids, cal_ids = enc(texts["train"]), enc(texts["test"]), enc(texts["calibration"])
    print(f"tokens: train {len(train_ids):,} test {len(test_ids):,} calibration {len(cal_ids):,}", flush=True)
    model = make_model(game["family"], len(tok), layers, a.hidden, a.heads, a.kv_heads, a.intermediate, tok)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{game['family']}: {layers} layers, {n_params / 1e6:.2f}M parameters", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(a.seed)
    warmup, t1, stopped = 100, time.time(), None
    model.train()
    for step in range(a.steps):
        if time.time() - t1 > a.minutes * 60:
            stopped = step
            print(f"stopped by --minutes at step {step} of {a.steps}: the model differs from a full run", flush=True)
            break
        lr = a.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / a.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(train_ids) - a.seq_len - 1, (a.batch,), generator=gen)
        x = torch.stack([train_ids[s : s + a.seq_len] for s in starts])  # (B, T)
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 100 == 0:
            print(f"step {step + 1} loss {loss.item():.3f} lr {lr:.2e} {time.time() - t1:.0f}s", flush=True)
    model.eval()
    summary = {
        "game": a.game, "family": game["family"], "corpus": game["corpus"], "layers": layers, "params": n_params,
        "steps": a.steps if stopped is None else stopped, "stopped_early": stopped is not None,
        "train_seconds": round(time.time() - t1), "ppl_test": perplexity(model, test_ids, a.seq_len),
        "ppl_calibration": perplexity(model, cal_ids, a.seq_len), "torch": torch.__version__,
        "command": "python scripts/train_game_model.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "training_state.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1), flush=True)


if __name__ == "__main__":
    main()
