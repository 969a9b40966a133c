"""Causal attention for bf16 training on CPU: fp32 maths, bf16 memory.

On CPU the bf16 flash-attention backward runs at less than half the speed of fp32 (measured at
4 x 112 tokens, 9 heads of 64: forward + backward 7.7 ms in bf16, 3.3 ms in fp32), so the maths runs
in fp32. Upcasting q, k, v before a plain `scaled_dot_product_attention` call would make autograd keep
the fp32 copies of q, k, v and of the output until backward: 2.7 MB per layer at 436 tokens on
SmolLM2-135M, a third of everything a LoRA step saves. This function keeps bf16 q, k, v and the bf16
output it returns (the next projection's input, so no new memory) and upcasts them again in backward:

    forward:  O_e, L_e = flash(q_e, k_e, v_e)           per example e (a slice of the packed row, or
                                                          the whole padded batch with its mask)
    backward: dq_e, dk_e, dv_e = flash_backward(dO_e, q_e, k_e, v_e, O_e, L_e)

with everything upcast to fp32 and L (the row log-sum-exp, (heads, T) per example) saved in fp32.
O comes back from its bf16 copy, so D = rowsum(dO * O) carries bf16 rounding (relative 2^-9);
`tests/train/test_cpu_attention.py` bounds the difference to the all-fp32 gradients.

The two aten operators are PyTorch's CPU flash-attention kernels, the ones
`scaled_dot_product_attention` itself dispatches to on CPU; they take grouped-query k, v as they are.
"""

from __future__ import annotations

import weakref

import torch

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def _slices(bounds: list[int] | None, length: int) -> list[slice]:
    if bounds is None:
        return [slice(0, length)]
    return [slice(start, end) for start, end in zip(bounds[:-1], bounds[1:])]


def _fp32(t: torch.Tensor) -> torch.Tensor:
    # One pass to a contiguous fp32 copy: the kernels would otherwise copy strided inputs a second time.
    return t.to(torch.float32, memory_format=torch.contiguous_format)


def _attention_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                       bounds: list[int] | None, scale: float | None, is_causal: bool
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (batch, T, heads, head_dim) in query's dtype and the fp32 row log-sum-exp (batch, heads, T)."""
    batch, heads, length, head_dim = query.shape
    # (batch, T, heads, head_dim): the layout the output projection reads, filled slice by slice
    out = torch.empty((batch, length, heads, head_dim), dtype=query.dtype, device=query.device)
    lse = torch.empty((batch, heads, length), dtype=torch.float32, device=query.device)
    for part in _slices(bounds, length):
        o, row_lse = _flash(_fp32(query[:, :, part]), _fp32(key[:, :, part]), _fp32(value[:, :, part]),
                            0.0, is_causal, attn_mask=mask, scale=scale)
        out[:, part].copy_(o.transpose(1, 2))
        lse[:, :, part].copy_(row_lse)
    return out, lse


def _attention_backward(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        out: torch.Tensor, lse: torch.Tensor, mask: torch.Tensor | None, bounds: list[int] | None,
                        scale: float | None, is_causal: bool) -> list[torch.Tensor]:
    """dq, dk, dv in the dtypes of q, k, v, from the flash backward run in fp32 per slice."""
    grads = [torch.empty_like(t) for t in (query, key, value)]
    for part in _slices(bounds, query.shape[2]):
        dq, dk, dv = _flash_backward(
            _fp32(grad_out[:, part].transpose(1, 2)), _fp32(query[:, :, part]), _fp32(key[:, :, part]),
            _fp32(value[:, :, part]), _fp32(out[:, part].transpose(1, 2)), lse[:, :, part].contiguous(), 0.0,
            is_causal, attn_mask=mask, scale=scale)
        for grad, piece in zip(grads, (dq, dk, dv)):
            grad[:, :, part].copy_(piece)
    return grads


class _Fp32Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                bounds: list[int] | None, scale: float | None, is_causal: bool) -> torch.Tensor:
        out, lse = _attention_forward(query, key, value, mask, bounds, scale, is_causal)
        ctx.save_for_backward(query, key, value, mask, out, lse)
        ctx.bounds, ctx.scale, ctx.is_causal = bounds, scale, is_causal
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        query, key, value, mask, out, lse = ctx.saved_tensors
        grads = _attention_backward(grad_out, query, key, value, out, lse, mask, ctx.bounds, ctx.scale, ctx.is_causal)
        return *grads, None, None, None, None


