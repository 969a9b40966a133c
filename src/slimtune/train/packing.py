"""Padding-free packing: several examples in one row, attention kept inside each example.

A packed micro-batch is one row of length T = sum of the example lengths (rounded up to
`train.pad_to_multiple_of` by a padding segment of its own, `pack_examples`), with position ids that
restart at 0 for every example (so rotary embeddings see each example as if it were alone) and the
example boundaries `cu_seq_lens` = [0, l_1, l_1 + l_2, ..., T]. Attention runs per example: causal
scaled-dot-product attention on each [start, end) slice, so no FLOP is spent across examples, unlike a
full (T x T) masked attention that throws most of its work away.

The attention function is registered with transformers under the name `slimtune_packed`. Without
`cu_seq_lens_q` in its keyword arguments (evaluation, generation) it is plain SDPA. The same keyword
names are what flash-attention's varlen path reads, so a CUDA model can use `flash_attention_2` instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.data.render import IGNORE_INDEX, Encoded
from slimtune.train.cpu_attention import fp32_attention

ATTENTION_NAME = "slimtune_packed"
# CPU, bf16 inputs: the attention maths in "fp32" (train/cpu_attention.py) or "bf16" (plain SDPA). Set for
# the run by `train.prepare.slimtune_attention` from train.attention_precision (measured per machine).
_cpu_maths = {"value": "fp32"}


def set_cpu_attention_maths(value: str) -> str:
    """Use `value` ('fp32' | 'bf16') for bf16 attention on CPU from now on; returns the previous value."""
    previous, _cpu_maths["value"] = _cpu_maths["value"], value
    return previous


def cpu_fp32_maths(query: torch.Tensor, dropout: float) -> bool:
    """Whether attention on these bf16 CPU inputs runs with fp32 maths (the run's choice; no dropout)."""
    return (query.device.type == "cpu" and query.dtype == torch.bfloat16 and _cpu_maths["value"] == "fp32"
            and dropout == 0.0)


def sdpa_blocks(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: Sequence[int],
                scaling: float | None, dropout: float) -> torch.Tensor:
    """Causal SDPA inside each slice [bounds[i], bounds[i+1]) of the rows (packed examples, S2-Attn
    groups); (batch, heads, T, head_dim)."""
    gqa = query.shape[1] != key.shape[1]
    return torch.cat([
        F.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
            dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa,
        )
        for start, end in zip(bounds[:-1], bounds[1:])
    ], dim=2)

# Keyword arguments that do not change what attention computes (the packed boundaries are handled here).
_PLAIN_KWARGS = {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "position_ids", "use_cache",
                 "is_causal", "cache_position", "output_attentions", "sliding_window"}


