"""LoRA: low-rank adaptation of frozen linear layers (Hu et al., 2021, arXiv:2106.09685).

For a frozen weight W (d_out, d_in) the adapted layer computes

    y = W x + b + s * B A dropout(x),      s = alpha / r,

with A (r, d_in) Kaiming-uniform initialised and B (d_out, r) zero, so training starts from the base
model exactly (eq. 3 of the paper). Merging folds the update into the weight, W' = W + s B A, after
which the layer costs what the base layer costs; unmerging subtracts it again.

rsLoRA (Kalajdzievski, 2023, arXiv:2312.03732) only changes the scale to s = alpha / sqrt(r), which keeps
the update's magnitude stable as r grows. DoRA (Liu et al., 2024, arXiv:2402.09353) is `DoRALinear`
below. Per-layer ranks and alphas follow PEFT's `rank_pattern` / `alpha_pattern` (`pattern_value`).

Names follow loralib/PEFT (`lora_A`, `lora_B`, `r`, `scaling`) so state-dict keys line up with PEFT's
files. Merge, unmerge and disabling are explicit calls: `.eval()` and `.to()` never change weights.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field, field_validator
from torch import nn

from slimtune.errors import AdapterError
from slimtune.methods.base import AttachedMethod, Method, load_base
from slimtune.methods.lowrank import dropped_low_rank
from slimtune.methods.patterns import ModulePattern
from slimtune.methods.targets import linear_layers, resolve_targets, short_names
from slimtune.section import Section

if TYPE_CHECKING:
    from pathlib import Path

    from rich.console import Console

    from slimtune.config import Config

# PEFT's file names: the adapter's config and its weights (written last: it marks a finished run).
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


class LoraSettings(Section):
    """LoRA (Hu et al., 2021): y = W x + (alpha / r) B A x with A (r, d_in), B (d_out, r)."""

    r: int = Field(16, gt=0, description="Rank of the update B A.")
    alpha: float = Field(32.0, gt=0, description="Scale numerator: the update is multiplied by alpha / r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter's input x.")
    targets: str | list[str] = Field(
        "all-linear",
        description="Modules to adapt: 'all-linear' (every nn.Linear but the LM head), a list of names "
        "(a module matches if its path equals or ends with '.<name>'), or one regex matched against the "
        "full module path.",
    )
    rslora: bool = Field(False, description="rsLoRA: scale the update by alpha / sqrt(r) instead of alpha / r.")
    use_dora: bool = Field(False, description="DoRA: also learn a per-output magnitude m; W' = m (W + s B A) / "
                           "||W + s B A||. Same as method: dora.")
    rank_pattern: dict[str, int] = Field(
        default_factory=dict, description="Per-module rank: {regex: r}; a key matches a module path that ends "
        "with it after a '.' (PEFT's rank_pattern), e.g. {v_proj: 8}.")
    alpha_pattern: dict[str, float] = Field(
        default_factory=dict, description="Per-module alpha, matched like rank_pattern (PEFT's alpha_pattern).")

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _patterns_valid(cls, value: dict[str, float]) -> dict[str, float]:
        for key, number in value.items():
            try:
                re.compile(key)
            except re.error as exc:
                raise ValueError(f"key '{key}' is not a valid regex ({exc})") from None
            if number <= 0:
                raise ValueError(f"value for '{key}' must be > 0, got {number}")
        return value


class AdapterLayer(nn.Module):
    """A frozen base layer plus a trainable update; the common part of LoRA, DoRA and AdaLoRA layers.

    Subclasses define `update(x, out)` (what the adapter adds to the base output) and `delta_weight()`
    (the same update as a (d_out, d_in) matrix). Merging adds `delta_weight()` to W, unmerging
    subtracts it; both are explicit calls, never side effects of `forward`, `.eval()` or `.to()`.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.merged = False
        self.disabled = False

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged or self.disabled:
            return out
        return out + self.update(x, out)

    def update(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _require_dense_base(self) -> None:
        if not isinstance(self.base_layer, nn.Linear):
            raise AdapterError(
                f"cannot merge into a {type(self.base_layer).__name__} base layer (a 4-bit weight cannot hold "
                "W + s B A): call slimtune.quant.dequantize_model(model) first, as `slimtune merge` does"
            )

    @torch.no_grad()
    def merge(self) -> bool:
        """W <- W + delta_weight(). Returns False (and changes nothing) if already merged."""
        if self.merged:
            return False
        self._require_dense_base()
        delta = self.delta_weight()
        if not torch.isfinite(delta).all():
            raise AdapterError("cannot merge: the adapter's update contains NaN or inf values; the adapter is broken")
        weight = self.base_layer.weight
        weight.copy_((weight.float() + delta).to(weight.dtype))
        self.merged = True
        return True

    @torch.no_grad()
    def unmerge(self) -> bool:
        """W <- W - delta_weight(). Returns False if not merged."""
        if not self.merged:
            return False
        weight = self.base_layer.weight
        weight.copy_((weight.float() - self.delta_weight()).to(weight.dtype))
        self.merged = False
        return True


class LoRALinear(AdapterLayer):
    """A frozen `nn.Linear` plus a trainable low-rank update `s * B A`."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False) -> None:
        super().__init__(base_layer)
        if r < 1 or alpha <= 0 or not 0.0 <= dropout < 1.0:
            raise AdapterError(f"LoRA needs r >= 1, alpha > 0 and 0 <= dropout < 1; got r={r}, alpha={alpha}, dropout={dropout}")
        if r > min(base_layer.in_features, base_layer.out_features):
            raise AdapterError(
                f"LoRA rank r={r} exceeds the layer size ({base_layer.out_features} x {base_layer.in_features}): "
                f"use r <= {min(base_layer.in_features, base_layer.out_features)}"
            )
        self.r = r
        self.alpha = alpha
        self.rslora = rslora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        factory = {"device": base_layer.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, **factory)  # weight (r, d_in)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, **factory)  # weight (d_out, r)
        self.dropout = dropout
        self.reset_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False
                    ) -> "LoRALinear":
        """Wrap `linear` (its weight is shared, not copied) and freeze it."""
        freeze_layer(linear)
        return cls(linear, r, alpha, dropout, rslora)

    def reset_parameters(self) -> None:
        # Same init as nn.Linear for A; B = 0 makes the initial update exactly zero.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """s * B A, shape (d_out, d_in), in fp32."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def update(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """What the adapter adds to the base output `out` = W x + b: s B A x, in `out`'s dtype."""
        if self.training and self.dropout > 0:
            # Inverted dropout with the 1/(1-p) factor moved onto the rank-r path, where it is cheap.
            update = dropped_low_rank(x, self.lora_A.weight, self.lora_B.weight, self.dropout, self.scaling)
            return update.to(out.dtype)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.weight.dtype)  # e.g. a bf16 base with fp32 adapters, no autocast
        return (self.lora_B(self.lora_A(x)) * self.scaling).to(out.dtype)  # (..., d_out)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


