"""The low-rank path of LoRA-style adapters with input dropout: s B A dropout(x), lean on memory.

Dropout draws an independent mask for every adapter, so autograd run on `B(A(dropout(x)))` keeps one
dropped copy of x per adapter (for A's gradient) next to the mask: on a Llama block with q/k/v/o
adapters, four (tokens x d_in) activations that nothing else needs. `dropped_low_rank` keeps x itself
(the tensor the base projection reads; q, k and v share it, and o shares it with attention) and the
boolean mask, and rebuilds the dropped input in backward:

    forward:   h = c (m * x) A^T               (..., r)      m: keep mask, m_i ~ Bernoulli(1 - p)
               y = h B^T                       (..., d_out)  c = s / (1 - p)
    backward:  dB = g^T h,   dh = c g B,   dA = dh^T (m * x),   dx = m * (dh A)

with the scale applied to the rank-r tensors, never to a full-width one.

A and B may be any tensors (AdaLoRA passes diag(lambda) Q as A); their gradients come back in their
own dtype. Under autocast the products run in the autocast dtype, as `nn.Linear` calls would.
"""

from __future__ import annotations

import torch


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """A boolean mask, True with probability 1 - p (up to a resolution of 1/65536 in p).

    About 3x faster than `nn.Dropout`'s float draws on CPU: one 64-bit random draw yields four 16-bit
    uniforms.
    """
    count = shape.numel()
    bits = torch.randint(-(2**63), 2**63 - 1, ((count + 3) // 4,), dtype=torch.int64, device=device)
    uniform16 = bits.view(torch.int16)[:count].view(shape)  # uniform on [-32768, 32767]
    return uniform16 >= round(-32768 + p * 65536)


class _DroppedLowRank(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, p: float, scale: float,
                dtype: torch.dtype) -> torch.Tensor:
        mask = keep_mask(x.shape, p, x.device)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        ctx.scale = scale / (1.0 - p)  # c
        # The scale goes onto the rank-r activations, the smallest tensor on the path.
        h = (torch.where(mask, x, 0).to(dtype) @ a.t()) * ctx.scale  # c (m * x) A^T, (..., r)
        ctx.save_for_backward(x, mask, h, a, b)
        ctx.dtype, ctx.param_dtypes = dtype, (lora_a.dtype, lora_b.dtype)
        return h @ b.t()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, mask, h, a, b = ctx.saved_tensors
        g = grad_out.to(ctx.dtype).reshape(-1, grad_out.shape[-1])  # (N, d_out)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[2]:
            grad_b = (g.t() @ h.reshape(-1, h.shape[-1])).to(ctx.param_dtypes[1])  # c g^T h, h already scaled
        grad_h = (g @ b) * ctx.scale  # (N, r)
        if ctx.needs_input_grad[1]:
            dropped = torch.where(mask, x, 0).to(ctx.dtype).reshape(-1, x.shape[-1])
            grad_a = (grad_h.t() @ dropped).to(ctx.param_dtypes[0])
        if ctx.needs_input_grad[0]:
            grad_x = torch.where(mask, (grad_h @ a).view(x.shape), 0).to(x.dtype)
        return grad_x, grad_a, grad_b, None, None, None


def dropped_low_rank(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, p: float, scale: float
                     ) -> torch.Tensor:
    """s / (1 - p) * B A (m * x) for x (..., d_in), A (r, d_in), B (d_out, r), in the compute dtype.

    The compute dtype is the autocast dtype when autocast is on, else A's dtype (x is cast to it).
    """
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else lora_a.dtype
    with torch.autocast(device, enabled=False):
        return _DroppedLowRank.apply(x, lora_a, lora_b, p, scale, dtype)