def pack_examples(examples: Sequence[Encoded], multiple_of: int = 1, pad_token_id: int = 0
                  ) -> dict[str, torch.Tensor | int]:
    """Concatenate examples into one row: input_ids, labels, position_ids of shape (1, T), plus
    cu_seq_lens_q/k (n + 1,) int32 boundaries and max_length_q/k.

    T is rounded up to a multiple of `multiple_of` (train.pad_to_multiple_of) by a tail of padding that
    is a segment of its own (labels -100, attention inside it only), as padded batches round their
    width: fewer distinct row lengths let the CPU allocator reuse freed blocks. Exact lengths, a new one
    almost every step, measured 1411-1446 MB peak RSS on the bundled model (96 examples, batch 4) against
    1159-1208 MB rounded to 8, 16 or 32, and a 2-4% slower epoch."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    bounds = [0]
    for example in examples:
        ids += example.input_ids
        # The first token of an example is never a target: the previous position belongs to another example.
        labels += [IGNORE_INDEX] + example.labels[1:]
        positions += range(len(example.input_ids))
        bounds.append(len(ids))
    if tail := -len(ids) % multiple_of:
        ids += [pad_token_id] * tail
        labels += [IGNORE_INDEX] * tail
        positions += range(tail)
        bounds.append(len(ids))
    cu = torch.tensor(bounds, dtype=torch.int32)
    longest = max(max(len(example.input_ids) for example in examples), tail)
    return {
        "input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([positions]), "attention_mask": None,
        "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest,
    }


def packed_attention(
    module: nn.Module,
    query: torch.Tensor,  # (1, heads, T, head_dim)
    key: torch.Tensor,  # (1, kv_heads, T, head_dim)
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each packed example; plain SDPA when the input is not packed."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    same_length = query.shape[2] == key.shape[2]
    # Anything else that changes the maths (a logit soft-cap, attention sinks, a position bias, ...)
    # goes to transformers' own SDPA function, which knows it.
    plain = all(value is None for name, value in kwargs.items() if name not in _PLAIN_KWARGS)
    if (cpu_fp32_maths(query, dropout) and same_length and plain
            and key.shape[-1] == value.shape[-1] and (bounds is None or attention_mask is None)):
        # fp32 maths with bf16 saved tensors: faster than bf16 on CPU, and lean (train/cpu_attention.py)
        mask = attention_mask
        if mask is not None and mask.shape[-1] != key.shape[2]:
            mask = mask[:, :, :, : key.shape[2]]  # sliced only when needed: the same object lets layers share one copy
        is_causal = mask is None and query.shape[2] > 1 and kwargs.get("is_causal", getattr(module, "is_causal", True))
        return fp32_attention(query, key, value, mask, bounds, scaling, bool(is_causal)), None
    if bounds is None or not same_length:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = sdpa_blocks(query, key, value, bounds.tolist(), scaling, dropout)
    return out.transpose(1, 2).contiguous(), None  # (1, T, heads, head_dim)


def _packed_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    # Packed rows carry no 2D mask: the boundaries travel as cu_seq_lens. Right-padded whole rows need
    # none either (`causal_covers_padding`). Otherwise defer to SDPA's mask.
    if attention_mask is None or causal_covers_padding(attention_mask, kwargs):
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def causal_covers_padding(padding: torch.Tensor, mask_kwargs: dict) -> bool:
    """Whether plain causal attention (no mask tensor, `is_causal`) computes what the causal + padding
    mask would, for every real token: true when each row's padding is at its end (how `pad_batch`
    pads training and evaluation batches) and the queries are the whole rows (no cache in front).

    A real token at position i then only sees keys j <= i, all real, exactly as with the mask; a padding
    query sees the real tokens and padding before it instead of what the mask allows, and its output is
    read by no real token and carries no loss (labels are -100 there), so neither the loss nor a gradient
    changes. What it gains: the attention kernels skip the blocks above the diagonal (a mask tensor makes
    them compute the whole T x T square) and read no mask. One layer's fp32 CPU attention forward +
    backward (9 heads of 64): 2.7 -> 2.5 ms at 4 x 112 tokens, 11.4 -> 8.1 ms at 2 x 1024.

    Anything else keeps the mask: a window, bidirectional or packed-sequence mask functions (transformers
    then passes `allow_is_causal_skip=False` or a function other than the causal one), left padding
    (generation), a cache (decoding), or a trace (a mask inside a compiled graph).
    """
    from transformers.masking_utils import causal_mask_function

    if not (mask_kwargs.get("allow_is_causal_skip", False) and mask_kwargs.get("local_size") is None
            and mask_kwargs.get("mask_function", causal_mask_function) is causal_mask_function
            and mask_kwargs.get("kv_offset", 0) == 0 and padding.dim() == 2):
        return False
    kv_length = mask_kwargs.get("kv_length")
    if "q_length" in mask_kwargs:  # transformers >= 5.2x: q_length and q_offset
        offset, q_length = mask_kwargs.get("q_offset", 0), mask_kwargs["q_length"]
    else:  # earlier 5.x: cache_position, the queries' positions
        positions = mask_kwargs.get("cache_position")
        if positions is None:
            return False
        offset, q_length = positions[:1], positions.shape[0]
    if torch.compiler.is_compiling() or isinstance(offset, torch.Tensor) and offset.numel() != 1:
        return False
    if int(offset) != 0 or q_length != kv_length or padding.shape[-1] != kv_length:
        return False
    # A row is right-padded when its mask never rises: 1 ... 1 0 ... 0.
    return bool((padding[:, 1:] <= padding[:, :-1]).all())


def own_attention_reason(config) -> str | None:
    """Why a model must keep its own attention function (its maths is more than scaled-dot-product
    attention, which neither SDPA nor the packed function computes), or None."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if getattr(text, "attn_logit_softcapping", None) is not None:
        return f"attention logit soft-capping (attn_logit_softcapping={text.attn_logit_softcapping})"
    return None


def use_packed_attention(model: nn.Module) -> bool:
    """Switch `model` to the packed attention function. Returns False if the model cannot use it (an
    architecture outside transformers' attention interface, or attention maths SDPA does not compute:
    `own_attention_reason`); the model then keeps its own attention and the caller pads instead."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if own_attention_reason(model.config) is not None:
        return False

    AttentionInterface.register(ATTENTION_NAME, packed_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _packed_mask)
    try:
        model.set_attn_implementation(ATTENTION_NAME)
    except (ValueError, AttributeError, NotImplementedError):
        return False
    return model.config._attn_implementation == ATTENTION_NAME
