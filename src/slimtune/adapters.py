"""Adapter files in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

Key names are PEFT's: `base_model.model.<module path>.lora_A.weight` (the adapter name is not part of
the saved keys), so `PeftModel.from_pretrained(base, run_dir)` loads our files and we load PEFT's.
Only safetensors is read: a `.bin` adapter (pickle) is refused rather than unpickled.

AdaLoRA adapters use PEFT's ADALORA format: `<path>.lora_A` (Q, r x d_in), `.lora_E` (lambda, r x 1),
`.lora_B` (P, d_out x r) with only the kept triplets stored, and `rank_pattern` in the config listing,
per `<path>.lora_E`, which of the `init_r` triplets were kept. For inference they load as plain LoRA
layers: s P diag(lambda) Q = (alpha / init_r) B' A' with B' = P and A' = diag(lambda) Q, exactly, so
everything that runs a LoRA adapter (generate, eval, merge, several adapters on one base) runs them.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from slimtune.atomic import save_safetensors_atomically
from slimtune.errors import AdapterError
from slimtune.methods.lora import (
    CONFIG_NAME, WEIGHTS_NAME, AdapterLayer, DoRALinear, LoRALinear, attach_lora, lora_layers, lora_state_dict, pattern_value,
)
from slimtune.methods.targets import linear_layers, resolve_targets, short_names

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


def target_modules_for(model: nn.Module, paths: list[str]) -> list[str]:
    """Short names (`q_proj`) when they select exactly `paths` under PEFT's suffix match, else the full paths.

    A regex such as `.*layers\\.0\\.self_attn\\.q_proj` adapts a subset of the q_proj layers; writing just
    `q_proj` would make PEFT (and our own loader) adapt every q_proj.
    """
    names = short_names(paths)
    selected = {
        path for path, module in model.named_modules()
        # Every layer kind PEFT would adapt under that name (a vision model's patch embedding `proj` is a conv)
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, AdapterLayer))
        and path.rsplit(".", 1)[-1] in names
    }
    return names if selected == set(paths) else sorted(paths)


def module_paths(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Paths of the modules PEFT's `modules_to_save` entry names select: the path equals a name or ends
    with '.<name>' (a short name such as `norm` selects `model.norm`; a whole path selects itself)."""
    return [path for path, _ in model.named_modules()
            if path and any(path == name or path.endswith("." + name) for name in names)]


def modules_to_save_parameters(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Parameter]:
    """Every parameter of the `modules_to_save` modules, keyed as PEFT's files key them
    (`<module path>.<parameter>`; a tied tensor under each module that holds it)."""
    return {f"{path}.{name}": param for path in module_paths(model, names)
            for name, param in model.get_submodule(path).named_parameters()}


