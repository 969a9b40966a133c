"""The low-rank path of LoRA-style adapters with input dropout: s B A dropout(x), lean on memory.

Dropout draws an independent mask for every adapter, so autograd run on `B(A(dropout(x)))` keeps one
dropped copy of x per adapter (for A's gradient) next to the mask: on a Llama block with q/k/v/o
adapters, four (tokens x d_in) activations that nothing else needs. `dropped_low_rank` keeps x itself
(the tensor the base projection reads; q, k and v share it, and o shares it with attention) and a seed,
and draws the same mask again in backward to rebuild the dropped input:

    forward:   h = c (m * x) A^T               (..., r)      m: keep mask, m_i ~ Bernoulli(1 - p)
               y = h B^T                       (..., d_out)  c = s / (1 - p)
    backward:  dB = g^T h,   dh = c g B,   dA = dh^T (m * x),   dx = m * (dh A)

with the scale applied to the rank-r tensors, never to a full-width one. A small mask (at most
`KEEP_MASK_ELEMENTS`, a byte each) is kept for backward instead: redrawing one costs ~10x as much as
applying it, ~30 ms of a 0.6 s LoRA step of the bundled model at 4 x 112 tokens, where the 120 kept masks
take 31 MB. Larger ones are redrawn, so memory stays O(x) per layer at long context.

A and B may be any tensors (AdaLoRA passes diag(lambda) Q as A); their gradients come back in their
own dtype. Under autocast the products run in the autocast dtype, as `nn.Linear` calls would.
"""

from __future__ import annotations

import numpy as np
import torch


def draw_mask_seed() -> int:
    """A seed for one mask, from torch's default (CPU) generator: `torch.manual_seed` makes the masks
    reproducible, checkpoint recomputation restores that generator, and nothing waits on a GPU."""
    return int(torch.randint(0, 2**62, (1,)))


def random_bits(count: int, device: torch.device, seed: int) -> torch.Tensor:
    """`count` random int64 words, a function of `seed` alone.

    On CPU from numpy's SFC64 generator: torch's CPU generator (a Mersenne twister) fills a tensor on
    one thread at ~3.5 ns a word, SFC64 at ~1.5 ns; ~240 masks a step made torch's draws a tenth of a
    LoRA step on the bundled model. Elsewhere torch's generator on the device (no copy to the device).
    """
    if device.type == "cpu":
        return torch.from_numpy(np.random.SFC64(seed).random_raw(count).view(np.int64))
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return torch.randint(-(2**63), 2**63 - 1, (count,), dtype=torch.int64, device=device, generator=generator)


def keep_mask(shape: torch.Size, p: float, device: torch.device, seed: int) -> torch.Tensor:
    """A dropout mask that keeps each element with probability 1 - p (p resolved to 1/32768); the same
    `seed` gives the same mask.

    int16, -1 (all bits set) where kept and 0 where dropped, so that `masked` applies it as one
    bitwise AND. On CPU that is ~8x faster than `torch.where` with a boolean mask, and the mask itself
    comes from integer shifts and adds rather than a comparison (which writes bools, ~1.5x slower).
    One 64-bit random draw yields four 16-bit uniforms.
    """
    count = shape.numel()
    bits = _uniform16(count, device, seed).view(shape)
    # u uniform on [-16384, 16383] (15 bits). Keep iff u >= t (`_keep_threshold`): then
    # (t - 1) - u is negative, and it stays inside int16, so an arithmetic shift by 15 turns its sign
    # into -1 (keep) or 0 (drop).
    # In place: `bits` is this call's own fresh buffer, and a mask redrawn in backward is as large as
    # the adapter's input, so each temporary of that size counts toward the step's peak.
    return bits.bitwise_right_shift_(1).neg_().add_(_keep_threshold(p) - 1).bitwise_right_shift_(15)


def keep_mask_bool(shape: torch.Size, p: float, device: torch.device, seed: int) -> torch.Tensor:
    """`keep_mask(shape, p, device, seed) != 0` as a bool tensor (half its bytes, for a mask that is kept
    rather than redrawn), from one comparison: bits >> 1 >= t exactly when bits >= 2 t."""
    bits = _uniform16(shape.numel(), device, seed).view(shape)
    return bits >= 2 * _keep_threshold(p)


def _keep_threshold(p: float) -> int:
    """t such that a 15-bit uniform u on [-16384, 16383] is kept iff u >= t (probability 1 - p)."""
    return -16384 + round(p * 32768)


