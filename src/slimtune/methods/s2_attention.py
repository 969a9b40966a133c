"""S2-Attn: shifted sparse attention for long-context training (LongLoRA, Chen et al., 2023,
arXiv:2309.12307, sec. 3.2).

A training row of T tokens is cut into n groups of G tokens. The first H // 2 heads attend only within
their group; the other heads attend within groups shifted by G / 2 (the paper's "roll tokens by -G/2
before, the output back by +G/2 after"). Rotary positions are applied by the model before attention
is called, so every token keeps its absolute position. Attention costs n G^2 = T G instead of T^2.

Masks. Every group's mask is the model's real mask (causal, padding, packed examples, a sliding window)
read at the group's own token indices, so nothing is allowed that full attention would forbid. The
shifted groups add one rule: the last shifted group wraps around (it holds the row's last G/2 tokens and
its first G/2), and a token never sees a token on the other side of that wrap. A query row that sees
nothing (a padding token whose whole group is padding) attends to itself only: its output is never
read by a real token (real tokens never see padding keys), and it keeps softmax free of NaN.

Causal rows. When the mask is plain causal attention over whole rows (no padding, no packing, no
window: the usual long-context training row) and T is a multiple of G, every group's mask is causal
and the shifted last group is two causal halves: groups are then contiguous causal blocks of the
(rolled) row, boundaries [0, G, ..., T] plain and [0, G, ..., T - G, T - G/2, T] shifted, and run as
causal attention per block with no mask tensor at all (on CPU in bf16, with fp32 maths like packed
rows, train/cpu_attention.py). That is what makes S2-Attn cheaper than full attention in time and
memory; anything else goes through the masked path, which is exact for every mask.

Lengths. G = group_ratio * T rounded up to an even number (>= 2). When T is not a multiple of G the row
is padded inside attention to the next multiple (the padded keys are masked, their outputs dropped); G
is not changed, so the group size is what the setting says.

Hooking in. The function is registered with transformers' attention interface under `slimtune_s2`, and
its mask interface returns `RealMask`, the recipe of the model's mask (mask function + padding), instead
of a dense T x T tensor; each group's mask is computed from it once per forward and shared by all
layers. Only modules in training mode use S2-Attn: evaluation, generation and a decoding step (query
length 1, a cache) get ordinary attention with the dense mask, so the model after training is the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.errors import AdapterError

ATTENTION_NAME = "slimtune_s2"
# Model families whose attention is a plain softmax over (rotary) q . k, called through the interface.
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
# Keyword arguments that do not change what attention computes (the mask recipe carries windows and packing).
_PLAIN_KWARGS = {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "position_ids", "use_cache",
                 "is_causal", "cache_position", "output_attentions", "sliding_window"}


def group_layout(length: int, group_ratio: float) -> tuple[int, int]:
    """(G, padded length) for a row of `length` tokens: G = ceil(ratio * length) rounded up to even, the
    row padded to a multiple of G."""
    group = max(2, math.ceil(group_ratio * length))
    group += group % 2
    return group, math.ceil(length / group) * group


def shifted_order(padded: int, group: int) -> torch.Tensor:
    """Token order after rolling the row by -G/2: position i of the rolled row holds token order[i]."""
    return (torch.arange(padded) + group // 2) % padded


@dataclass(eq=False)
class RealMask:
    """The model's attention mask as its recipe: `mask_function(batch, head, q, kv)` (causal, packing,
    sliding window) and the 2D padding mask. `allowed` reads it at any index tensors; `dense` builds the
    ordinary (batch, 1, T, T) boolean mask for the non-S2 path."""

    mask_function: Callable
    padding: torch.Tensor | None  # (batch, T) bool, True = real token
    batch_size: int
    length: int
    device: torch.device
    _groups: dict = field(default_factory=dict, repr=False)
    _plain: bool | None = field(default=None, repr=False)

    def allowed(self, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        """Boolean (batch, *broadcast(q_idx, kv_idx)): may query token q see key token kv? Indices at or
        past the row's length (padding added inside attention) are never allowed."""
        inside = (q_idx < self.length) & (kv_idx < self.length)
        q_safe, kv_safe = q_idx.clamp(max=self.length - 1), kv_idx.clamp(max=self.length - 1)
        extra = q_idx.dim()
        batch = torch.arange(self.batch_size, device=self.device).view(-1, *([1] * extra))
        head = torch.zeros((1,) * (extra + 1), dtype=torch.long, device=self.device)
        result = self.mask_function(batch, head, q_safe[None], kv_safe[None]) & inside[None]
        if self.padding is not None:
            result = result & self.padding[batch, kv_safe[None]]
        return result.expand(self.batch_size, *result.shape[1:])

    def plain_causal(self) -> bool:
        """Is this exactly causal attention over whole rows (no padding, packing or window)?"""
        from transformers.masking_utils import causal_mask_function

        if self._plain is None:  # once per forward, not per layer: `.all()` reads the whole padding mask
            self._plain = self.mask_function is causal_mask_function and (
                self.padding is None or bool(self.padding.all()))
        return self._plain

    def dense(self) -> torch.Tensor:
        index = torch.arange(self.length, device=self.device)
        return self.allowed(index[:, None], index[None, :])[:, None]  # (batch, 1, T, T)

    def group_masks(self, group: int, padded: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(plain, shifted) masks, each (batch, n, G, G) bool: row i, column j of group g says whether the
        group's i-th token may see its j-th. Computed once per forward, shared by every layer."""
        key = (group, padded)
        if key not in self._groups:
            with torch.no_grad():
                plain = torch.arange(padded, device=self.device).view(-1, group)
                shifted = shifted_order(padded, group).to(self.device).view(-1, group)
                masks = []
                for index, shift in ((plain, False), (shifted, True)):
                    allowed = self.allowed(index[:, :, None], index[:, None, :])  # (batch, n, G, G)
                    if shift:  # the last shifted group wraps around: its two sides never see each other
                        wrapped = index < group // 2
                        allowed = allowed & (wrapped[:, :, None] == wrapped[:, None, :])
                    blind = ~allowed.any(dim=-1, keepdim=True)  # rows that see nothing attend to themselves
                    allowed = allowed | (blind & torch.eye(group, dtype=torch.bool, device=self.device))
                    masks.append(allowed)
                self._groups[key] = (masks[0], masks[1])
        return self._groups[key]


def _grouped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                       order: torch.Tensor | None, group: int, scaling: float | None, dropout: float) -> torch.Tensor:
    """Attention within groups. query (B, h, P, D), key/value (B, h_kv, P, D) with h a multiple of h_kv,
    mask (B, n, G, G); `order` permutes the tokens first (the shift) and is undone on the output.
    Returns (B, h, P, D)."""
    batch, heads, padded, dim = query.shape
    groups = padded // group
    if order is not None:
        query, key, value = (t.index_select(2, order) for t in (query, key, value))

    def split(t: torch.Tensor) -> torch.Tensor:  # (B, h, P, D) -> (B n, h, G, D)
        return t.reshape(batch, t.shape[1], groups, group, t.shape[-1]).transpose(1, 2).reshape(
            batch * groups, t.shape[1], group, t.shape[-1])

    out = F.scaled_dot_product_attention(split(query), split(key), split(value),
                                         attn_mask=mask.reshape(batch * groups, 1, group, group),
                                         dropout_p=dropout, scale=scaling, enable_gqa=key.shape[1] != heads)
    out = out.reshape(batch, groups, heads, group, dim).transpose(1, 2).reshape(batch, heads, padded, dim)
    if order is not None:
        out = out.index_select(2, torch.argsort(order))
    return out


