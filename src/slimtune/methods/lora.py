"""LoRA: low-rank adaptation of frozen linear layers (Hu et al., 2021, arXiv:2106.09685).

For a frozen weight W (d_out, d_in) the adapted layer computes

    y = W x + b + s * B A dropout(x),      s = alpha / r,

with A (r, d_in) Kaiming-uniform initialised and B (d_out, r) zero, so training starts from the base
model exactly (eq. 3 of the paper). Merging folds the update into the weight, W' = W + s B A, after
which the layer costs what the base layer costs; unmerging subtracts it again.

Names follow loralib/PEFT (`lora_A`, `lora_B`, `r`, `scaling`) so state-dict keys line up with PEFT's
files. Merge, unmerge and disabling are explicit calls: `.eval()` and `.to()` never change weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from slimtune.errors import AdapterError
from slimtune.methods.base import AttachedMethod
from slimtune.methods.targets import linear_layers, resolve_targets


def drop_elements(x: torch.Tensor, p: float) -> torch.Tensor:
    """Zero each element of `x` with probability p (no rescaling; the caller divides by 1 - p).

    Same distribution as `nn.Dropout` up to a resolution of 1/65536 in p, about 3x faster on CPU:
    one 64-bit random draw yields four 16-bit uniforms instead of one float per element.
    """
    count = x.numel()
    bits = torch.randint(-(2**63), 2**63 - 1, ((count + 3) // 4,), dtype=torch.int64, device=x.device)
    uniform16 = bits.view(torch.int16)[:count].view(x.shape)  # uniform on [-32768, 32767]
    keep = uniform16 >= round(-32768 + p * 65536)
    return torch.where(keep, x, 0)


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update `s * B A`."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if r < 1 or alpha <= 0 or not 0.0 <= dropout < 1.0:
            raise AdapterError(f"LoRA needs r >= 1, alpha > 0 and 0 <= dropout < 1; got r={r}, alpha={alpha}, dropout={dropout}")
        if r > min(base_layer.in_features, base_layer.out_features):
            raise AdapterError(
                f"LoRA rank r={r} exceeds the layer size ({base_layer.out_features} x {base_layer.in_features}): "
                f"use r <= {min(base_layer.in_features, base_layer.out_features)}"
            )
        self.base_layer = base_layer
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / r
        factory = {"device": base_layer.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, **factory)  # weight (r, d_in)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, **factory)  # weight (d_out, r)
        self.dropout = dropout
        self.merged = False
        self.disabled = False
        self.reset_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> "LoRALinear":
        """Wrap `linear` (its weight is shared, not copied) and freeze it."""
        linear.weight.requires_grad_(False)
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
        return cls(linear, r, alpha, dropout)

    def reset_parameters(self) -> None:
        # Same init as nn.Linear for A; B = 0 makes the initial update exactly zero.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, for code that inspects `layer.weight` (e.g. dtype or device checks)."""
        return self.base_layer.weight

    def delta_weight(self) -> torch.Tensor:
        """s * B A, shape (d_out, d_in), in fp32."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged or self.disabled:
            return out
        scale = self.scaling
        if self.training and self.dropout > 0:
            # Inverted dropout with the 1/(1-p) factor moved onto the rank-r path, where it is cheap.
            x = drop_elements(x, self.dropout)
            scale = scale / (1.0 - self.dropout)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.weight.dtype)  # e.g. a bf16 base with fp32 adapters, no autocast
        update = self.lora_B(self.lora_A(x))  # (..., d_out)
        return out + (update * scale).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> bool:
        """W <- W + s B A. Returns False (and changes nothing) if already merged."""
        if self.merged:
            return False
        delta = self.delta_weight()
        if not torch.isfinite(delta).all():
            raise AdapterError("cannot merge: the LoRA update contains NaN or inf values; the adapter is broken")
        weight = self.base_layer.weight
        weight.copy_((weight.float() + delta).to(weight.dtype))
        self.merged = True
        return True

    @torch.no_grad()
    def unmerge(self) -> bool:
        """W <- W - s B A. Returns False if not merged."""
        if not self.merged:
            return False
        weight = self.base_layer.weight
        weight.copy_((weight.float() - self.delta_weight()).to(weight.dtype))
        self.merged = False
        return True

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """All LoRA layers by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def attach_lora(
    model: nn.Module,
    targets: str | Sequence[str] = "all-linear",
    r: int = 16,
    alpha: float = 32.0,
    dropout: float = 0.0,
) -> list[str]:
    """Freeze every parameter of `model` and wrap the targeted linear layers in `LoRALinear`.

    Returns the adapted module paths. Raises `TargetError` for targets that match nothing and
    `AdapterError` if the model already carries LoRA layers.
    """
    if lora_layers(model):
        raise AdapterError("the model already has LoRA layers; load a fresh base model to attach a new adapter")
    paths = resolve_targets(model, targets)
    layers = linear_layers(model)
    for param in model.parameters():
        param.requires_grad_(False)
    for path in paths:
        _set_submodule(model, path, LoRALinear.from_linear(layers[path], r, alpha, dropout))
    return paths


