"""Where a model's pieces compute and how much fits there (torch only, no model logic): the device of a
module (accelerate's device_map hooks or its parameters), tensors moved once per device, the free memory of
a device, and how many prefix states one batched layer call may hold (engine.evaluate's batched walk)."""

from __future__ import annotations

import os

import torch
from torch import nn


def module_device(module: nn.Module, default: torch.device) -> torch.device:
    """Where `module` computes: accelerate's execution device (device_map), else its first real parameter's."""
    dev = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if dev is not None:
        return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return default


def to_device(obj, device: torch.device, memo: dict):
    """`obj` with every tensor inside (tuples, lists, dicts) on `device`; each tensor is moved once per device
    (memo keyed by (id, device): the recorded arguments stay alive, so ids are not reused)."""
    if isinstance(obj, torch.Tensor):
        key = (id(obj), device)
        if key not in memo:
            memo[key] = obj if obj.device == device else obj.to(device)
        return memo[key]
    if isinstance(obj, tuple):
        return tuple(to_device(x, device, memo) for x in obj)
    if isinstance(obj, list):
        return [to_device(x, device, memo) for x in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device, memo) for k, v in obj.items()}
    return obj


def free_memory(device: torch.device) -> int:
    """Bytes free for activations on `device`: CUDA's free memory, or MemAvailable on the host."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def config_int(config, names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def state_bytes(config, n_windows: int, seq_len: int, dtype: torch.dtype) -> int:
    """Memory one prefix state costs in a batched layer call, from the model's shape.

    The state itself (n, T, d) plus the layer's temporaries on it: residual, norm, attention
    projections and output (~4 d), MLP gate / up / activation (3 ffn), and the attention
    scores (heads x T x T, float32, eager attention; fused kernels need less)."""
    d = config_int(config, ("hidden_size", "n_embd", "d_model"), 1024)
    ffn = config_int(config, ("intermediate_size", "n_inner", "ffn_dim"), 4 * d)
    heads = config_int(config, ("num_attention_heads", "n_head"), 1)
    elem = torch.empty((), dtype=dtype).element_size()
    tokens = n_windows * seq_len
    return tokens * (5 * d + 3 * ffn) * elem + n_windows * heads * seq_len * seq_len * 4


MAX_BATCH_STATES = 64  # more states per call gain little (GEMMs are already large) and lose sharing at group edges


def max_batch_states(config, n_windows: int, seq_len: int, dtype: torch.dtype, free_bytes: int,
                     fraction: float = 0.5, cap: int = MAX_BATCH_STATES) -> int:
    """How many prefix states one batched layer call (and one group of the batched walk) may hold:
    `fraction` of the free memory over `state_bytes`, between 1 and `cap`."""
    per = max(1, state_bytes(config, n_windows, seq_len, dtype))
    return int(max(1, min(cap, (fraction * free_bytes) // per)))