# The same attention as one opaque operator for `torch.compile` (train.compile): the compiler sees its
# inputs and outputs only (the Python slicing, `tolist` and the kernels stay out of the graph), and its
# backward is registered like any operator's. Masks arrive as they are (boolean or float) and are
# converted inside, per call: the conversion cache below cannot live in a compiled graph.
@torch.library.custom_op("slimtune::fp32_attention", mutates_args=())
def _fp32_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                       bounds: torch.Tensor | None, scale: float | None, is_causal: bool
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    return _attention_forward(query, key, value, None if mask is None else _convert(mask),
                              None if bounds is None else bounds.tolist(), scale, is_causal)


@_fp32_attention_op.register_fake
def _(query, key, value, mask, bounds, scale, is_causal):
    batch, heads, length, head_dim = query.shape
    return (query.new_empty((batch, length, heads, head_dim)),
            query.new_empty((batch, heads, length), dtype=torch.float32))


@torch.library.custom_op("slimtune::fp32_attention_backward", mutates_args=())
def _fp32_attention_backward_op(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                out: torch.Tensor, lse: torch.Tensor, mask: torch.Tensor | None,
                                bounds: torch.Tensor | None, scale: float | None, is_causal: bool
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _attention_backward(grad_out, query, key, value, out, lse, None if mask is None else _convert(mask),
                                     None if bounds is None else bounds.tolist(), scale, is_causal)
    return dq, dk, dv


@_fp32_attention_backward_op.register_fake
def _(grad_out, query, key, value, out, lse, mask, bounds, scale, is_causal):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _op_setup(ctx, inputs, output) -> None:
    query, key, value, mask, bounds, scale, is_causal = inputs
    ctx.save_for_backward(query, key, value, output[0], output[1], mask, bounds)
    ctx.scale, ctx.is_causal = scale, is_causal


def _op_backward(ctx, grad_out: torch.Tensor, grad_lse: torch.Tensor):
    query, key, value, out, lse, mask, bounds = ctx.saved_tensors
    dq, dk, dv = _fp32_attention_backward_op(grad_out, query, key, value, out, lse, mask, bounds, ctx.scale,
                                             ctx.is_causal)
    return dq, dk, dv, None, None, None, None


_fp32_attention_op.register_autograd(_op_backward, setup_context=_op_setup)


def _convert(mask: torch.Tensor) -> torch.Tensor:
    """A boolean (True = attend) or float mask as the additive fp32 mask the kernels take."""
    if mask.dtype == torch.float32:
        return mask
    if mask.is_floating_point():
        return mask.float()
    return torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, float("-inf"))


# The last mask converted: (weak reference to the mask passed in, its version, weak reference to the
# converted mask). Every layer of a forward pass receives the same mask object, so it is converted once
# and all layers' saved tensors share one copy rather than one (batch, 1, T, T) fp32 tensor per layer.
# Weak references: the copy lives exactly as long as some layer's backward still needs it.
_last_conversion: tuple[weakref.ref, int, weakref.ref] | None = None


def _additive_fp32(mask: torch.Tensor) -> torch.Tensor:
    """`mask` as the additive fp32 mask the kernels take: a float mask upcast, a boolean one (True =
    attend) turned into 0 / -inf."""
    global _last_conversion
    if mask.dtype == torch.float32:
        return mask
    if _last_conversion is not None:
        source, version, converted = _last_conversion
        if source() is mask and mask._version == version and (cached := converted()) is not None:
            return cached
    converted_mask = _convert(mask)
    _last_conversion = (weakref.ref(mask), mask._version, weakref.ref(converted_mask))
    return converted_mask


def fp32_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None,
                   bounds: list[int] | torch.Tensor | None = None, scale: float | None = None, is_causal: bool = True
                   ) -> torch.Tensor:
    """Attention with fp32 maths and `query`'s dtype in memory; output (batch, T, heads, head_dim).

    query (batch, heads, T, head_dim), key/value (batch, kv_heads, T, head_dim) with heads a multiple
    of kv_heads; `mask` an additive float mask broadcastable to (batch, heads, T, T), or None;
    `bounds` the packed example boundaries [0, l_1, ..., T] (batch 1; a list or an int tensor),
    attention kept inside each.
    """
    if torch.compiler.is_compiling():  # inside a compiled decoder layer (train.compile): the opaque operator
        if bounds is not None and not isinstance(bounds, torch.Tensor):
            bounds = torch.tensor(bounds, dtype=torch.int32)
        return _fp32_attention_op(query, key, value, mask, bounds, scale, is_causal)[0]
    if isinstance(bounds, torch.Tensor):
        bounds = bounds.tolist()
    if mask is not None:
        mask = _additive_fp32(mask)
    with torch.autocast(query.device.type, enabled=False):
        return _Fp32Attention.apply(query, key, value, mask, bounds, scale, is_causal)