def save_lora_adapter(model: nn.Module, out_dir: str | Path, base_model: str, dropout: float = 0.0,
                      modules_to_save: Sequence[str] | None = None) -> Path:
    """Write the model's LoRA adapter to `out_dir` in PEFT's format; returns the weights path.

    `modules_to_save` names whole modules stored beside the adapter, as PEFT's option of that name does
    (LongLoRA's trained embeddings and norms, a vision-language model's fully trained parts): whole paths,
    or short names as PEFT matches them (`norm` selects `model.norm` only)."""
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
    # Cloned: a tied tensor (embeddings and LM head) is stored under both names, and safetensors refuses
    # two names for one storage.
    tensors.update({PEFT_PREFIX + key: value.detach().cpu().clone()
                    for key, value in modules_to_save_parameters(model, modules_to_save or ()).items()})
    config = lora_adapter_config(
        r=r, alpha=alpha, dropout=dropout, target_modules=target_modules_for(model, list(layers)), base_model=base_model,
        use_rslora=first.rslora, use_dora=isinstance(first, DoRALinear), rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    config["modules_to_save"] = list(modules_to_save or ()) or None
    # Config first, weights last and renamed into place: a weights file is never half written, and
    # its presence is what marks a finished run.
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return save_safetensors_atomically(tensors, out / WEIGHTS_NAME, metadata={"format": "pt"})


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    """Read and check `adapter_config.json`; errors name the file and the bad field. PEFT's
    `modules_to_save` (whole modules saved beside a LoRA adapter) is accepted; sharing a base with other
    adapters refuses it (methods/multi.py)."""
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"'{adapter_dir}' has no {CONFIG_NAME}: point to a run directory or a PEFT adapter directory")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise AdapterError(f"{path}: not valid JSON ({reason})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: must hold a JSON object of fields, got a {type(config).__name__}")
    if config.get("peft_type") not in ("LORA", "ADALORA"):
        raise AdapterError(f"{path}: peft_type {config.get('peft_type')!r} is not supported here "
                           "(expected 'LORA' or 'ADALORA')")
    rank_key = "r" if config["peft_type"] == "LORA" else "init_r"
    for key in (rank_key, "lora_alpha", "target_modules"):
        if key not in config:
            raise AdapterError(f"{path}: missing field '{key}'")
    unsupported = {
        key: config[key]
        for key in ("fan_in_fan_out", "layers_to_transform", "layer_replication", "exclude_modules",
                    "target_parameters", "trainable_token_indices")
        if config.get(key)
    }
    if config.get("bias", "none") != "none":
        unsupported["bias"] = config["bias"]
    if config["peft_type"] == "ADALORA" and config.get("use_dora"):
        unsupported["use_dora"] = True
    if config["peft_type"] == "ADALORA" and config.get("modules_to_save"):
        unsupported["modules_to_save"] = config["modules_to_save"]
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise AdapterError(f"{path}: '{key}' must be a mapping of module pattern -> value, got {config[key]!r}")
    if not isinstance(config.get("modules_to_save") or [], list):
        raise AdapterError(f"{path}: 'modules_to_save' must be a list of module paths, got {config['modules_to_save']!r}")
    if config.get("lora_bias"):
        unsupported["lora_bias"] = config["lora_bias"]
    if unsupported:
        raise AdapterError(f"{path}: options not supported yet: {unsupported}")
    _check_field_types(path, config, rank_key)
    return config


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_field_types(path: Path, config: dict[str, Any], rank_key: str) -> None:
    """Raise for a field of the wrong type or out of range (`"r": null`, an infinite alpha ...), so that
    nothing later computes with it."""
    problems = []
    if not _positive_int(config[rank_key]):
        problems.append(f"'{rank_key}' must be a positive integer, got {config[rank_key]!r}")
    if not _finite_number(config["lora_alpha"]):
        problems.append(f"'lora_alpha' must be a finite number, got {config['lora_alpha']!r}")
    targets = config["target_modules"]
    if not (isinstance(targets, str) and targets or isinstance(targets, list) and targets
            and all(isinstance(t, str) and t for t in targets)):
        problems.append(f"'target_modules' must be a regex string or a non-empty list of module names, got {targets!r}")
    for key in ("use_dora", "use_rslora"):
        if config.get(key) is not None and not isinstance(config[key], bool):
            problems.append(f"'{key}' must be true or false, got {config[key]!r}")
    checks = {"alpha_pattern": (_finite_number, "finite numbers")}
    if config["peft_type"] == "LORA":  # AdaLoRA's rank_pattern holds masks of kept ranks, checked by its reader
        checks["rank_pattern"] = (_positive_int, "positive integers")
    for key, (valid, what) in checks.items():
        bad = {k: v for k, v in (config.get(key) or {}).items() if not valid(v)}
        if bad:
            problems.append(f"'{key}' values must be {what}, got {bad!r}")
    if problems:
        raise AdapterError(f"{path}: {'; '.join(problems)}")


def _require_keys(weights: Path, expected: set[str], loaded: dict[str, torch.Tensor]) -> None:
    """Raise unless the file's keys are exactly `expected` (a bad file must leave the model unchanged)."""
    missing, extra = sorted(expected - set(loaded)), sorted(set(loaded) - expected)
    if missing or extra:
        raise AdapterError(
            f"{weights} does not fit the base model: {len(missing)} missing keys (e.g. {missing[:2]}), "
            f"{len(extra)} unexpected keys (e.g. {extra[:2]}); was it trained on another base model?"
        )


