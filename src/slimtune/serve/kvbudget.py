"""How many tokens the decode batch's KV cache may hold, and how many a batch can come to need.

The batch's cache holds, per attention layer, keys and values of shape (rows, kv_heads, width,
head_dim) where width is the longest live row (the others are left-padded to it, `kvbatch`): its size
is rows x width tokens, not the sum of the rows' lengths. So one long prompt makes every short row as
wide as itself. Admission bounds the worst case a batch can reach:

    need(rows) = len(rows) * max over rows r of (prompt_r + max_tokens_r)   <=   budget

No row grows past its prompt + max_tokens and the width never exceeds the longest row, so the cache
stays within the budget whatever the rows generate. A request that alone needs more than the budget
is refused (400); others wait in the queue until finished rows make room.

Bytes per cached token: layers x 2 (keys, values) x kv_heads x head_dim x bytes per element. Without
`--max-kv-tokens`, the budget is half the memory free on the model's device when the server starts.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

FREE_MEMORY_SHARE = 0.5  # of the memory free at start: the rest is for activations, adapters, the allocator


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of keys and values one token takes in the cache of a model with `config`, in `dtype`."""
    text = config.get_text_config(decoder=True)
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return text.num_hidden_layers * 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def free_memory_bytes(device: torch.device) -> int:
    """Memory free now on `device`: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def derive_kv_tokens(model: torch.nn.Module) -> int:
    """The default budget: FREE_MEMORY_SHARE of the free memory on the model's device, in cached tokens."""
    param = next(model.parameters())
    dtype = param.dtype if param.is_floating_point() else torch.get_default_dtype()
    per_token = kv_bytes_per_token(model.config, dtype)
    return max(1, int(free_memory_bytes(param.device) * FREE_MEMORY_SHARE) // per_token)


def kv_tokens_needed(lengths: Iterable[int]) -> int:
    """need(rows) of the module docstring, from each row's prompt + max_tokens."""
    lengths = list(lengths)
    return len(lengths) * max(lengths, default=0)
