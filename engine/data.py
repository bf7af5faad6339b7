"""Calibration / evaluation text and the fixed token windows drawn from it.

`load_text(source)` accepts:
- "demo", "demo-test", "demo-ood": the bundled text (engine/config.DEMO_DATA);
- a path to a .txt file (read as UTF-8) or a .jsonl file (one JSON object per line, field
  `text_field`; blank lines skipped);
- a Hugging Face dataset preset, optionally with ":split":
  "wikitext2" (wikitext-2-raw-v1; default split "test", the standard perplexity benchmark
  text, so "wikitext2" is for evaluation and "wikitext2:train" for calibration), "ptb"
  (ptb_text_only; default "test"), "c4" (allenai/c4 English validation shard 0, streamed;
  the first `STREAM_CHARS` characters), "bookcorpus" (train, streamed; the first
  `STREAM_CHARS` characters: the paper's calibration text). Rows are joined with "\n\n"
  (wikitext, c4, bookcorpus) or " " (ptb), as in the GPTQ/SLEB evaluation code.
  When the hub cannot be reached the preset fails within seconds with a DataError, unless
  HF_HUB_OFFLINE=1 is set, in which case the datasets cache is tried.

`make_windows(tokenizer, spec)` tokenises the whole text once and draws `n_windows`
non-overlapping windows of `seq_len` tokens at seeded random offsets.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine import config as cfg
from engine.config import DataSpec, stable_hash
from engine.errors import DataError
from engine.hub import hub_offline_requested, hub_reachable

STREAM_CHARS = 2_000_000  # characters taken from streamed presets (c4, bookcorpus)

# preset -> (dataset path, config name, default split, data_files, streamed, field, joiner)
PRESETS: dict[str, tuple] = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "test", None, False, "text", "\n\n"),
    "ptb": ("ptb_text_only", "penn_treebank", "test", None, False, "sentence", " "),
    "c4": (
        "allenai/c4",
        None,
        "validation",
        {"validation": "en/c4-validation.00000-of-00008.json.gz"},
        True,
        "text",
        "\n\n",
    ),
    "bookcorpus": ("bookcorpus", None, "train", None, True, "text", "\n\n"),
}


@dataclass(frozen=True)
class Windows:
    """Token windows drawn from a text."""

    input_ids: torch.Tensor  # LongTensor (n_windows, seq_len)
    data_hash: str  # stable hash of (text sha256, tokenizer vocab hash, n, T, seed)
    source: str  # what was asked for (DataSpec.source)
    n_tokens: int  # tokens in the whole text


def _read_jsonl(path: Path, text_field: str) -> str:
    texts = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {lineno}: not valid JSON ({e.msg}); one JSON object per line") from e
            if not isinstance(record, dict) or text_field not in record:
                raise DataError(f"{path}, line {lineno}: no field {text_field!r}; set the text field (--text-field)")
            if not isinstance(record[text_field], str):
                raise DataError(f"{path}, line {lineno}: field {text_field!r} is not a string")
            texts.append(record[text_field])
    return "\n\n".join(texts)


def _load_preset(name: str, split: str | None) -> str:
    path, config_name, default_split, data_files, streamed, field, joiner = PRESETS[name]
    split = split or default_split
    if not hub_reachable() and not hub_offline_requested():
        raise DataError(
            f"could not reach the Hugging Face hub for dataset preset {name!r}; pass a local .txt or .jsonl "
            "file (or --data demo), or set HF_HUB_OFFLINE=1 to use a cached copy"
        )
    import datasets

    try:
        ds = datasets.load_dataset(path, config_name, split=split, data_files=data_files, streaming=streamed)
        if streamed:
            parts, size = [], 0
            for row in ds:
                parts.append(row[field])
                size += len(row[field])
                if size >= STREAM_CHARS:
                    break
        else:
            parts = ds[field]
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError...)
        raise DataError(
            f"could not load dataset preset {name!r} (split {split!r}): {str(e).splitlines()[0] if str(e) else type(e).__name__}; "
            "pass a local .txt or .jsonl file instead (or --data demo)"
        ) from e
    return joiner.join(parts)


def check_source(source: str) -> Path | None:
    """DataError when `source` names a folder or a missing file (reads nothing); the file's path, or
    None for the demo texts and presets. Called up front by validate.check_run and by `load_text`."""
    if source in cfg.DEMO_DATA or source.partition(":")[0] in PRESETS:
        return None
    path = Path(source).expanduser()
    if path.is_dir():
        raise DataError(f"--data {source!r} is a directory; pass a .txt or .jsonl file inside it (or demo).")
    if not path.is_file():
        raise DataError(
            f"no such file: {source!r}; pass a .txt or .jsonl file, demo/demo-test/demo-ood, "
            f"or a preset ({', '.join(PRESETS)})"
        )
    return path


def load_text(source: str, text_field: str = "text") -> str:
    """The text named by `source` (see module docstring); DataError for anything unusable."""
    if source in cfg.DEMO_DATA:
        path = cfg.DEMO_DATA[source]
        if not path.is_file():
            raise DataError(f"the demo text {path} is not built yet; run scripts/train_demo_model.py or pass a file")
        return path.read_text(encoding="utf-8")
    preset, _, split = source.partition(":")
    if preset in PRESETS:
        return _load_preset(preset, split or None)
    path = check_source(source)
    try:
        if path.suffix == ".jsonl":
            return _read_jsonl(path, text_field)
        if path.suffix == ".txt":
            return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    raise DataError(f"{path}: unknown file type {path.suffix!r}; use a .txt or .jsonl file")


def tokenizer_hash(tokenizer) -> str:
    """Stable hash of a tokenizer's vocabulary (token -> id) and class."""
    vocab = sorted(tokenizer.get_vocab().items())
    return stable_hash({"class": type(tokenizer).__name__, "vocab": vocab})