def read_lora_adapter(
    model: nn.Module, adapter_dir: str | Path, layers: dict[str, nn.Linear] | None = None,
) -> tuple[dict[str, Any], list[str], dict[str, torch.Tensor]]:
    """Read and check an adapter against `model` (or against `layers`, the base linear layers by path)
    without changing anything: (config, adapted paths, tensors keyed `<path>.lora_A.weight` ...), and
    the whole modules' tensors of `modules_to_save` (`<module path>.weight`)."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    weights = adapter_dir / WEIGHTS_NAME
    if not weights.is_file():
        pickled = adapter_dir / "adapter_model.bin"
        hint = " (adapter_model.bin is a pickle and is never loaded: re-save it as safetensors)" if pickled.exists() else ""
        raise AdapterError(f"'{adapter_dir}' has no {WEIGHTS_NAME}{hint}")
    tensors = load_file(str(weights))
    layers = linear_layers(model) if layers is None else layers
    if config["peft_type"] == "ADALORA":
        config, tensors = adalora_as_lora(config, tensors, resolve_targets(model, config["target_modules"], layers),
                                          layers, weights)
    r = int(config["r"])
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    use_dora = bool(config.get("use_dora"))
    paths = resolve_targets(model, config["target_modules"], layers)
    # Check every key and shape before touching the model, so a bad file leaves it unchanged.
    expected: dict[str, tuple[int, ...]] = {}
    for path in paths:
        layer_r = int(pattern_value(rank_pattern, path, r))
        expected[f"{PEFT_PREFIX}{path}.lora_A.weight"] = (layer_r, layers[path].in_features)
        expected[f"{PEFT_PREFIX}{path}.lora_B.weight"] = (layers[path].out_features, layer_r)
        if use_dora:
            expected[f"{PEFT_PREFIX}{path}.lora_magnitude_vector"] = (layers[path].out_features,)
    expected.update(_saved_module_shapes(model, config.get("modules_to_save") or []))
    # PEFT keeps the adapter name in memory ('.lora_A.default.weight') but not in files; accept both.
    loaded = {
        key.replace(".default.weight", ".weight").replace(".lora_magnitude_vector.weight", ".lora_magnitude_vector"): value
        for key, value in tensors.items()
    }
    _require_keys(weights, set(expected), loaded)
    for key, shape in expected.items():
        if tuple(loaded[key].shape) != shape:
            raise AdapterError(f"{weights}: '{key}' has shape {tuple(loaded[key].shape)}, the model needs {shape}")
        # A NaN or inf weight would make this adapter's output garbage and, in a server's mixed batch, every
        # row's (0 * NaN is NaN in the stacked matmul): refuse it here, before anything uses it.
        if loaded[key].is_floating_point() and not bool(torch.isfinite(loaded[key]).all()):
            raise AdapterError(f"{weights}: '{key}' holds non-finite values (NaN or inf): the adapter is broken; "
                               "retrain it or load an earlier checkpoint")
    return config, paths, {key[len(PEFT_PREFIX):]: value for key, value in loaded.items()}


def _saved_module_shapes(model: nn.Module, names: list[str]) -> dict[str, tuple[int, ...]]:
    """The file keys and shapes of modules saved whole (PEFT's modules_to_save)."""
    shapes = {PEFT_PREFIX + key: tuple(value.shape) for key, value in modules_to_save_parameters(model, names).items()}
    if names and not shapes:
        raise AdapterError(f"adapter modules_to_save {names} name no module of the base model: was it trained on "
                           "another base model?")
    return shapes


def load_lora_adapter(model: nn.Module, adapter_dir: str | Path) -> dict[str, Any]:
    """Attach a LoRA adapter saved by slimtune or PEFT to a fresh base model; returns its config. The whole
    modules saved beside it (PEFT's modules_to_save) are copied into the model too."""
    config, _, loaded = read_lora_adapter(model, adapter_dir)
    saved_modules = modules_to_save_parameters(model, config.get("modules_to_save") or [])
    r = int(config["r"])
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    attach_lora(model, config["target_modules"], r=r, alpha=float(config["lora_alpha"]),
                rslora=bool(config.get("use_rslora")), use_dora=bool(config.get("use_dora")), rank_pattern=rank_pattern,
                alpha_pattern=alpha_pattern)
    with torch.no_grad():
        for key, target in {**lora_state_dict(model), **saved_modules}.items():
            target.copy_(loaded[key].to(target.dtype))
    return config


def adalora_adapter_config(
    *, init_r: int, target_r: int, alpha: float, dropout: float, target_modules: list[str] | str, base_model: str,
    tinit: int, tfinal: int, delta_t: int, beta1: float, beta2: float, orth_reg: float, total_step: int,
    rank_pattern: dict[str, list[bool]],
) -> dict[str, Any]:
    """A PEFT `AdaLoraConfig` as its `to_dict()` writes it. `r` is left out: PEFT ignores it for AdaLoRA
    (and warns when it differs from its default)."""
    config = lora_adapter_config(r=init_r, alpha=alpha, dropout=dropout, target_modules=target_modules,
                                 base_model=base_model)
    del config["r"]
    config.update({
        "peft_type": "ADALORA", "init_r": init_r, "target_r": target_r, "tinit": tinit, "tfinal": tfinal,
        "deltaT": delta_t, "beta1": beta1, "beta2": beta2, "orth_reg_weight": orth_reg, "total_step": total_step,
        "rank_pattern": {f"{path}.lora_E": kept for path, kept in rank_pattern.items()},
    })
    return config


def save_adalora_adapter(model: nn.Module, out_dir: str | Path, config: dict[str, Any]) -> Path:
    """Write the model's AdaLoRA layers in PEFT's format, keeping only each layer's kept triplets.

    `config` comes from `adalora_adapter_config`; its `rank_pattern` must describe the layers' `kept` masks.
    """
    from slimtune.methods.adalora import svd_layers

    layers = svd_layers(model)
    if not layers:
        raise AdapterError("the model has no AdaLoRA layers to save")
    tensors = {}
    for path, layer in layers.items():
        kept = layer.kept.nonzero().view(-1)
        tensors[f"{PEFT_PREFIX}{path}.lora_A"] = layer.lora_A.detach()[kept]
        tensors[f"{PEFT_PREFIX}{path}.lora_E"] = layer.lora_E.detach()[kept]
        tensors[f"{PEFT_PREFIX}{path}.lora_B"] = layer.lora_B.detach()[:, kept]
    tensors = {key: value.contiguous().cpu() for key, value in tensors.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return save_safetensors_atomically(tensors, out / WEIGHTS_NAME, metadata={"format": "pt"})


def adalora_as_lora(config: dict[str, Any], tensors: dict[str, torch.Tensor], paths: list[str],
                    layers: dict[str, nn.Module], weights: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An AdaLoRA adapter as the equivalent LoRA adapter (config, tensors in LoRA's file keys).

    Per layer with kept rank k > 0: A' = diag(lambda) Q (k, d_in), B' = P (d_out, k), alpha' = alpha k / init_r,
    so that alpha' / k = alpha / init_r, AdaLoRA's scale. Layers with nothing kept are left out.
    """
    from slimtune.methods.adalora import parse_rank_pattern

    init_r, alpha = int(config["init_r"]), float(config["lora_alpha"])
    kept = parse_rank_pattern(config.get("rank_pattern") or {})
    unknown = sorted(set(kept) - set(paths))
    if unknown:
        raise AdapterError(f"{weights.parent / CONFIG_NAME}: rank_pattern names modules the adapter does not target, "
                           f"e.g. {unknown[:2]}; was it trained on another base model?")
    # PEFT keeps the adapter name in memory ('.lora_A.default') but not in files; accept both.
    loaded = {re.sub(r"\.(lora_[ABE])\.default$", r".\1", key): value for key, value in tensors.items()}
    _require_keys(weights, {f"{PEFT_PREFIX}{path}.{name}" for path in paths for name in ("lora_A", "lora_E", "lora_B")},
                  loaded)
    lora_tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for path in paths:
        rank = sum(kept[path]) if path in kept else init_r
        q, lam, p = (loaded[f"{PEFT_PREFIX}{path}.{name}"] for name in ("lora_A", "lora_E", "lora_B"))
        shapes = {"lora_A": (rank, layers[path].in_features), "lora_E": (rank, 1),
                  "lora_B": (layers[path].out_features, rank)}
        for name, tensor in (("lora_A", q), ("lora_E", lam), ("lora_B", p)):
            if tuple(tensor.shape) != shapes[name]:
                raise AdapterError(f"{weights}: '{path}.{name}' has shape {tuple(tensor.shape)}, the model and "
                                   f"rank_pattern need {shapes[name]}")
        if rank == 0:
            continue
        ranks[path] = rank
        lora_tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = q.float() * lam.float()
        lora_tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = p.float()
    if not ranks:
        raise AdapterError(f"{weights}: the AdaLoRA allocation kept no rank in any layer; the adapter changes nothing")
    r = Counter(ranks.values()).most_common(1)[0][0]
    lora_config = lora_adapter_config(
        r=r, alpha=alpha * r / init_r, dropout=float(config.get("lora_dropout") or 0.0), target_modules=list(ranks),
        base_model=config.get("base_model_name_or_path") or "",
        rank_pattern={re.escape(path): k for path, k in ranks.items() if k != r},
        alpha_pattern={re.escape(path): alpha * k / init_r for path, k in ranks.items() if k != r},
    )
    lora_config["converted_from"] = "ADALORA"
    return lora_config, lora_tensors
