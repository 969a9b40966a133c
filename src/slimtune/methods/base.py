"""The small interface through which the training loop knows a method.

The loop never imports a method module. It asks the attached method for its trainable parameters,
calls `on_step_end` after each optimizer step, before the gradients are cleared (AdaLoRA's rank
allocation lives there), adds `extra_loss()` to the loss explicitly (AdaLoRA's orthogonality penalty),
logging it as its own metric, and keeps `state_tensors()` in every checkpoint so a resumed run continues
the method's own state (AdaLoRA's importance averages and masks) too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class AttachedMethod:
    """A method attached to a model. Subclasses override the hooks they need."""

    name: str
    model: nn.Module

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def extra_loss(self) -> torch.Tensor | None:
        """A regulariser the loop adds to the task loss; None when the method has none."""
        return None

    def on_step_end(self, step: int, total_steps: int) -> dict[str, float]:
        """Called after every optimizer step (gradients still set); returns extra metrics to log."""
        return {}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The method's own training state (besides parameters and optimizer), saved in checkpoints."""
        return {}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `state_tensors` returned (on resume)."""

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; tied weights counted once, 4-bit weights (buffers) counted."""
        from slimtune.quant.linear4bit import Linear4bit

        seen: set[int] = set()
        trainable = total = 0
        for param in self.model.parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            total += param.numel()
            trainable += param.numel() if param.requires_grad else 0
        total += sum(m.in_features * m.out_features for m in self.model.modules() if isinstance(m, Linear4bit))
        return trainable, total
