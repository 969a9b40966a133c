"""Adapter files in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

Key names are PEFT's: `base_model.model.<module path>.lora_A.weight` (the adapter name is not part of
the saved keys), so `PeftModel.from_pretrained(base, run_dir)` loads our files and we load PEFT's.
Only safetensors is read: a `.bin` adapter (pickle) is refused rather than unpickled.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from slimtune.atomic import save_safetensors_atomically
from slimtune.errors import AdapterError
from slimtune.methods.lora import DoRALinear, LoRALinear, attach_lora, lora_layers, lora_state_dict, pattern_value
from slimtune.methods.targets import linear_layers, resolve_targets, short_names

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def lora_adapter_config(
    *, r: int, alpha: float, dropout: float, target_modules: list[str] | str, base_model: str,
    use_rslora: bool = False, use_dora: bool = False, rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
) -> dict[str, Any]:
    """A PEFT `LoraConfig` as its `to_dict()` writes it, for a causal LM."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": target_modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": use_rslora,
        "use_dora": use_dora,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": rank_pattern or {},
        "alpha_pattern": alpha_pattern or {},
        "inference_mode": True,
        "revision": None,
    }


def _target_modules(model: nn.Module, paths: list[str]) -> list[str]:
    """Short names (`q_proj`) when they select exactly `paths` under PEFT's suffix match, else the full paths.

    A regex such as `.*layers\\.0\\.self_attn\\.q_proj` adapts a subset of the q_proj layers; writing just
    `q_proj` would make PEFT (and our own loader) adapt every q_proj.
    """
    names = short_names(paths)
    selected = {
        path for path, module in model.named_modules()
        if isinstance(module, (nn.Linear, LoRALinear)) and path.rsplit(".", 1)[-1] in names
    }
    return names if selected == set(paths) else sorted(paths)


def save_lora_adapter(model: nn.Module, out_dir: str | Path, base_model: str, dropout: float = 0.0) -> Path:
    """Write the model's LoRA adapter to `out_dir` in PEFT's format; returns the weights path."""
    layers = lora_layers(model)
    if not layers:
        raise AdapterError("the model has no LoRA layers to save")
    for flag, values in (("rslora", {layer.rslora for layer in layers.values()}),
                         ("dora", {isinstance(layer, DoRALinear) for layer in layers.values()})):
        if len(values) != 1:
            raise AdapterError(f"cannot save an adapter whose layers mix {flag} and plain LoRA: PEFT's format has one flag")
    # The most common rank / alpha is the default; layers that differ go into PEFT's rank_pattern /
    # alpha_pattern, keyed by their escaped full path so each key selects exactly one module.
    r = Counter(layer.r for layer in layers.values()).most_common(1)[0][0]
    alpha = Counter(layer.alpha for layer in layers.values()).most_common(1)[0][0]
    rank_pattern = {re.escape(path): layer.r for path, layer in layers.items() if layer.r != r}
    alpha_pattern = {re.escape(path): layer.alpha for path, layer in layers.items() if layer.alpha != alpha}
    first = next(iter(layers.values()))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {PEFT_PREFIX + key: value.contiguous().cpu() for key, value in lora_state_dict(model).items()}
    config = lora_adapter_config(
        r=r, alpha=alpha, dropout=dropout, target_modules=_target_modules(model, list(layers)), base_model=base_model,
        use_rslora=first.rslora, use_dora=isinstance(first, DoRALinear), rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    # Config first, weights last and renamed into place: a weights file is never half written, and
    # its presence is what marks a finished run.
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return save_safetensors_atomically(tensors, out / WEIGHTS_NAME, metadata={"format": "pt"})


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """Read and check `adapter_config.json`; errors name the file and the bad field."""
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"'{adapter_dir}' has no {CONFIG_NAME}: point to a run directory or a PEFT adapter directory")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path}: not valid JSON ({exc})") from None
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type {config.get('peft_type')!r} is not supported here (expected 'LORA')")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise AdapterError(f"{path}: missing field '{key}'")
    unsupported = {
        key: config[key]
        for key in ("fan_in_fan_out", "modules_to_save", "layers_to_transform", "layer_replication", "exclude_modules",
                    "target_parameters", "trainable_token_indices")
        if config.get(key)
    }
    if config.get("bias", "none") != "none":
        unsupported["bias"] = config["bias"]
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise AdapterError(f"{path}: '{key}' must be a mapping of module pattern -> value, got {config[key]!r}")
    if config.get("lora_bias"):
        unsupported["lora_bias"] = config["lora_bias"]
    if unsupported:
        raise AdapterError(f"{path}: options not supported yet: {unsupported}")
    return config


