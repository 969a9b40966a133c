"""Full fine-tuning and freeze tuning: no new modules, only a choice of which parameters train.

- `full`: every parameter trains. The run is saved as a plain Hugging Face model directory.
- `freeze`: everything is frozen except a selection (the last N decoder layers, a layer list such as
  "0-3,10", parameter-name regexes, embeddings, norms, the LM head), as in LLaMA-Factory's freeze
  tuning. Only the trained tensors are saved (`freeze_model.safetensors`) with a small
  `freeze_config.json` naming the base model and the tensors; loading puts them back into a base model.

Tied embeddings (SmolLM2 ties `lm_head.weight` to `model.embed_tokens.weight`): the two names are one
tensor, so training either trains both. It is saved once, under the name `named_parameters()` gives it
(the embedding's), and loading writes it into that shared tensor, so the tie survives save and load.

Trained parameters stored in bf16 are upcast to fp32 in place: AdamW updates on bf16 weights lose
most small steps. Matmuls still run in bf16 under autocast.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from slimtune.atomic import save_safetensors_atomically
from slimtune.errors import AdapterError
from slimtune.methods.base import AttachedMethod

FREEZE_CONFIG = "freeze_config.json"
FREEZE_WEIGHTS = "freeze_model.safetensors"


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, layers) of the transformer block list: the longest `nn.ModuleList` in the model
    (`model.layers` for Llama, `transformer.h` for GPT-2)."""
    lists = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.ModuleList) and name]
    if not lists:
        raise AdapterError(f"{type(model).__name__} has no nn.ModuleList of decoder layers; use freeze.patterns instead")
    return max(lists, key=lambda item: len(item[1]))


def parse_layer_spec(spec: str, num_layers: int) -> set[int]:
    """`"0-3,10"` -> {0, 1, 2, 3, 10}; negative indices count from the end (`"-1"` is the last layer)."""
    chosen: set[int] = set()
    for part in spec.replace(" ", "").split(","):
        match = re.fullmatch(r"(-?\d+)(?:-(-?\d+))?", part)
        if not match:
            raise AdapterError(f"freeze.layers entry '{part}' is not an index or a range like '0-3' (in '{spec}')")
        start = int(match.group(1))
        end = int(match.group(2)) if match.group(2) is not None else start
        start, end = (start % num_layers if start < 0 else start), (end % num_layers if end < 0 else end)
        if not 0 <= start <= end < num_layers:
            raise AdapterError(f"freeze.layers '{part}' is outside the model's layers 0-{num_layers - 1}")
        chosen.update(range(start, end + 1))
    return chosen


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()