def _uniform16(count: int, device: torch.device, seed: int) -> torch.Tensor:
    """`count` uniform int16 values from `seed`: four from each 64-bit word."""
    return random_bits((count + 3) // 4, device, seed).view(torch.int16)[:count]


_SAME_SIZE_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def masked(t: torch.Tensor, mask: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """m * t for a `keep_mask` mask: t's bits ANDed with the mask's (dropped elements become +0.0);
    `in_place` overwrites t (a temporary of the caller's) instead of allocating the result."""
    bits = t.view(_SAME_SIZE_INT[t.element_size()])
    # An int16 mask widens with its sign, so -1 stays all ones.
    return (bits.bitwise_and_(mask) if in_place else bits & mask).view(t.dtype)


# Masks of up to this many elements (~900 tokens of the bundled model's 576-wide inputs; 512 KB as int8)
# are kept from forward for backward rather than redrawn from their seed.
KEEP_MASK_ELEMENTS = 2**19


def keeps_mask(elements: int) -> bool:
    """Whether a mask of this many elements is kept for backward (else redrawn from its seed)."""
    return elements <= KEEP_MASK_ELEMENTS


class _DroppedLowRank(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, p: float, scale: float,
                dtype: torch.dtype) -> torch.Tensor:
        ctx.seed, ctx.p = draw_mask_seed(), p
        mask = keep_mask(x.shape, p, x.device, ctx.seed)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        ctx.scale = scale / (1.0 - p)  # c
        # The scale goes onto the rank-r activations, the smallest tensor on the path.
        h = (masked(x, mask).to(dtype) @ a.t()) * ctx.scale  # c (m * x) A^T, (..., r)
        # int8 -1 / 0: `masked` widens it with its sign, as it does the int16 mask for wider dtypes.
        kept = mask.to(torch.int8) if keeps_mask(mask.numel()) else None
        ctx.save_for_backward(x, h, a, b, kept)
        ctx.dtype, ctx.param_dtypes = dtype, (lora_a.dtype, lora_b.dtype)
        return h @ b.t()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, h, a, b, kept = ctx.saved_tensors
        mask = kept if kept is not None else keep_mask(x.shape, ctx.p, x.device, ctx.seed)
        g = grad_out.to(ctx.dtype).reshape(-1, grad_out.shape[-1])  # (N, d_out)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[2]:
            grad_b = (g.t() @ h.reshape(-1, h.shape[-1])).to(ctx.param_dtypes[1])  # c g^T h, h already scaled
        grad_h = (g @ b) * ctx.scale  # (N, r)
        if ctx.needs_input_grad[1]:
            dropped = masked(x, mask).to(ctx.dtype).reshape(-1, x.shape[-1])
            grad_a = (grad_h.t() @ dropped).to(ctx.param_dtypes[0])
            del dropped  # as large as x: gone before grad_x's temporaries of that size
        if ctx.needs_input_grad[0]:
            grad_x = masked((grad_h @ a).view(x.shape).to(x.dtype), mask, in_place=True)
        return grad_x, grad_a, grad_b, None, None, None


def dropped_low_rank(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, p: float, scale: float
                     ) -> torch.Tensor:
    """s / (1 - p) * B A (m * x) for x (..., d_in), A (r, d_in), B (d_out, r), in the compute dtype.

    The compute dtype is the autocast dtype when autocast is on, else A's dtype (x is cast to it).
    """
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else lora_a.dtype
    with torch.autocast(device, enabled=False):
        if torch.compiler.is_compiling():
            # Inside a compiled decoder layer (train.compile): operations the compiler traces and fuses
            # (the mask applied, the cast and the scale); the seed-and-redraw function above would split
            # the graph. On CPU the mask comes from an operator opaque to the compiler (below): `F.dropout`
            # draws it inside the compiled kernel, where inductor's CPU code runs a counter-based
            # generator per element, ~7 ms a layer on the bundled model, more than the layer's matmuls.
            # `_MaskedDown` keeps x and that mask (bool, a byte per element) for backward, not the masked
            # copy of x (2 more bytes per element and adapter, which the compiler kept on its own). On
            # a GPU inductor's own generator is left to draw it (not measured here: no GPU).
            if x.device.type == "cpu":
                seed = torch.randint(0, 2**62, (), dtype=torch.int64, device="cpu")
                h = _MaskedDown.apply(x, _keep_mask_op(x, p, seed), lora_a.to(dtype), scale / (1.0 - p))
            else:  # F.dropout scales by 1 / (1 - p) itself
                h = (torch.nn.functional.dropout(x, p, training=True).to(dtype) @ lora_a.to(dtype).t()) * scale
            return h @ lora_b.to(dtype).t()
        return _DroppedLowRank.apply(x, lora_a, lora_b, p, scale, dtype)


class _MaskedDown(torch.autograd.Function):
    """c (m * x) A^T for a bool mask m, saving x and m (not the masked copy): in backward the masked
    input is formed again for dA. Traced into compiled graphs as it is."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor, a: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(x, mask, a)
        ctx.scale = scale
        return ((x * mask).to(a.dtype) @ a.t()) * scale

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        x, mask, a = ctx.saved_tensors
        grad_h = grad_h * ctx.scale
        # Spelt unlike the forward's product, so that the compiler does not merge the two and keep the copy.
        dropped = torch.where(mask, x, 0).to(a.dtype)
        grad_a = grad_h.reshape(-1, grad_h.shape[-1]).t() @ dropped.reshape(-1, x.shape[-1])
        grad_x = ((grad_h @ a) * mask).to(x.dtype)
        return grad_x, None, grad_a, None


# The seed is an input drawn in the graph, so the operator is a pure function of its arguments: the
# compiler gives every call its own draw (q, k and v's adapters read the same x), and activation
# checkpointing's recomputation replays the draw. (Tagged as a random operator that drew its own seed,
# the compiled training graph ran every call from one saved generator state: q, k and v got one mask.)
@torch.library.custom_op("slimtune::keep_mask", mutates_args=())
def _keep_mask_op(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """`keep_mask_bool` for x's shape (True: kept); `seed` a CPU int64 scalar."""
    return keep_mask_bool(x.shape, p, x.device, int(seed))


@_keep_mask_op.register_fake
def _(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=torch.bool, device=x.device)