def make_windows(tokenizer, spec: DataSpec, text: str | None = None) -> Windows:
    """Tokenise the text of `spec.source` once; draw n non-overlapping windows of seq_len at seeded offsets.

    `text` may be given to skip `load_text` (it must be the text of `spec.source`).
    """
    if spec.n_windows < 1 or spec.seq_len < 2:
        raise DataError(f"need n_windows >= 1 and seq_len >= 2, got {spec.n_windows} and {spec.seq_len}")
    text = load_text(spec.source, spec.text_field) if text is None else text
    if not text.strip():
        raise DataError(f"the text of {spec.source!r} is empty; give a file with text in it")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    n, T, m = spec.n_windows, spec.seq_len, len(ids)
    if m < n * T:
        raise DataError(
            f"{spec.source!r}: needs {n * T} tokens ({n} windows x {T}), found {m}; "
            "give more text or fewer/shorter windows"
        )
    # Non-overlapping at random offsets: split the slack (m - n*T) into n+1 random gaps
    # (a uniformly random composition), then lay the windows out in a random order.
    rng = np.random.default_rng(spec.seed)
    slack = m - n * T
    cuts = np.sort(rng.integers(0, slack + 1, size=n))
    starts = cuts + np.arange(n) * T
    order = rng.permutation(n)
    stream = torch.tensor(ids, dtype=torch.long)
    input_ids = torch.stack([stream[s : s + T] for s in starts[order]])  # (n, T)
    text_sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    data_hash = stable_hash({"text": text_sha, "tokenizer": tokenizer_hash(tokenizer), "n": n, "T": T, "seed": spec.seed})
    return Windows(input_ids=input_ids, data_hash=data_hash, source=spec.source, n_tokens=m)


def validation_windows(tokenizer, spec: DataSpec, n: int, seed: int = 1, text: str | None = None,
                       at_most: bool = False) -> Windows:
    """`n` windows of `spec`'s text that overlap none of `make_windows(tokenizer, spec)`'s windows: a
    validation split of the calibration text (for choosing among candidate sets on text the surrogate
    was not fitted on). Windows are aligned blocks of seq_len tokens, `n` of the free ones chosen with
    `seed`; DataError when fewer than `n` are free, unless `at_most` (then all the free ones, maybe none)."""
    text = load_text(spec.source, spec.text_field) if text is None else text
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    n_cal, T, m = spec.n_windows, spec.seq_len, len(ids)
    if m < n_cal * T:
        raise DataError(f"{spec.source!r}: needs {n_cal * T} tokens for the calibration windows, found {m}")
    rng = np.random.default_rng(spec.seed)  # the calibration offsets, drawn exactly as make_windows draws them
    cuts = np.sort(rng.integers(0, m - n_cal * T + 1, size=n_cal))
    used = np.zeros(m, dtype=bool)
    for s in cuts + np.arange(n_cal) * T:
        used[s : s + T] = True
    free = [b for b in range(0, m - T + 1, T) if not used[b : b + T].any()]
    if at_most:
        n = min(n, len(free))
    if len(free) < n:
        raise DataError(f"{spec.source!r}: only {len(free)} windows of {T} tokens do not overlap the {n_cal} "
                        f"calibration windows; ask for at most {len(free)} validation windows or give more text")
    pick = np.sort(np.random.default_rng(seed).choice(free, size=n, replace=False))
    stream = torch.tensor(ids, dtype=torch.long)
    input_ids = torch.stack([stream[b : b + T] for b in pick]) if n else torch.zeros((0, T), dtype=torch.long)
    text_sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    data_hash = stable_hash({"text": text_sha, "tokenizer": tokenizer_hash(tokenizer), "n": n, "T": T,
                             "seed": spec.seed, "validation_seed": seed, "n_calibration": n_cal})
    return Windows(input_ids=input_ids, data_hash=data_hash, source=f"{spec.source} (validation)", n_tokens=m)
