"""Several LoRA / DoRA adapters on one frozen base model, for inference.

`AdapterSet(model)` records the model's linear layers once; `load(adapter_dir, name)` wraps each
layer an adapter targets in a `MultiAdapterLinear` (the base weight is shared, never copied) and adds
the adapter under `name`. One adapter is active at a time (`set_active`, or None for the base model),
`disabled()` runs the base model for a block, and `delete(name)` removes an adapter (a layer no
adapter uses any more gets its plain `nn.Linear` back).

Per-row selection: inside `with adapters.per_row(["a", None, "b"]):` row i of the batch goes
through adapter names[i] (None: the base model), which equals running each row alone with that
adapter active. Each layer computes the base output once for the whole batch and adds each adapter's
update only to its rows.

Deliberately left out: training several adapters at once, and merging (merge one adapter with
`slimtune.api.merge_run` on its own directory); `merge_lora` and friends skip adapters held here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from slimtune.adapters import read_lora_adapter
from slimtune.errors import AdapterError
from slimtune.methods.lora import DoRALinear, LoRALinear, _set_submodule, pattern_value
from slimtune.methods.targets import linear_layers


class MultiAdapterLinear(nn.Module):
    """A frozen `nn.Linear` with named adapters; `active` (or `row_adapters`, per batch row) picks them."""

    holds_many_adapters = True  # `lora.lora_layers` skips these adapters: never merged into the shared W

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()  # name -> LoRALinear / DoRALinear sharing `base_layer`
        self.active: str | None = None
        self.row_adapters: list[str | None] | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.row_adapters is None:
            if self.active is None or self.active not in self.adapters:
                return out
            return out + self.adapters[self.active].update(x, out)
        if len(self.row_adapters) != x.shape[0]:
            raise AdapterError(f"per_row got {len(self.row_adapters)} adapter names for a batch of {x.shape[0]} rows")
        result = out.clone()
        for name in dict.fromkeys(n for n in self.row_adapters if n is not None and n in self.adapters):
            rows = torch.tensor([i for i, n in enumerate(self.row_adapters) if n == name], device=x.device)
            result[rows] = out[rows] + self.adapters[name].update(x[rows], out[rows])
        return result


class AdapterSet:
    """Named adapters on one base model (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.base_layers = linear_layers(model)  # path -> nn.Linear, recorded before any wrapping
        self.names: list[str] = []
        self.active: str | None = None
        for param in model.parameters():
            param.requires_grad_(False)

    def _multi_layers(self) -> dict[str, MultiAdapterLinear]:
        return {name: m for name, m in self.model.named_modules() if isinstance(m, MultiAdapterLinear)}

    def load(self, adapter_dir: str | Path, name: str) -> None:
        """Add the LoRA/DoRA adapter in `adapter_dir` (slimtune or PEFT files) as `name`; not activated."""
        if not name or "." in name:
            raise AdapterError(f"adapter name {name!r} must be non-empty and contain no '.'")
        if name in self.names:
            raise AdapterError(f"an adapter named '{name}' is already loaded: delete it first or choose another name")
        config, paths, tensors = read_lora_adapter(self.model, adapter_dir, self.base_layers)
        r, alpha = int(config["r"]), float(config["lora_alpha"])
        layer_class = DoRALinear if config.get("use_dora") else LoRALinear
        multi = self._multi_layers()
        for path in paths:
            base = self.base_layers[path]
            if path not in multi:
                multi[path] = MultiAdapterLinear(base)
                multi[path].active = self.active
                _set_submodule(self.model, path, multi[path])
            layer = layer_class(base, int(pattern_value(config.get("rank_pattern") or {}, path, r)),
                                float(pattern_value(config.get("alpha_pattern") or {}, path, alpha)),
                                rslora=bool(config.get("use_rslora")))
            with torch.no_grad():
                for key, param in layer.named_parameters():
                    if not key.startswith("base_layer."):
                        param.copy_(tensors[f"{path}.{key}"].to(param.dtype))
            layer.requires_grad_(False)
            multi[path].adapters[name] = layer.to(base.weight.device).eval()
        self.names.append(name)

    def set_active(self, name: str | None) -> None:
        """Make `name` the adapter every row uses; None runs the base model."""
        if name is not None and name not in self.names:
            raise AdapterError(f"no adapter named '{name}': loaded are {', '.join(self.names) or '(none)'}")
        self.active = name
        for layer in self._multi_layers().values():
            layer.active = name

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the base model inside the block; the active adapter comes back afterwards."""
        previous = self.active
        self.set_active(None)
        try:
            yield
        finally:
            self.set_active(previous)

    @contextmanager
    def per_row(self, names: Sequence[str | None]) -> Iterator[None]:
        """Row i of every batch inside the block uses adapter names[i] (None: the base model)."""
        unknown = sorted({n for n in names if n is not None and n not in self.names})
        if unknown:
            raise AdapterError(f"per_row names unknown adapters {unknown}: loaded are {', '.join(self.names) or '(none)'}")
        layers = list(self._multi_layers().values())
        for layer in layers:
            layer.row_adapters = list(names)
        try:
            yield
        finally:
            for layer in layers:
                layer.row_adapters = None

    def delete(self, name: str) -> None:
        """Remove adapter `name`; layers left without adapters become plain `nn.Linear` again."""
        if name not in self.names:
            raise AdapterError(f"no adapter named '{name}': loaded are {', '.join(self.names) or '(none)'}")
        for path, layer in self._multi_layers().items():
            if name in layer.adapters:
                del layer.adapters[name]
            if not len(layer.adapters):
                _set_submodule(self.model, path, layer.base_layer)
        self.names.remove(name)
        if self.active == name:
            self.set_active(None)
