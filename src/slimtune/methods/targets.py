"""Choose which linear layers an adapter attaches to.

A target spec is one of
- `"all-linear"`: every `nn.Linear` except the output head (as PEFT and QLoRA do);
- a list of names: a module matches if its path equals a name or ends with `"." + name`
  (`"q_proj"` matches `model.layers.3.self_attn.q_proj`), PEFT's list semantics;
- any other string: a regular expression that must match the whole module path (PEFT's str semantics).
Every list entry must match at least one linear layer; otherwise the error lists the real names.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from slimtune.errors import TargetError
from slimtune.methods.patterns import ModulePattern


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """All linear modules by path (`nn.Linear`, and QLoRA's frozen 4-bit `Linear4bit`), output head excluded."""
    from slimtune.quant.linear4bit import Linear4bit

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Linear4bit)) and module is not head and name
    }


def short_names(paths: Sequence[str]) -> list[str]:
    """The distinct last components of module paths, sorted: `q_proj, k_proj, ...`."""
    return sorted({path.rsplit(".", 1)[-1] for path in paths})


def resolve_targets(model: nn.Module, spec: str | Sequence[str], layers: dict[str, nn.Linear] | None = None) -> list[str]:
    """Paths of the linear layers that `spec` selects (see module docstring), in model order.

    `layers` replaces `linear_layers(model)` as the candidates (e.g. the base layers recorded before
    adapters were attached).
    """
    layers = linear_layers(model) if layers is None else layers
    names = list(layers)
    available = ", ".join(short_names(names)) or "(none)"
    if isinstance(spec, str) and spec == "all-linear":
        chosen = names
    elif isinstance(spec, str):
        pattern = ModulePattern(spec, "target regex", TargetError)  # bounded time: see methods/patterns.py
        chosen = [name for name in names if pattern.fullmatch(name)]
        if not chosen:
            raise TargetError(
                f"target regex '{spec}' matches no linear layer (it must match the whole path, e.g. "
                f"'.*\\.(q_proj|v_proj)'); the model has {available}"
            )
    else:
        if not spec:
            raise TargetError("lora.targets is empty: name at least one module, e.g. [q_proj, v_proj], or 'all-linear'")
        chosen_set: set[str] = set()
        for entry in spec:
            hits = [name for name in names if name == entry or name.endswith("." + entry)]
            if not hits:
                others = [n for n, _ in model.named_modules() if n == entry or n.endswith("." + entry)]
                what = "is not a linear layer" if others else "matches no module"
                raise TargetError(f"unknown target module '{entry}' ({what}): the model has {available}")
            chosen_set.update(hits)
        chosen = [name for name in names if name in chosen_set]
    return chosen
