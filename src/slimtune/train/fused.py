"""Fused RMSNorm and SwiGLU for training: fewer kernels, fewer saved activations.

`fuse_modules(model)` swaps, explicitly and in place, two hot spots of Llama-style decoders:

- RMSNorm, y = w * (x / sqrt(mean(x^2) + eps)) with the normalisation in fp32. The stock module runs
  six elementwise kernels and keeps several fp32 (tokens x hidden) tensors for backward; ours saves
  x (in its own dtype) and rstd (tokens,) and computes
      dx = rstd * (g - xhat * mean(g * xhat)),   g = dy * w,   xhat = x * rstd,
      dw = sum over tokens of dy * xhat.
- The SwiGLU MLP product silu(a) * b. Ours saves a and b only (the stock module also keeps silu(a))
  and recomputes silu(a) in backward:
      da = dy * b * s * (1 + a (1 - s)),   db = dy * silu(a),   s = sigmoid(a).

Only modules known to compute exactly these formulas are swapped (see `_RMSNORM_CLASSES` and the
MLP check), so outputs are unchanged up to rounding; `tests/train/test_fused.py` compares both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# RMSNorm classes whose forward is w * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype).
_RMSNORM_CLASSES = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm",
                    "OlmoRMSNorm", "GraniteRMSNorm", "Olmo2RMSNorm"}
# MLP classes whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x)).
_SWIGLU_CLASSES = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "OlmoMLP", "Olmo2MLP", "GraniteMLP"}


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        # Every fp32 (tokens x hidden) temporary counts toward the step's peak (the first backward is
        # often it), so products are formed in buffers this function owns (`xhat`, `g`, the rounded
        # copy), in the same operation order as the formula: the same values as the plain expression.
        xhat = x.float() * rstd
        grad_w = None
        if ctx.needs_input_grad[1]:
            rounded = xhat.to(x.dtype).float()  # xhat itself when x is fp32: not to be overwritten
            rows = rounded.mul_(grad_out) if x.dtype != torch.float32 else rounded * grad_out
            grad_w = rows.reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
            del rounded, rows
        g = grad_out.float() * weight.float()
        mean = (g * xhat).mean(-1, keepdim=True)
        grad_x = g.sub_(xhat.mul_(mean)).mul_(rstd).to(x.dtype)  # rstd (g - xhat mean)
        return grad_x, grad_w, None


class FusedRMSNorm(nn.Module):
    """Drop-in replacement for a Llama-style RMSNorm that shares its weight."""

    def __init__(self, weight: nn.Parameter, eps: float) -> None:
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, self.weight, self.variance_epsilon)


class _SiluMulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return F.silu(a) * b

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        a, b = ctx.saved_tensors
        # The very kernels autograd runs through F.silu(a) * b, so the gradients are bit-identical to
        # the stock module's, in the inputs' dtype; each kernel computes in fp32 internally. Spelling the
        # formula out in fp32 tensors instead made a dozen (tokens x intermediate) fp32 temporaries per
        # layer and ran ~14x slower on CPU.
        # The product is formed in silu(a)'s own buffer: one (tokens x intermediate) temporary fewer at
        # what is often the step's peak.
        grad_a = torch.ops.aten.silu_backward(grad_out * b, a)
        grad_b = F.silu(a).mul_(grad_out)
        return grad_a, grad_b


def silu_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b with a backward that keeps only a and b."""
    return _SiluMulFunction.apply(a, b)


class FusedSwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), sharing the original (possibly adapted) projections."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def _is_swiglu(module: nn.Module) -> bool:
    """A Llama-style MLP, down(act(gate(x)) * up(x)), whose activation is SiLU."""
    act = getattr(module, "act_fn", None)
    silu = isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"
    return (silu and type(module).__name__ in _SWIGLU_CLASSES
            and all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj")))


def fuse_modules(model: nn.Module) -> dict[str, int]:
    """Swap RMSNorm and SwiGLU MLP modules for the fused versions; returns how many of each."""
    counts = {"rmsnorm": 0, "swiglu": 0}
    for path, module in list(model.named_modules()):
        parent_path, _, child = path.rpartition(".")
        if not child:
            continue
        parent = model.get_submodule(parent_path) if parent_path else model
        if type(module).__name__ in _RMSNORM_CLASSES and hasattr(module, "variance_epsilon"):
            setattr(parent, child, FusedRMSNorm(module.weight, module.variance_epsilon))
            counts["rmsnorm"] += 1
        elif _is_swiglu(module):
            setattr(parent, child, FusedSwiGLU(module.gate_proj, module.up_proj, module.down_proj))
            counts["swiglu"] += 1
    return counts
