"""Preparing a model for training, undone on any exit.

- `slimtune_attention` (for the whole run): slimtune's attention function, which keeps packed examples
  apart and on CPU runs the attention maths in fp32 or bf16, whichever `train/tuning.py` measured
  faster on this machine (or train.attention_precision says); the model's own implementation comes
  back when the block ends.
- `training_mode` (for the loop): gradient checkpointing on the chosen fraction of the decoder layers
  and train mode; checkpointing off and eval mode when the block ends, however it ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from rich.console import Console

from slimtune.config import TrainSettings
from slimtune.train.packing import own_attention_reason, set_cpu_attention_maths, use_packed_attention
from slimtune.train.tuning import cpu_attention_maths


def _bf16_on_cpu(model: torch.nn.Module) -> bool:
    """Whether the attention choice applies: a model on the CPU that computes in bf16."""
    weight = model.get_input_embeddings().weight
    return weight.device.type == "cpu" and weight.dtype == torch.bfloat16


def checkpoint_some_layers(model: torch.nn.Module, fraction: float) -> tuple[int, int]:
    """After `gradient_checkpointing_enable`: keep recomputation on max(1, round(fraction * n)) of the
    n checkpointed decoder layers, evenly spaced, and switch it off on the rest. Returns (kept, n)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    keep = max(1, round(fraction * len(layers))) if layers else 0
    chosen = {i * len(layers) // keep for i in range(keep)}
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index in chosen
    return keep, len(layers)
@contextmanager
def slimtune_attention(model: torch.nn.Module, settings: TrainSettings, console: Console,
                       attention_length: int = 128) -> Iterator[bool]:
    """For the whole run (training and its evaluations): slimtune's attention function. Yields whether
    packed batches can be used (\`settings.packing\` and an architecture that supports it).
    `attention_length`: the run's typical attention length (the CPU maths choice depends on it)."""
    previous = getattr(model.config, "_attn_implementation", None)
    packing = use_packed_attention(model) and settings.packing
    if settings.packing and not packing:
        reason = own_attention_reason(model.config)
        console.print(f"note: this architecture cannot use packed attention{f' ({reason})' if reason else ''}; "
                      "training with padded batches")
    maths = cpu_attention_maths(settings.attention_precision, attention_length) if _bf16_on_cpu(model) else "fp32"
    previous_maths = set_cpu_attention_maths(maths)
    try:
        yield packing
    finally:
        set_cpu_attention_maths(previous_maths)
        if previous and model.config._attn_implementation != previous:
            try:
                model.set_attn_implementation(previous)
            except (ValueError, AttributeError, NotImplementedError):
                pass  # the model keeps slimtune's attention, which computes the same outputs


@contextmanager
def training_mode(model: torch.nn.Module, settings: TrainSettings, console: Console) -> Iterator[None]:
    """Gradient checkpointing (on train.checkpoint_fraction of the layers) and train mode inside the block."""
    if settings.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        kept, total = checkpoint_some_layers(model, settings.checkpoint_fraction)
        if total == 0:
            console.print("note: this model has no checkpointable decoder layers; train.grad_checkpointing has no effect")
        elif kept < total:
            console.print(f"gradient checkpointing on {kept} of {total} decoder layers (train.checkpoint_fraction)")
    model.train()
    try:
        yield
    finally:
        if settings.grad_checkpointing:
            model.gradient_checkpointing_disable()
        model.eval()
