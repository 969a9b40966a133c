"""Several LoRA / DoRA adapters on one frozen base model, for inference.

`AdapterSet(model)` records the model's linear layers once; `load(adapter_dir, name)` wraps each
layer an adapter targets in a `MultiAdapterLinear` (the base weight is shared, never copied) and adds
the adapter under `name`. One adapter is active at a time (`set_active`, or None for the base model),
`disabled()` runs the base model for a block, and `delete(name)` removes an adapter (a layer no
adapter uses any more gets its plain `nn.Linear` back).

Per-row selection: inside `with adapters.per_row(["a", None, "b"]):` row i of the batch goes
through adapter names[i] (None: the base model), which equals running each row alone with that
adapter active. Each layer computes the base output once for the whole batch and adds each adapter's
update only to its rows. The rows of each adapter are grouped once per `per_row` block (`RowGroups`),
not in every layer, since a server runs one block per decode step through every adapted layer.

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


class RowGroups:
    """Which batch rows use which adapter: built once per `per_row` block, shared by every layer.

    `uniform` is the one name every row uses (None: the base model) when the batch is not mixed; then
    layers take the whole batch at once, exactly as with `set_active`. Otherwise `groups` maps each
    adapter name to the LongTensor of its row indices.
    """

    def __init__(self, names: Sequence[str | None], device: torch.device) -> None:
        self.rows = len(names)
        distinct = list(dict.fromkeys(names))
        self.mixed = len(distinct) > 1
        self.uniform: str | None = distinct[0] if len(distinct) == 1 else None
        self.groups: dict[str, torch.Tensor] = {
            name: torch.tensor([i for i, n in enumerate(names) if n == name], device=device)
            for name in distinct if name is not None
        } if self.mixed else {}


class MultiAdapterLinear(nn.Module):
    """A frozen `nn.Linear` with named adapters; `active` (or `row_groups`, per batch row) picks them."""

    holds_many_adapters = True  # `lora.lora_layers` skips these adapters: never merged into the shared W

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()  # name -> LoRALinear / DoRALinear sharing `base_layer`
        self.active: str | None = None
        self.row_groups: RowGroups | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        groups = self.row_groups
        if groups is None or not groups.mixed:
            name = self.active if groups is None else groups.uniform
            if groups is not None and groups.rows != x.shape[0]:
                raise AdapterError(f"per_row got {groups.rows} adapter names for a batch of {x.shape[0]} rows")
            if name is None or name not in self.adapters:
                return out
            return out + self.adapters[name].update(x, out)
        if groups.rows != x.shape[0]:
            raise AdapterError(f"per_row got {groups.rows} adapter names for a batch of {x.shape[0]} rows")
        result = out.clone()
        for name, rows in groups.groups.items():
            if name in self.adapters:
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
        # Every layer is built (and so checked: rank, alpha) before the model changes, so a bad adapter
        # leaves the set exactly as it was.
        built: dict[str, nn.Module] = {}
        for path in paths:
            base = self.base_layers[path]
            layer = layer_class(base, int(pattern_value(config.get("rank_pattern") or {}, path, r)),
                                float(pattern_value(config.get("alpha_pattern") or {}, path, alpha)),
                                rslora=bool(config.get("use_rslora")))
            with torch.no_grad():
                for key, param in layer.named_parameters():
                    if not key.startswith("base_layer."):
                        param.copy_(tensors[f"{path}.{key}"].to(param.dtype))
            layer.requires_grad_(False)
            built[path] = layer.to(base.weight.device).eval()
        multi = self._multi_layers()
        for path, layer in built.items():
            if path not in multi:
                multi[path] = MultiAdapterLinear(self.base_layers[path])
                multi[path].active = self.active
                _set_submodule(self.model, path, multi[path])
            multi[path].adapters[name] = layer
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
        groups = RowGroups(names, next(iter(self.base_layers.values())).weight.device)
        for layer in layers:
            layer.row_groups = groups
        try:
            yield
        finally:
            for layer in layers:
                layer.row_groups = None

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