def freeze_layer(layer: nn.Module) -> None:
    """Stop gradients to a layer's own weight and bias (the base of an adapter)."""
    for param in layer.parameters():
        param.requires_grad_(False)


class DoRALinear(LoRALinear):
    """DoRA: weight-decomposed LoRA (Liu et al., 2024, eq. 5 and sec. 4.3).

        W' = m * (W + s B A) / ||W + s B A||,     m (d_out,) trainable, initialised to ||W||,

    where ||.|| is the L2 norm of each output row of the (d_out, d_in) weight: the paper's column norm of
    W^T, and PEFT's convention (`lora_magnitude_vector`, one entry per output feature). The norm is
    computed without autograd and treated as a constant (sec. 4.3), which leaves the gradient through
    B A the same as LoRA's and keeps the d_out x d_in product out of the backward graph. The forward reuses
    the base output instead of materialising W':

        y = (m / ||W + s B A||) * (W x + s B A x) + b.

    With dropout during training, only the low-rank path sees the dropped input (W x stays exact);
    PEFT instead feeds the dropped input to both paths. Without dropout, and in eval, the two agree.
    """

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False) -> None:
        super().__init__(base_layer, r, alpha, dropout, rslora)
        self._base_cache: tuple[tuple, torch.Tensor] | None = None
        self._merged_norm: torch.Tensor | None = None  # ||W + s B A|| at merge time, for unmerge
        self._norm_cache: tuple[tuple, torch.Tensor] | None = None
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm())  # (d_out,), fp32

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """||W + s B A|| per output row, fp32, shape (d_out,); no autograd graph.

        Expanded so that no (d_out, d_in) temporary is built (for a bf16 W, materialising W + s B A in
        fp32 takes ~2.4 ms for a 1536 x 576 layer on 2 CPU cores, this ~0.2 ms): for row i,
            ||W_i + s (B A)_i||^2 = ||W_i||^2 + 2 s B_i . (W A^T)_i + s^2 B_i (A A^T) B_i^T,
        where ||W_i||^2 is cached while W is unchanged, W A^T is (d_out, r) and A A^T is (r, r).
        """
        weight = self.base_layer.weight
        if weight.is_meta:  # a weightless skeleton (the check stage): only the shape matters
            return torch.empty(weight.shape[0], device="meta")
        with torch.autocast(weight.device.type, enabled=False):
            A, B = self.lora_A.weight.float(), self.lora_B.weight.float()
            cross = (B * (weight @ A.to(weight.dtype).T).float()).sum(dim=1)  # (d_out,)
            lora_sq = ((B @ (A @ A.T)) * B).sum(dim=1)  # (d_out,)
            norm_sq = self._base_norm_sq() + 2 * self.scaling * cross + self.scaling ** 2 * lora_sq
            return norm_sq.clamp_min(0).sqrt()

    def _base_norm_sq(self) -> torch.Tensor:
        """||W_i||^2 per row in fp32, recomputed only when W changes (merge, load, `.to()`)."""
        weight = self.base_layer.weight
        if torch.compiler.is_compiling():  # a compiled layer (train.compile) cannot key a cache on `_version`
            return weight.detach().float().pow(2).sum(dim=1)
        key = (weight._version, weight.data_ptr(), weight.device, weight.dtype)
        if self._base_cache is None or self._base_cache[0] != key:
            self._base_cache = (key, weight.detach().float().pow(2).sum(dim=1))
        return self._base_cache[1]

    def _norm_for_forward(self) -> torch.Tensor:
        """`weight_norm()`, recomputed every training step but cached in eval mode (generation runs one
        forward per token) until W, A or B change; in-place updates bump a tensor's `_version`."""
        if self.training:
            return self.weight_norm()
        tensors = (self.base_layer.weight, self.lora_A.weight, self.lora_B.weight)
        key = tuple((t._version, t.data_ptr(), t.device, t.dtype) for t in tensors)
        if self._norm_cache is None or self._norm_cache[0] != key:
            self._norm_cache = (key, self.weight_norm())
        return self._norm_cache[1]

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "lora_magnitude_vector"):
            with torch.no_grad():
                self.lora_magnitude_vector.copy_(self.weight_norm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # W x + b
        if self.merged or self.disabled:
            return out
        return self.adapted_output(x, out)

    def update(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """What DoRA adds to `out` = W x + b (for code that combines several adapters' updates)."""
        return self.adapted_output(x, out) - out

    def adapted_output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """(m / ||W + s B A||) (W x + s B A x) + b, given `out` = W x + b; in `out`'s dtype.

        One scale-multiply on the activations (in their dtype, bf16 under autocast), so autograd keeps
        one product for m's gradient: about half the elementwise work of (m/n - 1) W x + (m/n) s B A x.
        """
        bias = self.base_layer.bias
        base = out if bias is None else out - bias  # W x
        magnitude_scale = self.lora_magnitude_vector / self._norm_for_forward()  # (d_out,), grad flows to m only
        update = LoRALinear.update(self, x, out)  # s B A dropout(x), (..., d_out)
        adapted = magnitude_scale.to(out.dtype) * (base + update)
        return adapted if bias is None else adapted + bias

    @torch.no_grad()
    def merge(self) -> bool:
        """W <- (m / ||W + s B A||) (W + s B A). Returns False if already merged."""
        if self.merged:
            return False
        self._require_dense_base()
        delta = self.delta_weight()
        magnitude = self.lora_magnitude_vector.float()
        if not (torch.isfinite(delta).all() and torch.isfinite(magnitude).all()):
            raise AdapterError("cannot merge: the DoRA update or magnitude contains NaN or inf values; the adapter is broken")
        weight = self.base_layer.weight
        combined = weight.float() + delta
        norm = torch.linalg.vector_norm(combined, dim=1)
        weight.copy_((combined * (magnitude / norm)[:, None]).to(weight.dtype))
        self._merged_norm = norm
        self.merged = True
        return True

    @torch.no_grad()
    def unmerge(self) -> bool:
        """W <- W' ||W + s B A|| / m - s B A, with the norm kept from `merge`. Returns False if not merged."""
        if not self.merged:
            return False
        weight = self.base_layer.weight
        factor = self._merged_norm / self.lora_magnitude_vector.float()
        weight.copy_((weight.float() * factor[:, None] - self.delta_weight()).to(weight.dtype))
        self._merged_norm = None
        self.merged = False
        return True


def pattern_value(patterns: Mapping[str, float], path: str, default: float) -> float:
    """PEFT's `rank_pattern` / `alpha_pattern` lookup: the first key `k` (a regex) for which the module
    path matches `(.*\\.)?(k)$` from its start gives the value; otherwise `default`.

    So `v_proj` matches every v_proj, `layers\\.0\\.self_attn\\.q_proj` one layer.
    """
    for key, value in patterns.items():
        if ModulePattern(key, "pattern key", AdapterError, suffix=True).match(path):
            return value
    return default


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def lora_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """All adapter layers (LoRA, DoRA, AdaLoRA: every `AdapterLayer`) by module path.

    Adapters held by a module with `holds_many_adapters = True` (`multi.MultiAdapterLinear`) are left
    out: they share one base weight, so merging them into it, or training them as one, would be wrong.
    """
    banks = tuple(name + "." for name, m in model.named_modules() if getattr(m, "holds_many_adapters", False))
    return {name: m for name, m in model.named_modules()
            if isinstance(m, AdapterLayer) and not (banks and name.startswith(banks))}


def attach_lora(
    model: nn.Module,
    targets: str | Sequence[str] = "all-linear",
    r: int = 16,
    alpha: float = 32.0,
    dropout: float = 0.0,
    *,
    rslora: bool = False,
    use_dora: bool = False,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
) -> list[str]:
    """Freeze every parameter of `model` and wrap the targeted linear layers in `LoRALinear`
    (`DoRALinear` with `use_dora`); `rank_pattern` / `alpha_pattern` override r / alpha per module
    (see `pattern_value`).

    Returns the adapted module paths. Raises `TargetError` for targets that match nothing and
    `AdapterError` if the model already carries LoRA layers.
    """
    if lora_layers(model) or any(getattr(m, "holds_many_adapters", False) for m in model.modules()):
        raise AdapterError("the model already has LoRA layers; load a fresh base model to attach a new adapter")
    paths = resolve_targets(model, targets)
    layers = linear_layers(model)
    for patterns, what in ((rank_pattern, "rank_pattern"), (alpha_pattern, "alpha_pattern")):
        for key in patterns or {}:
            pattern = ModulePattern(key, f"lora.{what} key", AdapterError, suffix=True)
            if not any(pattern.match(path) for path in paths):
                raise AdapterError(
                    f"lora.{what} key '{key}' matches no adapted module (it must match the end of a path, "
                    f"e.g. 'v_proj' or 'layers\\.0\\.self_attn\\.q_proj'); adapted: {', '.join(short_names(paths))}"
                )
    layer_class = DoRALinear if use_dora else LoRALinear
    for param in model.parameters():
        param.requires_grad_(False)
    for path in paths:
        layer_r = int(pattern_value(rank_pattern or {}, path, r))
        layer_alpha = float(pattern_value(alpha_pattern or {}, path, alpha))
        _set_submodule(model, path, layer_class.from_linear(layers[path], layer_r, layer_alpha, dropout, rslora))
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
    """Adapter tensors keyed `<module path>.lora_A.weight` / `.lora_B.weight` (and DoRA's
    `.lora_magnitude_vector`)."""
    state = {}
    for path, layer in lora_layers(model).items():
        if not isinstance(layer, LoRALinear):
            continue
        state[f"{path}.lora_A.weight"] = layer.lora_A.weight.detach()
        state[f"{path}.lora_B.weight"] = layer.lora_B.weight.detach()
        if isinstance(layer, DoRALinear):
            state[f"{path}.lora_magnitude_vector"] = layer.lora_magnitude_vector.detach()
    return state


def merge_state_dict(
    base: Mapping[str, torch.Tensor], adapter: Mapping[str, torch.Tensor], scaling: float | Mapping[str, float]
) -> dict[str, torch.Tensor]:
    """Pure function: W' = W + s B A for every adapted weight (DoRA: W' = m (W + s B A) / ||W + s B A||
    where `<path>.lora_magnitude_vector` is present); `base` is left untouched.

    `adapter` holds `<path>.lora_A.weight` and `<path>.lora_B.weight`; `base` holds `<path>.weight`.
    `scaling` is one s for all layers or a mapping from module path to s.
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
        s = scaling[path] if isinstance(scaling, Mapping) else scaling
        delta = (adapter[b_key].float() @ adapter[key].float()) * s
        if delta.shape != weight.shape:
            raise AdapterError(f"adapter for '{path}' has shape {tuple(delta.shape)}, base weight {tuple(weight.shape)}")
        combined = weight.float() + delta
        magnitude = adapter.get(f"{path}.lora_magnitude_vector")
        if magnitude is not None:
            combined = combined * (magnitude.float() / torch.linalg.vector_norm(combined, dim=1))[:, None]
        merged[w_key] = combined.to(weight.dtype)
    return merged


class LoRAMethod(AttachedMethod):
    """LoRA attached to a model; trains only the `lora_A` / `lora_B` matrices (and DoRA's magnitudes),
    plus the modules under `full` (a vision-language model's tower or projector with vision.* = full),
    whose base weights `full_base` holds for the base view.

    Also the handle of any adapter loaded for inference (AdaLoRA's load as LoRA layers)."""

    def __init__(self, name: str, model: nn.Module, full: Sequence[str] = (),
                 full_base: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__(name, model)
        self.full, self.full_base = list(full), full_base or {}

    @contextmanager
    def base_view(self) -> Iterator[nn.Module]:
        from slimtune.methods.vision_lora import swap_in

        trained = swap_in(self.model, self.full, self.full_base) if self.full else None
        try:
            with adapters_disabled(self.model):
                yield self.model
        finally:
            if trained is not None:
                swap_in(self.model, self.full, trained)

    def merged(self) -> nn.Module:
        """W' = W + s B A in every adapted layer (an NF4 base dequantized to fp32 first), plain layers back."""
        from slimtune.quant import Linear4bit, dequantize_model

        if any(isinstance(m, Linear4bit) for m in self.model.modules()):
            dequantize_model(self.model, torch.float32)
        return merge_and_unload(self.model)

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = []
        for layer in lora_layers(self.model).values():
            if not isinstance(layer, LoRALinear):
                continue
            params += [layer.lora_A.weight, layer.lora_B.weight]
            if isinstance(layer, DoRALinear):
                params.append(layer.lora_magnitude_vector)
        if self.full:
            from slimtune.adapters import modules_to_save_parameters

            params += list(modules_to_save_parameters(self.model, self.full).values())
        return params


class LoRA(Method):
    """LoRA (and rsLoRA, per-module ranks): `lora.*`. Files: PEFT's adapter_config.json + adapter_model.safetensors."""

    name = "lora"
    summary = "low-rank updates B A on frozen linear layers (lora.*)"
    sections = {"lora": None}
    accepts_quantized_base = True
    run_files = (CONFIG_NAME, WEIGHTS_NAME)
    weights_files = (WEIGHTS_NAME,)
    use_dora = False

    def attach(self, model: nn.Module, cfg: Config, console: Console, quiet: bool = False) -> AttachedMethod:
        from slimtune.methods.vision_lora import unfreeze, vision_lora_targets

        lora = cfg.lora
        targets, full = vision_lora_targets(model, lora.targets, cfg.vision)
        attach_lora(model, targets, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, rslora=lora.rslora,
                    use_dora=self.use_dora, rank_pattern=lora.rank_pattern, alpha_pattern=lora.alpha_pattern)
        return LoRAMethod(self.name, model, full, unfreeze(model, full) if full else None)

    def save(self, attached: AttachedMethod, tokenizer: Any, cfg: Config, out: Path, base_model: str,
             steps: int) -> str:
        from slimtune.adapters import save_lora_adapter

        save_lora_adapter(attached.model, out, base_model=base_model, dropout=cfg.lora.dropout,
                          modules_to_save=getattr(attached, "full", ()))
        return f"{WEIGHTS_NAME}, {CONFIG_NAME}"

    def _adapter_config(self, run_dir: Path) -> dict[str, Any] | None:
        from slimtune.adapters import read_adapter_config

        return read_adapter_config(run_dir) if (run_dir / CONFIG_NAME).is_file() else None

    def recognises(self, run_dir: Path) -> bool:
        from slimtune.methods.longlora import LongLoRA  # imports this module: not at the top

        config = self._adapter_config(run_dir)
        # A LongLoRA run is PEFT LoRA too (plus trained modules and its model config.json); a vision-language
        # run's fully trained parts are modules_to_save as well, but without that file.
        return (config is not None and config["peft_type"] == "LORA" and bool(config.get("use_dora")) == self.use_dora
                and not LongLoRA().recognises(run_dir))

    def recorded_base(self, run_dir: Path) -> str | None:
        config = self._adapter_config(run_dir)
        return config.get("base_model_name_or_path") if config else None

    def load(self, run_dir: Path, base_name: str | None, quantized: bool) -> tuple[nn.Module, Any, AttachedMethod]:
        from slimtune.adapters import load_lora_adapter, modules_to_save_parameters, read_adapter_config

        config = read_adapter_config(run_dir)  # a bad adapter config fails before the base loads
        full = list(config.get("modules_to_save") or ())
        model, tokenizer = load_base(base_name, quantized)
        full_base = {key: value.detach().clone() for key, value in modules_to_save_parameters(model, full).items()}
        load_lora_adapter(model, run_dir)
        return model, tokenizer, LoRAMethod(self.name, model, full, full_base)


class DoRA(LoRA):
    """DoRA: LoRA plus a learned per-output magnitude (`lora.*`; same as lora.use_dora: true)."""

    name = "dora"
    summary = "LoRA with a learned magnitude per output (lora.*)"
    accepts_quantized_base = False
    saves_layer_outputs = True
    use_dora = True


class QLoRA(LoRA):
    """QLoRA: LoRA on a base whose linear layers are frozen in 4-bit NF4 with double quantization."""

    name = "qlora"
    summary = "LoRA on a base frozen in 4-bit NF4 (lora.*)"
    quantized_base = True

    def recognises(self, run_dir: Path) -> bool:
        return False  # its files are LoRA's; only the run's config.yaml tells that the base was 4-bit