def embeddings_tied(model: nn.Module) -> bool:
    """True if the output head shares its weight tensor with the input embeddings."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return head is not None and embed is not None and head.weight is embed.weight


def _upcast(param: nn.Parameter) -> None:
    if param.dtype in (torch.bfloat16, torch.float16):
        param.data = param.data.float()


def attach_full(model: nn.Module) -> list[str]:
    """Make every parameter trainable; returns their names (tied tensors once)."""
    for param in model.parameters():
        param.requires_grad_(True)
        _upcast(param)
    return [name for name, _ in model.named_parameters()]


def attach_freeze(
    model: nn.Module,
    *,
    last_layers: int | None = None,
    first_layers: int | None = None,
    layers: str | None = None,
    patterns: Sequence[str] = (),
    train_embeddings: bool = False,
    train_norms: bool = False,
    train_lm_head: bool = False,
) -> list[str]:
    """Freeze everything, then unfreeze the selection (a union of all the options given).

    `patterns` are regexes searched in parameter names (`re.search`). Returns the trained parameter
    names; raises `AdapterError` when the selection is empty or a pattern matches nothing.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    chosen: list[nn.Module | nn.Parameter] = []
    if last_layers or first_layers or layers:
        _, blocks = decoder_layers(model)
        count = len(blocks)
        indices: set[int] = set()
        for n, what in ((last_layers, "last_layers"), (first_layers, "first_layers")):
            if n is not None and n > count:
                raise AdapterError(f"freeze.{what}={n}, but the model has only {count} layers")
        if last_layers:
            indices.update(range(count - last_layers, count))
        if first_layers:
            indices.update(range(first_layers))
        if layers:
            indices.update(parse_layer_spec(layers, count))
        chosen += [blocks[i] for i in sorted(indices)]
    named = dict(model.named_parameters())
    for pattern in patterns:
        hits = [param for name, param in named.items() if re.search(pattern, name)]
        if not hits:
            sample = ", ".join(list(named)[:4])
            raise AdapterError(f"freeze.patterns entry '{pattern}' matches no parameter name (names look like {sample})")
        chosen += hits
    if train_embeddings:
        chosen.append(model.get_input_embeddings())
    if train_lm_head:
        head = model.get_output_embeddings()
        if head is None:
            raise AdapterError(f"freeze.train_lm_head: {type(model).__name__} has no output head")
        chosen.append(head)
    if train_norms:
        chosen += [module for module in model.modules() if _is_norm(module)]
    for item in chosen:
        for param in [item] if isinstance(item, nn.Parameter) else item.parameters():
            param.requires_grad_(True)
            _upcast(param)
    trained = [name for name, param in model.named_parameters() if param.requires_grad]
    if not trained:
        raise AdapterError(
            "freeze selects no parameters: set freeze.last_layers, first_layers, layers, patterns, "
            "train_embeddings, train_norms or train_lm_head"
        )
    return trained


def trained_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors by parameter name (a tied tensor once, under its first name)."""
    return {name: param.detach() for name, param in model.named_parameters() if param.requires_grad}


def save_freeze(model: nn.Module, out_dir: str | Path, base_model: str) -> Path:
    """Write the trained tensors and `freeze_config.json` to `out_dir`; returns the weights path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: value.contiguous().cpu() for name, value in trained_state_dict(model).items()}
    if not tensors:
        raise AdapterError("the model has no trainable parameters to save")
    config = {"method": "freeze", "base_model": base_model, "tied_embeddings": embeddings_tied(model),
              "tensors": sorted(tensors)}
    (out / FREEZE_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return save_safetensors_atomically(tensors, out / FREEZE_WEIGHTS, metadata={"format": "pt"})


def read_freeze_config(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / FREEZE_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path}: cannot read the freeze run's config ({exc})") from None
    if config.get("method") != "freeze" or not isinstance(config.get("tensors"), list):
        raise AdapterError(f"{path}: not a slimtune freeze config (needs method: freeze and a tensors list)")
    return config


def load_freeze(model: nn.Module, run_dir: str | Path) -> dict[str, Any]:
    """Copy a freeze run's trained tensors into `model` (a fresh base); returns its config.

    Every name and shape is checked before anything is written, so a bad file leaves the model unchanged.
    """
    run_dir = Path(run_dir)
    config = read_freeze_config(run_dir)
    weights = run_dir / FREEZE_WEIGHTS
    if not weights.is_file():
        raise AdapterError(f"'{run_dir}' has no {FREEZE_WEIGHTS}: the freeze run did not finish")
    tensors = load_file(str(weights))
    named = dict(model.named_parameters(remove_duplicate=False))
    unknown = sorted(set(tensors) - set(named))
    if unknown:
        raise AdapterError(f"{weights}: {len(unknown)} tensors the base model lacks (e.g. {unknown[:2]}); another base model?")
    for name, value in tensors.items():
        if tuple(value.shape) != tuple(named[name].shape):
            raise AdapterError(f"{weights}: '{name}' has shape {tuple(value.shape)}, the model needs {tuple(named[name].shape)}")
    with torch.no_grad():
        for name, value in tensors.items():
            named[name].copy_(value.to(named[name].dtype))
    return config


class FullMethod(AttachedMethod):
    """Full fine-tuning: every parameter trains."""


class FreezeMethod(AttachedMethod):
    """Freeze tuning: the parameters `attach_freeze` unfroze train, the rest stay fixed."""
