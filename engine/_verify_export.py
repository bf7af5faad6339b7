"""Reload check for an exported model, run in a fresh process by path (imports torch + transformers only).

Usage: python _verify_export.py JOBS.json RESULTS.json [PARENT_PID]
With PARENT_PID the process dies with its parent (PR_SET_PDEATHSIG on Linux, else a watchdog
thread polling the parent's pid), so a killed export never leaves an orphan running.
JOBS.json is a list of {"model_dir": str (a folder, or a .gguf file), "windows": str (a torch.save'd LongTensor (n, T)),
"new_tokens": int, "dtype": "float32" | "bfloat16" | ..., "device": "cpu" | "cuda:0" | ...}. RESULTS.json receives one dict per job (see `check_export`); a job that
raises gets {"error": "..."} instead, so one broken export does not hide the others.

`perplexity` is also imported in-process by engine.export, so both sides measure the same way:
exp(mean next-token NLL over every predicted token of every window), use_cache=False.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback


def die_with_parent(parent_pid: int) -> None:
    """Exit as soon as `parent_pid` is gone: the kernel's parent-death signal, or a watchdog thread."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            PR_SET_PDEATHSIG = 1
            if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
                if os.getppid() != parent_pid:  # the parent died before the signal was armed
                    os._exit(1)
                return
        except (OSError, AttributeError):
            pass

    def watch():
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


if __name__ == "__main__" and len(sys.argv) > 3:  # armed before the slow imports (torch: seconds)
    die_with_parent(int(sys.argv[3]))

import torch  # noqa: E402

LAYER_INDEX_ATTRS = ("layer_idx", "layer_id", "layer_index")


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean NLL) of next-token prediction over all windows; float64 accumulation."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for start in range(0, input_ids.shape[0], batch_size):
        ids = input_ids[start : start + batch_size].to(device)  # (B, T)
        logits = model(input_ids=ids, use_cache=False).logits.double()  # (B, T, V)
        logp = torch.log_softmax(logits[:, :-1], dim=-1)  # (B, T-1, V)
        tok = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
        nll -= float(tok.sum())
        count += tok.numel()
    return float(torch.exp(torch.tensor(nll / count)))


@torch.no_grad()
def kv_cache_check(model, prompt: torch.Tensor, new_tokens: int) -> dict:
    """generate() with the KV cache, then compare its step logits with one cache-free forward pass.

    Returns generated token count and the max |difference| relative to the logits' scale.
    """
    eos = model.config.eos_token_id
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else (eos if isinstance(eos, int) else 0)
    out = model.generate(
        prompt,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        use_cache=True,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=pad,
    )
    seq = out.sequences  # (1, P + new)
    full = model(input_ids=seq, use_cache=False).logits.double()  # (1, P + new, V)
    p = prompt.shape[1]
    step = torch.stack([lg[0].double() for lg in out.logits])  # (new, V)
    ref = full[0, p - 1 : p - 1 + step.shape[0]]  # (new, V)
    rel = float((step - ref).abs().max() / ref.abs().max().clamp_min(1.0))
    return {"generated_tokens": int(seq.shape[1] - p), "kv_max_rel_diff": rel}


def layer_indices(model) -> list[int]:
    """Sorted distinct values of per-layer index attributes found anywhere in the model."""
    found = set()
    for mod in model.modules():
        for attr in LAYER_INDEX_ATTRS:
            v = mod.__dict__.get(attr)
            if isinstance(v, int) and not isinstance(v, bool):
                found.add(v)
    return sorted(found)


def check_export(model_dir: str, windows: str, new_tokens: int = 4, dtype: str = "float32", device: str = "cpu") -> dict:
    """Load `model_dir` with plain transformers (same dtype and device as the in-memory model,
    so both sides run the same kernels) and measure what engine.export compares."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    path, gguf = model_dir, {}
    if model_dir.endswith(".gguf"):  # one GGUF file: transformers' GGUF loader (model and tokenizer inside)
        path, gguf = os.path.dirname(model_dir), {"gguf_file": os.path.basename(model_dir)}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), **gguf).to(device).eval()
    tokenizer_ok, tokenizer_error = True, None
    try:
        AutoTokenizer.from_pretrained(path, **gguf)
    except Exception as e:  # reported, not fatal: the model itself may still be usable
        tokenizer_ok, tokenizer_error = False, f"{type(e).__name__}: {e}"
    ids = torch.load(windows, weights_only=True)  # (n, T)
    result = {
        "ppl": perplexity(model, ids),
        **kv_cache_check(model, ids[:1, : min(8, ids.shape[1])], new_tokens),
        "layer_indices": layer_indices(model),
        "n_layers_config": int(model.config.num_hidden_layers),
        "layer_types": list(getattr(model.config, "layer_types", None) or []),
        "tokenizer_ok": tokenizer_ok,
        "tokenizer_error": tokenizer_error,
        "architecture": type(model).__name__,
    }
    result["seconds"] = time.perf_counter() - t0
    return result


def main(jobs_path: str, results_path: str) -> None:
    with open(jobs_path) as fh:
        jobs = json.load(fh)
    results = []
    for job in jobs:
        try:
            results.append(
                check_export(job["model_dir"], job["windows"], job.get("new_tokens", 4),
                             job.get("dtype", "float32"), job.get("device", "cpu"))
            )  # fmt: skip
        except Exception as e:
            results.append({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
    with open(results_path, "w") as fh:
        json.dump(results, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
