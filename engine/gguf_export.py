"""Write the pruned model as one GGUF file (llama architecture) and verify it in a fresh process.

Contract of `export_gguf(lm, removed, out, quant="f32", ...)`:
- Architectures: `SUPPORTED_MODEL_TYPES` (config.model_type "llama": Llama, SmolLM, TinyLlama...,
  rope_type "default"); anything else raises ExportError saying to export a folder instead.
- Written with gguf-py's `GGUFWriter` (llama.cpp's own writer library): tensor names from
  `gguf.get_tensor_name_map(MODEL_ARCH.LLAMA, k)`; q/k weights permuted the way llama.cpp's
  convert_hf_to_gguf.py does (transformers' GGUF loader undoes it); an explicit `output.weight`
  for tied embeddings; the tokenizer as gpt2-style BPE (tokens, token types, merges, special
  ids, chat template). Every metadata value comes from the PRUNED config (`export.pruned_view`),
  so `llama.block_count` is the kept count and any per-layer value has one entry per kept layer
  (llama.cpp's `--prune-layers` leaves such arrays at the original length).
- `quant`: f32 | f16 | q8_0 | q4_1 (gguf-py's numpy quantizers). 1-D tensors (norms) stay F32;
  a 2-D tensor whose rows are not a multiple of the 32-value block falls back to F16 (q8_0 /
  q4_1), listed in the manifest's `fallback_tensors`.
- Atomic: written to `.<name>.partial-<pid>-<hex>.gguf` beside `out`, read back in a fresh
  process with transformers' GGUF loader only (engine/_verify_export.py), then the manifest
  `<out>.manifest.json` is written and the file renamed to `out` (last). A failed check keeps
  the file as `.<name>.failed-...gguf` for inspection and raises ExportCheckFailed.
- Check: perplexity on the windows equals the in-memory pruned model's within `QUANT_RTOL[quant]`
  (1e-4 for f32: the same model; wider bounds for the rounded types catch a broken file, and the
  measured difference is reported), KV-cache generation equals a cache-free pass, k layers.
- `out` must end in .gguf; an existing file is replaced only with `overwrite` and only when its
  manifest says this tool wrote it.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from engine.config import GGUF_QUANTS
from engine.errors import ExportCheckFailed, ExportError, from_exception
from engine.export import _kept_from_removed, judge, package_versions, pruned_view, verify_exports
from engine import _verify_export

SUPPORTED_MODEL_TYPES = ("llama",)
QUANTS = GGUF_QUANTS  # declared with the --quant option (config.ExportSpec)
# Reload tolerance on perplexity, relative to the in-memory pruned model. f32 is the same model;
# the rest are rounded on purpose, so the bound only catches a broken file (measured deltas in README).
QUANT_RTOL = {"f32": 1e-4, "f16": 5e-3, "q8_0": 5e-2, "q4_1": 0.5}
MANIFEST_SUFFIX = ".manifest.json"
MANIFEST_FORMAT = "layerprune-gguf-manifest/1"
BLOCK = 32  # values per block of Q8_0 / Q4_1


def manifest_path(out: Path) -> Path:
    return out.with_name(out.name + MANIFEST_SUFFIX)


def check_gguf_out(out, overwrite: bool) -> None:
    """Raise ExportError unless `out` may receive a GGUF export; changes nothing on disk."""
    out = Path(out)
    if out.suffix != ".gguf":
        raise ExportError(f"--format gguf writes one file: give --out a path ending in .gguf (got {out}).")
    if out.is_dir():
        raise ExportError(f"{out} is a folder; give --out a file path ending in .gguf.")
    if not out.exists():
        return
    if not overwrite:
        raise ExportError(f"{out} exists; choose a new file or pass --overwrite to replace a previous export.")
    try:
        ours = json.loads(manifest_path(out).read_text()).get("format") == MANIFEST_FORMAT
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise ExportError(f"{out} exists and has no {manifest_path(out).name} from this tool, so it is not a previous "
                          "export; overwrite only replaces previous exports. Choose another file.")


def _quant_types():
    from gguf import GGMLQuantizationType as Q, LlamaFileType as F

    return {"f32": (Q.F32, F.ALL_F32), "f16": (Q.F16, F.MOSTLY_F16), "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0),
            "q4_1": (Q.Q4_1, F.MOSTLY_Q4_1)}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py LlamaModel.permute): rotary halves interleaved per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
    if kind not in (None, "default"):
        raise ExportError(f"GGUF export writes plain RoPE only; this model uses rope_type {kind!r}. Export a folder "
                          "(--format folder) and convert it with llama.cpp's convert_hf_to_gguf.py.")
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(config, "rope_theta", 10000.0))


def _check_supported(model) -> None:
    mt = getattr(model.config, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ExportError(
            f"GGUF export supports the llama architecture ({', '.join(SUPPORTED_MODEL_TYPES)}) only; this model is "
            f"{type(model).__name__} (model_type {mt!r}). Export a folder instead (--format folder) and convert it "
            "with llama.cpp's convert_hf_to_gguf.py."
        )


def _vocab(tokenizer, vocab_size: int):
    """(tokens, token types, merges) of a BPE tokenizer, one token per embedding row."""
    from gguf import TokenType

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ExportError(f"GGUF export writes BPE (gpt2-style) tokenizers only; this tokenizer is {model.get('type')}.")
    tokens: list[str | None] = [None] * vocab_size
    types = [int(TokenType.NORMAL)] * vocab_size
    for text, i in model["vocab"].items():
        if i < vocab_size:
            tokens[i] = text
    for added in spec.get("added_tokens", []):
        i = added["id"]
        if i >= vocab_size:
            raise ExportError(f"token {added['content']!r} has id {i} but the model has {vocab_size} embedding rows.")
        tokens[i] = added["content"]
        types[i] = int(TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED)
    for i, t in enumerate(tokens):
        if t is None:  # an embedding row no token uses
            tokens[i], types[i] = f"[PAD{i}]", int(TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def _add_tokenizer(w, tokenizer, vocab_size: int, pre: str) -> None:
    tokens, types, merges = _vocab(tokenizer, vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges:
        w.add_token_merges(merges)
    else:  # transformers' reader then rebuilds merges from scores (none for a vocabulary of single bytes)
        w.add_token_scores([0.0] * len(tokens))
    for attr, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                      ("unk_token_id", w.add_unk_token_id), ("pad_token_id", w.add_pad_token_id)):
        i = getattr(tokenizer, attr, None)
        if isinstance(i, int):
            add(i)
    w.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if getattr(tokenizer, "chat_template", None):
        w.add_chat_template(tokenizer.chat_template)


def write_gguf(model, tokenizer, path: Path, quant: str, kept: tuple[int, ...], L: int, name: str,
               tokenizer_pre: str = "gpt2") -> dict:
    """Write `model` (already the pruned view) to `path`; returns {tensors, fallback_tensors, tensor_types}."""
    import gguf

    qtype, ftype = _quant_types()[quant]
    c = model.config
    n_head, n_kv = c.num_attention_heads, c.num_key_value_heads or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_head
    k = c.num_hidden_layers
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, k)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(int(c.max_position_embeddings))
    w.add_embedding_length(int(c.hidden_size))
    w.add_block_count(int(k))
    w.add_feed_forward_length(int(c.intermediate_size))
    w.add_head_count(int(n_head))
    w.add_head_count_kv(int(n_kv))
    if head_dim * n_head != c.hidden_size:
        w.add_key_length(int(head_dim))
        w.add_value_length(int(head_dim))
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    w.add_rope_freq_base(_rope_theta(c))
    w.add_rope_dimension_count(int(head_dim))
    w.add_vocab_size(int(c.vocab_size))
    w.add_file_type(int(ftype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_array("layerprune.kept_layers", [int(i) for i in kept])  # original indices of blk.0..k-1
    w.add_uint32("layerprune.n_layers_original", int(L))
    if tokenizer is not None:
        _add_tokenizer(w, tokenizer, int(c.vocab_size), tokenizer_pre)

    state = {n: t.detach().to("cpu", torch.float32).numpy() for n, t in model.state_dict().items()}
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    fallback, types = [], {}
    for hf_name, data in state.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        gg_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gg_name is None:
            raise ExportError(f"no GGUF name for tensor {hf_name}; GGUF export supports plain Llama checkpoints.")
        if ".self_attn.q_proj." in hf_name:
            data = _permute(data, n_head)
        elif ".self_attn.k_proj." in hf_name:
            data = _permute(data, n_kv)
        data = np.ascontiguousarray(data)
        want = qtype if data.ndim >= 2 else gguf.GGMLQuantizationType.F32  # norms and biases stay F32
        if want in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_1) and data.shape[-1] % BLOCK:
            fallback.append(gg_name)
            want = gguf.GGMLQuantizationType.F16
        if want == gguf.GGMLQuantizationType.F32:
            w.add_tensor(gg_name, data.astype(np.float32))
        elif want == gguf.GGMLQuantizationType.F16:
            w.add_tensor(gg_name, data.astype(np.float16))
        else:
            w.add_tensor(gg_name, gguf.quants.quantize(data, want), raw_dtype=want)
        types[gg_name] = want.name
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"tensors": len(types), "fallback_tensors": fallback,
            "tensor_types": {t: sum(1 for v in types.values() if v == t) for t in sorted(set(types.values()))}}


def _sweep(out: Path) -> None:
    """Remove partial files that dead exports to `out` left beside it (same host)."""
    for p in out.parent.glob(f".{out.name}.partial-*-*.gguf"):
        m = re.search(r"\.partial-(\d+)-[0-9a-f]{8}\.gguf$", p.name)
        if not m:
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            p.unlink(missing_ok=True)
        except PermissionError:
            pass


def export_gguf(lm, removed: Iterable[int], out, quant: str = "f32", manifest_extra: dict | None = None,
                overwrite: bool = False, verify_windows: torch.Tensor | None = None,
                expected_ppl: float | None = None, tokenizer_pre: str = "gpt2") -> dict:
    """Export `lm` without `removed` as the GGUF file `out` (see the module docstring); returns the manifest."""
    if quant not in QUANTS:
        raise ExportError(f"unknown GGUF quant {quant!r}; choose from {', '.join(QUANTS)}.")
    if verify_windows is None:
        raise ExportError("the GGUF export is verified on token windows; pass verify_windows.")
    out = Path(out)
    check_gguf_out(out, overwrite)
    model, adapter = lm.model, lm.adapter
    _check_supported(model)
    L = len(adapter.layers(model))
    kept, rem = _kept_from_removed(removed, L)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _sweep(out)
    except OSError as e:
        raise from_exception(e, out.parent, "preparing the GGUF export") or e
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}.gguf")
    keep = False
    try:
        was_training = model.training
        model.eval()
        try:
            with pruned_view(model, adapter, kept) as (updates, unhandled, _):
                name = f"{getattr(lm, 'identity', 'model')} without layers {list(rem)}"
                written = write_gguf(model, lm.tokenizer, tmp, quant, kept, L, name, tokenizer_pre)
                ppl_in_memory = _verify_export.perplexity(model, verify_windows)
        finally:
            model.train(was_training)
        param = next(model.parameters())
        # Read back in the model's dtype on its device: the same kernels as the in-memory perplexity.
        raw = verify_exports([(tmp, verify_windows)], dtype=param.dtype, device=param.device, work_dir=out.parent)[0]
        exp = expected_ppl if quant == "f32" else None  # the masked perplexity: the same model only at f32
        result = judge(raw, ppl_in_memory, len(kept), exp, QUANT_RTOL[quant])
        if not result.ok:
            keep = True
            failed = tmp.with_name(tmp.name.replace(".partial-", ".failed-"))
            os.rename(tmp, failed)
            raise ExportCheckFailed(f"the GGUF export for {out} failed its reload check: " + "; ".join(result.problems)
                                    + f". Nothing was written to {out}; the unverified file is kept at {failed}.")
        from engine.fetch import sha256_file

        manifest = {
            **(manifest_extra or {}),
            "format": MANIFEST_FORMAT,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "file": out.name,
            "size_bytes": tmp.stat().st_size,
            "sha256": sha256_file(tmp),
            "gguf_architecture": "llama",
            "quant": quant,
            "model_identity": getattr(lm, "identity", None),
            "n_layers_original": L,
            "n_layers": len(kept),
            "kept_layers": list(kept),
            "removed_layers": list(rem),
            "config_changes": {f: {"before": b, "after": a} for f, (b, a) in updates.items()},
            "unhandled_per_layer_fields": unhandled,
            **written,
            "reload_rtol": QUANT_RTOL[quant],
            "verification": asdict(result),
            "versions": {**package_versions(), "gguf": _gguf_version()},
        }
        mpath = manifest_path(out)
        mtmp = mpath.with_name(f".{mpath.name}.partial-{os.getpid()}")
        mtmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        os.replace(mtmp, mpath)
        os.replace(tmp, out)  # last: the file appears only verified, with its manifest beside it
        return manifest
    except ExportError:
        raise
    except Exception as e:
        mapped = from_exception(e, out, "writing the GGUF export")
        if mapped is not None:
            raise mapped from e
        raise
    finally:
        if not keep:
            tmp.unlink(missing_ok=True)


def _gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")
