"""Quality of the committed demo model (engine/assets/demo-lm) on the bundled text.

These read the real files: they fail if the model is missing, untrained or broken.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np
import pytest
import torch

from engine.config import DEMO_DATA, DEMO_MODEL_DIR, DataSpec, ModelSpec
from engine.data import load_text, make_windows
from engine.evaluate import MaskEvaluator
from engine.models import load_model


@pytest.fixture(scope="module")
def demo():
    return load_model(ModelSpec(name="demo"))


def test_the_demo_assets_are_complete():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md"):
        assert (DEMO_MODEL_DIR / name).is_file(), name
    for path in DEMO_DATA.values():
        assert path.is_file() and path.stat().st_size > 50_000, path
    card = (DEMO_MODEL_DIR / "README.md").read_text()
    for fact in ("tokens seen", "PSF", "public domain", "perplexity"):
        assert fact in card, fact


def test_it_is_a_16_layer_llama_with_its_own_small_bpe_vocabulary(demo):
    assert demo.family == "llama" and demo.n_layers >= 16
    assert 4000 <= len(demo.tokenizer) <= 8200


def _unigram_ppl(tokenizer, text: str) -> float:
    """Perplexity of the best unigram model of `text` itself (fitted on the text it is scored on)."""
    ids = tokenizer(text)["input_ids"]
    counts = Counter(ids)
    n = len(ids)
    return math.exp(-sum(c * math.log(c / n) for c in counts.values()) / n)


def test_heldout_perplexity_is_under_a_quarter_of_a_unigram_model(demo):
    spec = DataSpec(source="demo-test", n_windows=16, seq_len=128, seed=1)
    ppl = MaskEvaluator(demo, make_windows(demo.tokenizer, spec)).ppl_full
    unigram = _unigram_ppl(demo.tokenizer, load_text("demo-test"))
    assert ppl <= unigram / 4, (ppl, unigram)


def test_single_layers_matter_by_clearly_different_amounts(demo):
    windows = make_windows(demo.tokenizer, DataSpec(source="demo"))
    ev = MaskEvaluator(demo, windows)
    L = demo.n_layers
    masks = ~np.eye(L, dtype=bool)  # (L, L): row i drops layer i
    increase = ev.perplexities(masks) - ev.ppl_full
    assert np.all(np.isfinite(increase))
    smallest = max(float(increase.min()), 1e-9)
    assert increase.max() >= 3 * smallest, increase


def test_greedy_generation_reads_like_the_python_docs(demo):
    tok = demo.tokenizer
    prompt = "The function returns"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = demo.model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=tok.eos_token_id)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    words = re.findall(r"[A-Za-z]+", text)
    vocabulary = set(re.findall(r"[A-Za-z]+", load_text("demo")))  # words of the held-out docs
    known = [w for w in words if w in vocabulary]
    assert len(words) >= 5, text
    assert len(known) / len(words) >= 0.8, text
    assert len(set(w.lower() for w in words)) >= 4, text  # not one word repeated