def read_lora_adapter(
    model: nn.Module, adapter_dir: str | Path, layers: dict[str, nn.Linear] | None = None
) -> tuple[dict[str, Any], list[str], dict[str, torch.Tensor]]:
    """Read and check an adapter against `model` (or against `layers`, the base linear layers by path)
    without changing anything: (config, adapted paths, tensors keyed `<path>.lora_A.weight` ...)."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    weights = adapter_dir / WEIGHTS_NAME
    if not weights.is_file():
        pickled = adapter_dir / "adapter_model.bin"
        hint = " (adapter_model.bin is a pickle and is never loaded: re-save it as safetensors)" if pickled.exists() else ""
        raise AdapterError(f"'{adapter_dir}' has no {WEIGHTS_NAME}{hint}")
    tensors = load_file(str(weights))
    r = int(config["r"])
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    use_dora = bool(config.get("use_dora"))
    layers = linear_layers(model) if layers is None else layers
    paths = resolve_targets(model, config["target_modules"], layers)
    # Check every key and shape before touching the model, so a bad file leaves it unchanged.
    expected: dict[str, tuple[int, ...]] = {}
    for path in paths:
        layer_r = int(pattern_value(rank_pattern, path, r))
        expected[f"{PEFT_PREFIX}{path}.lora_A.weight"] = (layer_r, layers[path].in_features)
        expected[f"{PEFT_PREFIX}{path}.lora_B.weight"] = (layers[path].out_features, layer_r)
        if use_dora:
            expected[f"{PEFT_PREFIX}{path}.lora_magnitude_vector"] = (layers[path].out_features,)
    # PEFT keeps the adapter name in memory ('.lora_A.default.weight') but not in files; accept both.
    loaded = {
        key.replace(".default.weight", ".weight").replace(".lora_magnitude_vector.weight", ".lora_magnitude_vector"): value
        for key, value in tensors.items()
    }
    missing = sorted(set(expected) - set(loaded))
    extra = sorted(set(loaded) - set(expected))
    if missing or extra:
        raise AdapterError(
            f"{weights} does not fit the base model: {len(missing)} missing keys (e.g. {missing[:2]}), "
            f"{len(extra)} unexpected keys (e.g. {extra[:2]}); was it trained on another base model?"
        )
    for key, shape in expected.items():
        if tuple(loaded[key].shape) != shape:
            raise AdapterError(f"{weights}: '{key}' has shape {tuple(loaded[key].shape)}, the model needs {shape}")
    return config, paths, {key[len(PEFT_PREFIX):]: value for key, value in loaded.items()}


def load_lora_adapter(model: nn.Module, adapter_dir: str | Path) -> dict[str, Any]:
    """Attach a LoRA adapter saved by slimtune or PEFT to a fresh base model; returns its config."""
    config, _, loaded = read_lora_adapter(model, adapter_dir)
    r = int(config["r"])
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    attach_lora(model, config["target_modules"], r=r, alpha=float(config["lora_alpha"]),
                rslora=bool(config.get("use_rslora")), use_dora=bool(config.get("use_dora")), rank_pattern=rank_pattern,
                alpha_pattern=alpha_pattern)
    with torch.no_grad():
        for key, target in lora_state_dict(model).items():
            target.copy_(loaded[key].to(target.dtype))
    return config
