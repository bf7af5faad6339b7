"""Shared fixtures: tiny random causal LMs of every supported family, a byte tokenizer, windows.

Nothing is downloaded: models are built with AutoConfig.for_model + from_config (hidden 32).
`tiny_lm(family, n_layers=4, seed=0)` returns an engine.models.LoadedModel (float32, CPU, eval).
"""

from __future__ import annotations

import os

import pytest
import torch

# Tiny models gain nothing from torch's thread pool, and on a 2-core machine shared with other
# work the pool's spinning threads made tests up to 8x slower (measured): one thread, for this
# process and for the CLI/app subprocesses the tests start.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2", "opt", "gpt_neox", "mamba")
VOCAB = 260  # 256 byte tokens + a few specials
SEQ_LEN = 16  # > the sliding windows below, so sliding attention matters


def family_config(family: str, n_layers: int):
    """A tiny config for `family`; sliding-window families get a window of 8 (< SEQ_LEN)."""
    from transformers import AutoConfig

    common = dict(vocab_size=VOCAB, initializer_range=0.2, tie_word_embeddings=False, bos_token_id=256, eos_token_id=256)
    attn = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
                max_position_embeddings=64)
    table = {
        "llama": dict(**attn, num_key_value_heads=2),
        "mistral": dict(**attn, num_key_value_heads=2, sliding_window=8),
        # max_window_layers = 1: layer 0 full attention, the others sliding (mixed layer_types).
        "qwen2": dict(**attn, num_key_value_heads=2, use_sliding_window=True, sliding_window=8, max_window_layers=1),
        "qwen3": dict(**attn, num_key_value_heads=2, head_dim=8, use_sliding_window=True, sliding_window=8,
                      max_window_layers=1),
        "gemma": dict(**attn, num_key_value_heads=2, head_dim=8),
        "phi3": dict(**attn, num_key_value_heads=2, pad_token_id=0),
        "gpt2": dict(n_embd=32, n_layer=n_layers, n_head=4, n_positions=64),
        "opt": dict(hidden_size=32, ffn_dim=64, num_hidden_layers=n_layers, num_attention_heads=4,
                    word_embed_proj_dim=32, max_position_embeddings=64, pad_token_id=1),
        "gpt_neox": dict(**attn),
        "mamba": dict(hidden_size=32, state_size=4, num_hidden_layers=n_layers, expand=2),
    }
    return AutoConfig.for_model(family, **common, **table[family])


def build_tiny_lm(family: str, n_layers: int = 4, seed: int = 0, tokenizer=None):
    from transformers import AutoModelForCausalLM

    from engine.models import wrap_model

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, n_layers))
    return wrap_model(model.float(), tokenizer, identity=f"tiny:{family}:{n_layers}:{seed}")


def byte_tokenizer():
    """A byte-level tokenizer (ids 0..255 = bytes, 256 = <eos>) with no downloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # GPT-2's byte -> printable character map (what ByteLevel pre-tokenisation emits), so id == byte value.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    vocab = {chr(b if b in printable else next(extra)): b for b in range(256)}
    vocab["<eos>"] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


WORDS = ["layer", "mask", "prune", "token", "shapley", "model", "the", "of", "a", "value"]


def save_tiny_llama(folder, n_layers: int = 4, seed: int = 0):
    """A tiny random Llama + byte tokenizer saved with save_pretrained (a `--model` folder)."""
    lm = build_tiny_lm("llama", n_layers=n_layers, seed=seed, tokenizer=byte_tokenizer())
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


def write_words(path, n: int, seed: int = 0):
    """A text file of n seeded random words from WORDS (calibration text for tiny models)."""
    import numpy as np

    path.write_text(" ".join(np.random.default_rng(seed).choice(WORDS, n)))
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="session")
def tiny_lm():
    """Factory: tiny_lm(family, n_layers=4, seed=0) -> LoadedModel (fresh model every call)."""
    return build_tiny_lm


@pytest.fixture(scope="session")
def tiny_windows():
    """Windows of 3 x SEQ_LEN random token ids (seeded), for evaluator tests."""
    from engine.data import Windows

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (3, SEQ_LEN), generator=g)  # (n, T)
    return Windows(input_ids=ids, data_hash="tiny", source="random", n_tokens=ids.numel())