def merge_lora(model: nn.Module) -> int:
    """Merge every LoRA layer into its base weight; returns how many were merged (0 if all were)."""
    return sum(layer.merge() for layer in lora_layers(model).values())


def unmerge_lora(model: nn.Module) -> int:
    """Undo `merge_lora`; returns how many layers were unmerged."""
    return sum(layer.unmerge() for layer in lora_layers(model).values())


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the adapters and put the plain base layers back: a model with no LoRA modules left."""
    for path, layer in lora_layers(model).items():
        layer.merge()
        _set_submodule(model, path, layer.base_layer)
    return model


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model: inside the block every unmerged LoRA layer skips its update."""
    layers = list(lora_layers(model).values())
    if any(layer.merged for layer in layers):
        raise AdapterError("cannot disable merged adapters: call unmerge_lora(model) first")
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer, state in zip(layers, previous):
            layer.disabled = state


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors keyed `<module path>.lora_A.weight` / `.lora_B.weight`."""
    state = {}
    for path, layer in lora_layers(model).items():
        state[f"{path}.lora_A.weight"] = layer.lora_A.weight.detach()
        state[f"{path}.lora_B.weight"] = layer.lora_B.weight.detach()
    return state


def merge_state_dict(
    base: Mapping[str, torch.Tensor], adapter: Mapping[str, torch.Tensor], scaling: float
) -> dict[str, torch.Tensor]:
    """Pure function: W' = W + scaling * B A for every adapted weight; `base` is left untouched.

    `adapter` holds `<path>.lora_A.weight` and `<path>.lora_B.weight`; `base` holds `<path>.weight`.
    """
    merged = dict(base)
    for key in adapter:
        if not key.endswith(".lora_A.weight"):
            continue
        path = key[: -len(".lora_A.weight")]
        b_key, w_key = f"{path}.lora_B.weight", f"{path}.weight"
        if b_key not in adapter or w_key not in base:
            raise AdapterError(f"adapter key '{key}' has no matching '{b_key}' or base weight '{w_key}'")
        weight = base[w_key]
        delta = (adapter[b_key].float() @ adapter[key].float()) * scaling
        if delta.shape != weight.shape:
            raise AdapterError(f"adapter for '{path}' has shape {tuple(delta.shape)}, base weight {tuple(weight.shape)}")
        merged[w_key] = (weight.float() + delta).to(weight.dtype)
    return merged


class LoRAMethod(AttachedMethod):
    """LoRA attached to a model; trains only the `lora_A` / `lora_B` matrices."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = []
        for layer in lora_layers(self.model).values():
            params += [layer.lora_A.weight, layer.lora_B.weight]
        return params
