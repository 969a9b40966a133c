"""LoRA on a vision-language model: which layers adapt, and the vision parts trained fully.

By default only the language model's linear layers get adapters (`all-linear` and name lists are
matched against the language model alone): the vision tower and the projector stay frozen, the
LLaMA-Factory recipe. `vision.train_tower` / `vision.train_projector` change that per part:
- `lora`: the part's linear layers get adapters too (saved in the adapter file under their full paths);
- `full`: every weight of the part trains; the part is saved as PEFT's `modules_to_save` (its tensors
  under `base_model.model.<module path>.<name>`, the module paths listed in adapter_config.json), so
  PEFT loads the same weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from slimtune.methods.targets import linear_layers, resolve_targets
from slimtune.models.vision import VisionSettings, is_vision_model, part_of, vision_parts, vision_training


def vision_lora_targets(model: nn.Module, spec: str | Sequence[str], settings: VisionSettings
                        ) -> tuple[str | Sequence[str], list[str]]:
    """(targets for `attach_lora`, module paths to train fully). A text-only model keeps `spec` as is;
    a vision-language model gets the explicit list of adapted paths."""
    if not is_vision_model(model):
        return spec, []
    parts, training = vision_parts(model), vision_training(settings)
    chosen = [path for path in resolve_targets(model, spec) if part_of(path, parts) is None]
    chosen += [path for path in linear_layers(model) if training.get(part_of(path, parts) or "", "") == "lora"]
    full = [root for part, roots in parts.items() if training[part] == "full" for root in roots]
    return chosen, full


def unfreeze(model: nn.Module, roots: Sequence[str]) -> dict[str, torch.Tensor]:
    """Make the modules under `roots` trainable; returns a copy of their weights as they were (the base)."""
    from slimtune.adapters import modules_to_save_parameters

    state = modules_to_save_parameters(model, roots)
    for param in state.values():
        param.requires_grad_(True)
    return {key: value.detach().clone() for key, value in state.items()}


def swap_in(model: nn.Module, roots: Sequence[str], values: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Copy `values` into the modules under `roots`; returns what they held before."""
    from slimtune.adapters import modules_to_save_parameters

    current = modules_to_save_parameters(model, roots)
    previous = {key: value.detach().clone() for key, value in current.items()}
    with torch.no_grad():
        for key, param in current.items():
            param.copy_(values[key].to(param.dtype))
    return previous


__all__ = ["swap_in", "unfreeze", "vision_lora_targets"]
