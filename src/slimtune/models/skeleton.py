"""A model without its weights: built from `config.json` alone, parameters on the meta device.

Two uses:
- the *check* stage attaches the method to a skeleton to resolve targets, ranks and layer selections
  before any weight is read (seconds, no memory);
- QLoRA's streaming load (`models/streaming.py`) fills a skeleton tensor by tensor, quantizing each
  linear weight as it arrives, so the 16-bit model never exists in memory at once.

Only *parameters* go to the meta device. Buffers are computed on the CPU as usual: rotary embeddings
derive `inv_freq` from the config in `__init__` and never store it in the checkpoint, so a buffer left
on the meta device could not be filled by loading.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from slimtune.errors import ModelLoadError


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Inside the block every `nn.Parameter` registered by a module lands on the meta device."""
    original = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            kwargs = {"requires_grad": param.requires_grad}
            module._parameters[name] = type(param)(param.to("meta"), **kwargs)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def model_config(resolved: str, trust_remote_code: bool = False):
    """The `PretrainedConfig` of a resolved model directory or hub id, read without any weights."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not read the config of model '{resolved}': {exc}") from None


def build_skeleton(resolved: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM (or vision-language model) of `resolved`, every parameter on the meta device (real buffers)."""
    from slimtune.models.vision import auto_model_class

    config = model_config(resolved, trust_remote_code)
    try:
        with parameters_on_meta():
            model = auto_model_class(config).from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(f"model '{resolved}' is not a causal LM that transformers can build: {exc}") from None
    model.config.use_cache = False
    return model


def meta_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers still on the meta device (nothing loaded them)."""
    return [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
