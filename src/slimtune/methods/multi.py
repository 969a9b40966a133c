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

When every adapter of a layer is plain LoRA, a mixed batch takes one path for all of them: with the
adapters' A stacked into A_cat (sum of ranks R, d_in) and their B into B_cat (d_out, R),

    y = W x + B_cat (m_row * (A_cat x)),   m_row[j] = s_a if column j belongs to the row's adapter a, else 0,

which is row by row s_a B_a A_a x (the other adapters' columns are multiplied by exact zeros). That
is two small matmuls per layer whatever the mix, instead of a gather, two matmuls and a scatter per
adapter; its cost grows with the total rank R of the layer's adapters. DoRA layers (whose update
depends on the row's weight norm) keep the per-adapter path.

Mixtures: a row's entry may be a `Mixture` (`parse_mixture("extract:0.7+docs:0.3")`), whose row gets
sum_a w_a s_a B_a A_a x: in the stacked path its row of m is sum_a w_a m_a, in the per-adapter path the
weighted sum of the adapters' updates. No merged weight is built, and the result is what the `cat`
combination of the same adapters and weights computes (`slimtune.combine`). Mixtures of DoRA adapters
are refused: a DoRA update is not linear in its low-rank term.

Deliberately left out: training several adapters at once, and merging (merge one adapter with
`slimtune.api.merge_run` on its own directory); `merge_lora` and friends skip adapters held here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from slimtune.adapters import read_lora_adapter
from slimtune.errors import AdapterError
from slimtune.methods.lora import DoRALinear, LoRALinear, _set_submodule, pattern_value
from slimtune.methods.targets import linear_layers


@dataclass(frozen=True)
class Mixture:
    """A weighted mixture of adapters for one row: ((name, weight), ...), in the order written."""

    parts: tuple[tuple[str, float], ...]

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.parts]

    def __str__(self) -> str:
        return "+".join(f"{name}:{weight:g}" for name, weight in self.parts)


def parse_mixture(text: str) -> Mixture:
    """'extract:0.7+docs:0.3' -> Mixture((('extract', 0.7), ('docs', 0.3))); a part without ':w' weighs 1."""
    parts: list[tuple[str, float]] = []
    for part in text.split("+"):
        name, sep, weight_text = part.strip().partition(":")
        try:
            weight = float(weight_text) if sep else 1.0
        except ValueError:
            weight = math.nan
        if not name or not math.isfinite(weight):
            raise AdapterError(f"mixture {text!r}: write NAME:WEIGHT parts joined by '+', e.g. extract:0.7+docs:0.3")
        if name in dict(parts):
            raise AdapterError(f"mixture {text!r} names '{name}' twice: give each adapter one weight")
        parts.append((name, weight))
    return Mixture(tuple(parts))


RowEntry = str | Mixture | None  # an adapter, a mixture of adapters, or None: the base model


class RowGroups:
    """Which batch rows use which adapter: built once per `per_row` block, shared by every layer.

    `uniform` is the one name every row uses (None: the base model) when the batch is not mixed; then
    layers take the whole batch at once, exactly as with `set_active`. Otherwise `groups` maps each
    adapter name to the LongTensor of its row indices, and `lora_scales` gives stacked-LoRA layers their
    per-row column scales (cached: the layers of one model share few column layouts).
    """

    def __init__(self, names: Sequence[RowEntry], device: torch.device) -> None:
        self.names = list(names)
        self.rows = len(names)
        self.device = device
        distinct = list(dict.fromkeys(names))
        # A batch with a mixture always takes the mixed paths: no single adapter runs it.
        self.mixed = len(distinct) > 1 or any(isinstance(n, Mixture) for n in distinct)
        self.uniform: str | None = distinct[0] if len(distinct) == 1 and not self.mixed else None
        self.groups: dict[str | Mixture, torch.Tensor] = {
            name: torch.tensor([i for i, n in enumerate(names) if n == name], device=device)
            for name in distinct if name is not None
        } if self.mixed else {}
        self._scales: dict[tuple, torch.Tensor] = {}

    def lora_scales(self, stack: "StackedLoRA") -> torch.Tensor:
        """m of the module docstring for every row: (rows, R); zeros for rows whose adapter is not in `stack`."""
        scales = self._scales.get(stack.layout)
        if scales is None:
            position = {name: i for i, name in enumerate(stack.names)}
            if any(isinstance(n, Mixture) for n in self.names):
                # Each row's weights over the stack's adapters (rows, adapters + 1), times the table: a
                # plain row has one weight 1, a mixture row its weights (parts this layer lacks drop out).
                mixing = torch.zeros(self.rows, len(stack.names) + 1, dtype=stack.table.dtype)
                for row, entry in enumerate(self.names):
                    parts = entry.parts if isinstance(entry, Mixture) else ((entry, 1.0),) if entry else ()
                    for name, weight in parts:
                        if name in position:
                            mixing[row, position[name]] = weight
                scales = mixing.to(stack.table.device) @ stack.table
            else:
                index = torch.tensor([position.get(n, len(stack.names)) for n in self.names], device=stack.table.device)
                scales = stack.table[index]
            self._scales[stack.layout] = scales
        return scales


