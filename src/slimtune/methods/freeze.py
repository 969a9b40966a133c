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
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field, field_validator
from safetensors.torch import load_file
from torch import nn

from slimtune.atomic import save_safetensors_atomically
from slimtune.errors import AdapterError
from slimtune.methods.base import AttachedMethod, Method, load_base
from slimtune.section import Section

FREEZE_CONFIG = "freeze_config.json"
FREEZE_WEIGHTS = "freeze_model.safetensors"
# A full fine-tuning run is a plain HF model directory; these files are what it adds.
FULL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
FULL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt")
# Freeze tuning without a selection trains this many last decoder layers (LLaMA-Factory's default too).
DEFAULT_LAST_LAYERS = 2

if TYPE_CHECKING:
    from rich.console import Console

    from slimtune.config import Config


class FreezeSettings(Section):
    """Freeze tuning: which parameters train (the union of everything set); all others stay frozen."""

    last_layers: int | None = Field(None, gt=0, description="Train the last N decoder layers.")
    first_layers: int | None = Field(None, gt=0, description="Train the first N decoder layers.")
    layers: str | None = Field(None, description="Decoder layers to train: indices and ranges, e.g. '0-3,10' "
                               "(negative indices count from the end).")
    patterns: list[str] = Field(default_factory=list, description="Regexes searched in parameter names, e.g. "
                                "['mlp\\.down_proj'].")
    train_embeddings: bool = Field(False, description="Train the input embeddings.")
    train_norms: bool = Field(False, description="Train every norm layer (RMSNorm / LayerNorm).")
    train_lm_head: bool = Field(False, description="Train the LM head (tied to the embeddings in e.g. SmolLM2: "
                                "then both train).")

    @field_validator("layers")
    @classmethod
    def _layers_syntax(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"\s*-?\d+(\s*-\s*-?\d+)?(\s*,\s*-?\d+(\s*-\s*-?\d+)?)*\s*", value):
            raise ValueError("must list layer indices and ranges like '0-3,10'")
        return value

    @field_validator("patterns")
    @classmethod
    def _patterns_compile(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"'{pattern}' is not a valid regex ({exc})") from None
        return value

    def selects_anything(self) -> bool:
        return bool(self.last_layers or self.first_layers or self.layers or self.patterns or self.train_embeddings
                    or self.train_norms or self.train_lm_head)


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
        if not (-num_layers <= start < num_layers and -num_layers <= end < num_layers):
            # Checked before the negatives are resolved: -100 on a 30-layer model must not wrap to a real layer.
            raise AdapterError(f"freeze.layers '{part}' is outside the model's layers 0-{num_layers - 1} "
                               f"(or -{num_layers} to -1 from the end)")
        start, end = (start + num_layers if start < 0 else start), (end + num_layers if end < 0 else end)
        if start > end:
            raise AdapterError(f"freeze.layers '{part}' runs backwards: write the range from the lower layer up")
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


