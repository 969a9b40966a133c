"""Where and in what precision to train.

`bf16` stores the frozen base weights in bfloat16 (half the memory, no per-step re-cast), keeps
adapters and optimizer states in fp32, and runs compute under bf16 autocast; the loss's log-softmax
stays fp32. `auto` picks bf16 where the hardware has fast bf16 matmuls (CUDA GPUs with bf16 support,
CPUs with AVX512-BF16 or AMX) and fp32 elsewhere, where emulated bf16 would be slower.
"""

from __future__ import annotations

import contextlib
from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True if /proc/cpuinfo lists avx512_bf16 or amx_bf16 (Linux); False where it cannot tell."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def resolve_precision(setting: str, device: torch.device) -> str:
    """'bf16' or 'fp32' for a config value of 'auto', 'bf16' or 'fp32'."""
    if setting != "auto":
        return setting
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def weight_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


def autocast(precision: str, device: torch.device):
    """bf16 autocast for 'bf16', a no-op context for 'fp32'."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