def _causal_blocks(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: list[int],
                   order: torch.Tensor | None, scaling: float | None, dropout: float) -> torch.Tensor:
    """Causal attention inside each block [bounds[i], bounds[i+1]) of the row (rolled by `order` first,
    rolled back after): the groups of a plain causal row with no mask tensor. Shapes as
    `_grouped_attention`'s; returns (B, h, P, D)."""
    # Imported here: slimtune.train imports the config, which imports this module.
    from slimtune.train.cpu_attention import fp32_attention
    from slimtune.train.packing import cpu_fp32_maths, sdpa_blocks

    if order is not None:
        query, key, value = (t.index_select(2, order) for t in (query, key, value))
    if cpu_fp32_maths(query, dropout):
        out = fp32_attention(query, key, value, None, bounds, scaling, True).transpose(1, 2)
    else:
        out = sdpa_blocks(query, key, value, bounds, scaling, dropout)
    if order is not None:
        out = out.index_select(2, torch.argsort(order))
    return out


def _kv_for_heads(tensor: torch.Tensor, first: int, last: int, heads: int) -> torch.Tensor:
    """The key/value heads that query heads [first, last) read under grouped-query attention: a slice when
    the range covers whole KV groups, else one KV head per query head."""
    repeat = heads // tensor.shape[1]
    if first % repeat == 0 and last % repeat == 0:
        return tensor[:, first // repeat: last // repeat]
    index = torch.arange(first, last, device=tensor.device) // repeat
    return tensor.index_select(1, index)


def shifted_sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: RealMask,
                             group_ratio: float, scaling: float | None = None, dropout: float = 0.0,
                             shift: bool = True) -> torch.Tensor:
    """S2-Attn. query (B, H, T, D) (rotary already applied), key/value (B, H_kv, T, D); returns
    (B, T, H, D). Heads [0, H // 2) attend within groups, heads [H // 2, H) within groups shifted by G/2
    (all heads unshifted when `shift` is False)."""
    batch, heads, length, _ = query.shape
    group, padded = group_layout(length, group_ratio)
    if padded != length:
        pad = (0, 0, 0, padded - length)
        query, key, value = F.pad(query, pad), F.pad(key, pad), F.pad(value, pad)
    split = heads // 2 if shift else heads
    order = shifted_order(padded, group).to(query.device)
    parts = []
    if padded == length and mask.plain_causal():  # contiguous causal blocks, no mask tensor (module docstring)
        blocks = list(range(0, padded + 1, group))
        shifted_blocks = blocks[:-1] + [padded - group // 2, padded]  # the wrapped group: two causal halves
        for first, last, bounds, part_order in ((0, split, blocks, None), (split, heads, shifted_blocks, order)):
            if first < last:
                parts.append(_causal_blocks(query[:, first:last], _kv_for_heads(key, first, last, heads),
                                            _kv_for_heads(value, first, last, heads), bounds, part_order,
                                            scaling, dropout))
    else:
        plain_mask, shifted_mask = mask.group_masks(group, padded)
        for first, last, part_mask, part_order in ((0, split, plain_mask, None), (split, heads, shifted_mask, order)):
            if first < last:
                parts.append(_grouped_attention(query[:, first:last], _kv_for_heads(key, first, last, heads),
                                                _kv_for_heads(value, first, last, heads), part_mask, part_order,
                                                group, scaling, dropout))
    out = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    return out[:, :, :length].transpose(1, 2).contiguous()


def s2_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs
                         ) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature. S2-Attn for a module in training mode on a full row;
    otherwise SDPA with the ordinary dense mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    ratio = getattr(module, "s2_group_ratio", None)
    if not (module.training and ratio is not None and isinstance(attention_mask, RealMask)
            and query.shape[2] == key.shape[2] == attention_mask.length):
        if isinstance(attention_mask, RealMask):
            attention_mask = attention_mask.dense()
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    changing = sorted(name for name, item in kwargs.items() if name not in _PLAIN_KWARGS and item is not None)
    if changing:
        raise AdapterError(f"S2-Attn cannot run attention that uses {', '.join(changing)} "
                           f"({type(module).__name__}); LongLoRA supports {', '.join(SUPPORTED_FAMILIES)}")
    return shifted_sparse_attention(query, key, value, attention_mask, ratio, scaling, dropout), None