class StackedLoRA:
    """A layer's plain-LoRA adapters side by side: A_cat (R, d_in), B_cat (d_out, R), and `table`
    (adapters + 1, R) whose row a holds s_a on adapter a's columns (the last row, all zeros: no adapter)."""

    def __init__(self, adapters: dict[str, LoRALinear]) -> None:
        self.names = list(adapters)
        self.A = torch.cat([a.lora_A.weight for a in adapters.values()])
        self.B = torch.cat([a.lora_B.weight for a in adapters.values()], dim=1)
        self.table = torch.zeros(len(adapters) + 1, self.A.shape[0], dtype=self.A.dtype, device=self.A.device)
        start = 0
        for row, adapter in enumerate(adapters.values()):
            self.table[row, start: start + adapter.r] = adapter.scaling
            start += adapter.r
        # Layers with the same adapters, ranks and scalings share one per-row scale matrix per batch.
        self.layout = tuple((name, a.r, a.scaling) for name, a in adapters.items())


class MultiAdapterLinear(nn.Module):
    """A frozen `nn.Linear` with named adapters; `active` (or `row_groups`, per batch row) picks them."""

    holds_many_adapters = True  # `lora.lora_layers` skips these adapters: never merged into the shared W

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()  # name -> LoRALinear / DoRALinear sharing `base_layer`
        self.active: str | None = None
        self.row_groups: RowGroups | None = None
        self._stack: StackedLoRA | None = None  # built on first mixed use, dropped when adapters change

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def add(self, name: str, adapter: nn.Module) -> None:
        self.adapters[name] = adapter
        self._stack = None

    def remove(self, name: str) -> None:
        del self.adapters[name]
        self._stack = None

    def stacked(self) -> StackedLoRA | None:
        """The adapters stacked for the one-path mixed batch, or None if one is DoRA."""
        if self._stack is None and all(type(a) is LoRALinear for a in self.adapters.values()):
            self._stack = StackedLoRA(dict(self.adapters.items()))
        return self._stack

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
        stack = self.stacked()
        if stack is not None:
            scales = groups.lora_scales(stack)  # (rows, R)
            scales = scales.view(scales.shape[0], *([1] * (x.dim() - 2)), scales.shape[1])
            hidden = (x.to(stack.A.dtype) @ stack.A.T) * scales  # (rows, ..., R)
            return out + (hidden @ stack.B.T).to(out.dtype)
        result = out.clone()
        for entry, rows in groups.groups.items():
            parts = entry.parts if isinstance(entry, Mixture) else ((entry, 1.0),)
            for name, weight in parts:
                if name in self.adapters:
                    update = self.adapters[name].update(x[rows], out[rows])
                    result[rows] += update if weight == 1.0 else weight * update
        return result


class AdapterSet:
    """Named adapters on one base model (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.base_layers = linear_layers(model)  # path -> nn.Linear, recorded before any wrapping
        self.names: list[str] = []
        self.dora: set[str] = set()  # DoRA adapters: never part of a mixture
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
        if config.get("modules_to_save"):  # whole modules would replace the base's for every adapter
            raise AdapterError(f"'{adapter_dir}' also trains whole modules ({', '.join(config['modules_to_save'])}), "
                               "which cannot be shared with other adapters: merge it (slimtune merge) and serve the result")
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
            multi[path].add(name, layer)
        self.names.append(name)
        if config.get("use_dora"):
            self.dora.add(name)

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

    def check_mixture(self, mixture: Mixture) -> None:
        """Raise unless every part of `mixture` is a loaded LoRA (not DoRA) adapter."""
        unknown = [n for n in mixture.names if n not in self.names]
        if unknown:
            raise AdapterError(f"mixture '{mixture}' names unknown adapters {unknown}: loaded are "
                               f"{', '.join(self.names) or '(none)'}")
        dora = [n for n in mixture.names if n in self.dora]
        if dora:
            raise AdapterError(f"mixture '{mixture}' holds DoRA adapters {dora}: a DoRA update is not linear in its "
                               "low-rank term, so only LoRA adapters mix; request them one by one")

    @contextmanager
    def per_row(self, names: Sequence[RowEntry]) -> Iterator[None]:
        """Row i of every batch inside the block uses names[i]: an adapter, a `Mixture`, or None (the base)."""
        for mixture in {n for n in names if isinstance(n, Mixture)}:
            self.check_mixture(mixture)
        unknown = sorted({n for n in names if isinstance(n, str) and n not in self.names})
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
                layer.remove(name)
            if not len(layer.adapters):
                _set_submodule(self.model, path, layer.base_layer)
        self.names.remove(name)
        self.dora.discard(name)
        if self.active == name:
            self.set_active(None)