class FrozenCopies(AttachedMethod):
    """A method that changes base tensors in place; keeps their original values for the base view."""

    def __init__(self, name: str, model: nn.Module, originals: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__(name, model)
        self.originals = originals or {}  # parameter name -> its value before tuning (on the CPU)

    @staticmethod
    def copies(model: nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
        named = dict(model.named_parameters())
        return {name: named[name].detach().to("cpu", copy=True) for name in names if not named[name].is_meta}

    @contextmanager
    def base_view(self) -> Iterator[nn.Module]:
        named = dict(self.model.named_parameters())
        tuned = {}
        try:
            for name, original in self.originals.items():
                tuned[name] = named[name].data
                named[name].data = original.to(tuned[name].device)
            yield self.model
        finally:
            for name, data in tuned.items():
                named[name].data = data


class FreezeMethod(FrozenCopies):
    """Freeze tuning: the parameters `attach_freeze` unfroze train, the rest stay fixed."""


class FullMethod(AttachedMethod):
    """Full fine-tuning: every parameter trains. The base view loads the base model again."""

    def __init__(self, name: str, model: nn.Module, base_name: str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(name, model)
        self.base_name, self.dtype = base_name, dtype

    @contextmanager
    def base_view(self) -> Iterator[nn.Module]:
        from slimtune.models import load_model

        if not self.base_name:
            raise AdapterError("this full fine-tuning run does not name its base model (it has no config.yaml)")
        device = next(self.model.parameters()).device
        base, _, _ = load_model(self.base_name, dtype=self.dtype)
        try:
            yield base.to(device).eval()
        finally:
            del base


def _freeze_selection(settings: FreezeSettings) -> dict[str, Any]:
    return {"last_layers": settings.last_layers, "first_layers": settings.first_layers, "layers": settings.layers,
            "patterns": settings.patterns, "train_embeddings": settings.train_embeddings,
            "train_norms": settings.train_norms, "train_lm_head": settings.train_lm_head}


class Freeze(Method):
    """Freeze tuning: `freeze.*` picks what trains. Files: freeze_model.safetensors + freeze_config.json."""

    name = "freeze"
    summary = "train a chosen subset of the base (freeze.*; default: the last 2 decoder layers)"
    sections = {"freeze": None}
    equivalents = {"lora.targets": "freeze.patterns or freeze.layers"}
    trains_base_weights = True
    keeps_base_copies = True
    run_files = (FREEZE_CONFIG, FREEZE_WEIGHTS)
    weights_files = (FREEZE_WEIGHTS,)

    def attach(self, model: nn.Module, cfg: Config, console: Console, quiet: bool = False) -> AttachedMethod:
        settings = cfg.freeze
        selection = _freeze_selection(settings)
        if not settings.selects_anything():
            selection["last_layers"] = DEFAULT_LAST_LAYERS
            if not quiet:
                console.print(f"note: freeze.* selects nothing, so the last {DEFAULT_LAST_LAYERS} decoder layers "
                              "train (set freeze.last_layers, layers, patterns, ... to choose)")
        chosen = attach_freeze(model, **selection)
        originals = FrozenCopies.copies(model, chosen)
        if not quiet and embeddings_tied(model) and settings.train_embeddings != settings.train_lm_head:
            console.print("note: this model ties the LM head to the input embeddings, so training one trains both")
        return FreezeMethod(self.name, model, originals)

    def save(self, attached: AttachedMethod, tokenizer: Any, cfg: Config, out: Path, base_model: str,
             steps: int) -> str:
        save_freeze(attached.model, out, base_model=base_model)
        return f"{FREEZE_WEIGHTS}, {FREEZE_CONFIG}"

    def recognises(self, run_dir: Path) -> bool:
        return (run_dir / FREEZE_CONFIG).is_file()

    def recorded_base(self, run_dir: Path) -> str | None:
        return read_freeze_config(run_dir).get("base_model")

    def load(self, run_dir: Path, base_name: str | None, quantized: bool) -> tuple[nn.Module, Any, AttachedMethod]:
        config = read_freeze_config(run_dir)
        model, tokenizer = load_base(base_name, quantized)
        named = dict(model.named_parameters())
        originals = FrozenCopies.copies(model, [name for name in config["tensors"] if name in named])
        load_freeze(model, run_dir)
        return model, tokenizer, FreezeMethod(self.name, model, originals)


class Full(Method):
    """Full fine-tuning: every parameter trains; the run is a plain Hugging Face model directory."""

    name = "full"
    summary = "every parameter trains; the run is a Hugging Face model directory"
    equivalents = {"lora.targets": "method: freeze with freeze.patterns"}
    trains_base_weights = True
    run_files = (*FULL_WEIGHTS, *FULL_FILES)
    weights_files = FULL_WEIGHTS

    def attach(self, model: nn.Module, cfg: Config, console: Console, quiet: bool = False) -> AttachedMethod:
        dtype = next(model.parameters()).dtype  # before attach_full upcasts: the base view loads the base so
        attach_full(model)
        return FullMethod(self.name, model, cfg.model, dtype)

    def save(self, attached: AttachedMethod, tokenizer: Any, cfg: Config, out: Path, base_model: str,
             steps: int) -> str:
        from slimtune.atomic import staged_directory

        model = attached.model
        # A plain HF model directory, staged beside `out` and moved in with the weights last.
        with staged_directory(out / ".full-model") as staging:
            model.config.use_cache = True
            model.save_pretrained(staging, safe_serialization=True)
            model.config.use_cache = False
            tokenizer.save_pretrained(staging)
        staged = out / ".full-model"
        for file in sorted(staged.iterdir(), key=lambda f: f.name.startswith("model")):
            os.replace(file, out / file.name)
        staged.rmdir()
        return "a Hugging Face model directory (model.safetensors, config.json, tokenizer)"

    def recognises(self, run_dir: Path) -> bool:
        return (run_dir / "config.json").is_file() and any((run_dir / name).is_file() for name in FULL_WEIGHTS)

    def load(self, run_dir: Path, base_name: str | None, quantized: bool) -> tuple[nn.Module, Any, AttachedMethod]:
        from slimtune.models import load_model

        model, tokenizer, _ = load_model(str(run_dir))
        return model, tokenizer, FullMethod(self.name, model, base_name)