def s2_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0, mask_function=None,
            attention_mask: torch.Tensor | None = None, device="cpu", **kwargs):
    """transformers' mask-interface signature: a `RealMask` for a full row (no cache), else SDPA's mask."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    mask_function = mask_function or causal_mask_function
    full_row = q_length == kv_length and isinstance(q_offset, int) and isinstance(kv_offset, int) \
        and q_offset == 0 and kv_offset == 0
    if not full_row:
        return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                         kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                         device=device, **kwargs)
    padding = None if attention_mask is None else attention_mask[:, :kv_length].to(torch.bool)
    return RealMask(mask_function, padding, batch_size, q_length, torch.device(device))


def family_problem(config) -> str | None:
    """Why S2-Attn cannot train this model (one line), or None when it can."""
    family = getattr(config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        return (f"LongLoRA's S2-Attn supports the model families {', '.join(SUPPORTED_FAMILIES)}; this model is "
                f"'{family}' ({', '.join(getattr(config, 'architectures', None) or ['unknown architecture'])})")
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return (f"S2-Attn does not support attention logit soft-capping (attn_logit_softcapping="
                f"{config.attn_logit_softcapping} in this {family} model)")
    if getattr(config, "use_bidirectional_attention", False):
        return f"S2-Attn needs causal attention; this {family} model uses bidirectional attention"
    return None


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules: those with a q_proj and a layer index (every supported family)."""
    return [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "layer_idx")]


@contextmanager
def s2_attention(model: nn.Module, group_ratio: float) -> Iterator[None]:
    """Inside the block, attention modules in training mode run S2-Attn with groups of ratio * T tokens;
    the model's previous attention implementation comes back when the block ends, however it ends."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    problem = family_problem(model.config)
    if problem:
        raise AdapterError(problem)
    AttentionInterface.register(ATTENTION_NAME, s2_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, s2_mask)
    previous = model.config._attn_implementation
    modules = attention_modules(model)
    model.set_attn_implementation(ATTENTION_NAME)
    for module in modules:
        module.s2_group_ratio = group_ratio
    try:
        yield
    finally:
        for module in modules:
            del module.s2_group_ratio
        model.set_attn_implementation(previous)
