"""LongLoRA: extending a model's context cheaply (Chen et al., 2023, arXiv:2309.12307).

Three parts, each as the paper defines it:
- Position interpolation (Chen et al., 2023, arXiv:2306.15595): rotary frequencies divided by
  factor = ceil(longlora.context / native context), i.e. RoPE sees position p as p / factor. Written into
  the model config as transformers' `rope_parameters` {rope_type: linear, factor}, so the saved run
  (config.json beside the adapter), `slimtune merge` output, generate, chat, eval and serve all use it.
- LoRA on q/k/v/o (the paper: r 8, alpha 16) plus trainable input embeddings and every norm layer
  ("LoRA+", sec. 3.3): without them LoRA alone loses most of the gain.
- S2-Attn (`methods/s2_attention.py`) while the loop trains only; everything else uses full attention.

Files: PEFT's LoRA format with the trained embeddings and norms as `modules_to_save`, plus the model's
`config.json` with the scaled RoPE. PEFT users load the base with that config:
    config = AutoConfig.from_pretrained(run_dir)
    base = AutoModelForCausalLM.from_pretrained(base_id, config=config)
    model = PeftModel.from_pretrained(base, run_dir)
The base view for evaluation turns the adapters off, puts the original embeddings and norms back and
restores the native RoPE.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field
from torch import nn

from slimtune.errors import AdapterError
from slimtune.methods.base import AttachedMethod, Method, load_base
from slimtune.methods.freeze import FrozenCopies, _is_norm, _upcast
from slimtune.methods.lora import CONFIG_NAME, WEIGHTS_NAME, LoRAMethod, attach_lora
from slimtune.section import Section
from slimtune.methods.s2_attention import family_problem, group_layout, s2_attention

if TYPE_CHECKING:
    from rich.console import Console

    from slimtune.config import Config

MODEL_CONFIG = "config.json"  # the model config with the scaled RoPE, beside the adapter
# The paper's LoRA settings, filled in where the run's lora section leaves them unset (apply_defaults).
PAPER_LORA = {"r": 8, "alpha": 16.0, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}


class LongLoraSettings(Section):
    """LongLoRA: target context, S2-Attn group size, and which base tensors train besides LoRA."""

    context: int | None = Field(None, gt=0, description="Target context length in tokens, e.g. 16384 (default: twice "
                                "the model's native context). RoPE is interpolated by ceil(context / native context); "
                                "data.max_length defaults to it when it is set.")
    group_ratio: float = Field(0.25, gt=0.0, le=1.0, description="S2-Attn group size as a fraction of the training "
                               "row length (the paper's 1/4); rounded up to an even number of tokens.")
    trainable: list[Literal["embed", "norm"]] = Field(
        default_factory=lambda: ["embed", "norm"], description="Base tensors that train besides LoRA: the input "
        "embeddings and every norm layer (the paper's LoRA+). [] trains LoRA alone.")


# -- position interpolation ------------------------------------------------------------------------

def interpolation_factor(config: Any, context: int) -> int:
    """ceil(context / native context), at least 1."""
    return max(1, math.ceil(context / config.max_position_embeddings))


def scaled_rope_parameters(config: Any, factor: int) -> dict[str, Any]:
    """The config's `rope_parameters` with linear interpolation by `factor` (Gemma-3: its full-attention
    layers only; the sliding-window layers never see far positions). An existing linear factor is
    multiplied; other RoPE types are refused."""
    rope = copy.deepcopy(config.rope_parameters)
    nested = "rope_type" not in rope  # one entry per layer type
    entry = rope["full_attention"] if nested else rope
    kind = entry.get("rope_type", "default")
    if kind not in ("default", "linear"):
        raise AdapterError(f"LongLoRA interpolates default or linear RoPE; this model uses rope_type '{kind}' "
                           f"({getattr(config, 'model_type', '?')}): choose a model with plain RoPE")
    entry["factor"] = float(entry.get("factor", 1.0) * factor)
    entry["rope_type"] = "linear"
    return rope


@dataclass
class RopeState:
    """The model's RoPE before and after interpolation: config entries and rotary modules, swappable."""

    config: Any
    original: tuple[dict[str, Any], int]  # (rope_parameters, max_position_embeddings)
    scaled: tuple[dict[str, Any], int]
    modules: list[tuple[nn.Module, str, nn.Module, nn.Module]]  # (parent, attribute, original, scaled)

    def _use(self, which: int) -> None:
        rope, positions = (self.original, self.scaled)[which]
        self.config.rope_parameters, self.config.max_position_embeddings = copy.deepcopy(rope), positions
        for parent, name, *modules in self.modules:
            setattr(parent, name, modules[which])

    @contextmanager
    def native(self) -> Iterator[None]:
        """The native RoPE inside the block (the base view)."""
        self._use(0)
        try:
            yield
        finally:
            self._use(1)


def linear_factor(rope_parameters: dict[str, Any]) -> float:
    """The linear RoPE factor `rope_parameters` records (Gemma-3: its full-attention entry); 1 for none."""
    entry = rope_parameters if "rope_type" in rope_parameters else rope_parameters.get("full_attention") or {}
    return float(entry.get("factor", 1.0)) if entry.get("rope_type") == "linear" else 1.0


def interpolate_positions(model: nn.Module, factor: int) -> RopeState:
    """Scale the model's RoPE linearly by `factor`: the config's `rope_parameters` and
    `max_position_embeddings` (native x factor) change and every rotary module is rebuilt from them, as
    loading the saved config would build it."""
    config = model.config
    original = (copy.deepcopy(config.rope_parameters), config.max_position_embeddings)
    scaled = (scaled_rope_parameters(config, factor), config.max_position_embeddings * factor)
    state = RopeState(config, original, scaled, [])
    config.rope_parameters, config.max_position_embeddings = copy.deepcopy(scaled[0]), scaled[1]
    for path, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding"):
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            buffer = next(module.buffers(), None)
            rebuilt = type(module)(module.config)
            if buffer is not None and not buffer.is_meta:
                rebuilt.to(buffer.device)
            setattr(parent, name, rebuilt)
            state.modules.append((parent, name, module, rebuilt))
    return state


# -- trainable base tensors ------------------------------------------------------------------------

def unfreeze_base_tensors(model: nn.Module, trainable: list[str]) -> list[str]:
    """Make the input embeddings ('embed') and every norm layer ('norm') trainable, upcast to fp32 (AdamW
    on bf16 loses small steps). Returns the trained parameter names."""
    chosen: list[nn.Module] = []
    if "embed" in trainable:
        chosen.append(model.get_input_embeddings())
    if "norm" in trainable:
        chosen += [module for module in model.modules() if _is_norm(module)]
    for module in chosen:
        for param in module.parameters():
            param.requires_grad_(True)
            _upcast(param)
    trained_ids = {id(p) for module in chosen for p in module.parameters()}
    return [name for name, param in model.named_parameters() if id(param) in trained_ids]


def saved_module_names(model: nn.Module, parameter_names: list[str]) -> list[str]:
    """PEFT `modules_to_save` names for the modules owning `parameter_names` (short names, e.g. `norm`,
    `input_layernorm`), plus the LM head when it is tied to the embeddings: PEFT unties them on load,
    so the head needs its own copy of the trained tensor."""
    names = sorted({name.rsplit(".", 2)[-2] for name in parameter_names})
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    if head is not None and head.weight is embed.weight and any(name.endswith("embed_tokens.weight")
                                                                    for name in parameter_names):
        names.append(next(path for path, m in model.named_modules() if m is head).rsplit(".", 1)[-1])
    return names


# -- attached --------------------------------------------------------------------------------------

class LongLoRAMethod(LoRAMethod, FrozenCopies):
    """LoRA + trained embeddings/norms + interpolated RoPE on one model; S2-Attn while training."""

    def __init__(self, name: str, model: nn.Module, originals: dict[str, torch.Tensor], rope: RopeState,
                 group_ratio: float = 0.25) -> None:
        LoRAMethod.__init__(self, name, model)  # no fully trained vision parts; its super() is FrozenCopies
        self.originals = originals
        self.rope, self.group_ratio = rope, group_ratio

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = LoRAMethod.trainable_parameters(self)
        named = dict(self.model.named_parameters())  # tied tensors once
        return params + [named[name] for name in self.originals if name in named]

    @contextmanager
    def base_view(self) -> Iterator[nn.Module]:
        """Adapters off, original embeddings and norms, native RoPE."""
        with LoRAMethod.base_view(self), FrozenCopies.base_view(self), self.rope.native():
            yield self.model

    def training_patches(self):
        return s2_attention(self.model, self.group_ratio)


class LongLoRA(Method):
    """LongLoRA: `longlora.*` plus the LoRA keys (r 8, alpha 16, q/k/v/o unless set). Files: PEFT's adapter
    with modules_to_save (embeddings, norms) + config.json with the interpolated RoPE."""

    name = "longlora"
    keeps_base_copies = True  # the embeddings' and norms' original values, for the base view
    summary = "longer context: S2-Attn training, interpolated RoPE, LoRA + embeddings + norms (longlora.*)"
    sections = {"lora": ("r", "alpha", "dropout", "targets", "rslora"), "longlora": None}
    equivalents = {"freeze.train_embeddings": "longlora.trainable", "freeze.train_norms": "longlora.trainable"}
    run_files = (CONFIG_NAME, WEIGHTS_NAME, MODEL_CONFIG)
    weights_files = (WEIGHTS_NAME,)

    def apply_defaults(self, cfg: Config) -> None:
        if cfg.longlora.context is not None and "max_length" not in cfg.data.model_fields_set:
            cfg.data.max_length = cfg.longlora.context
        for key, value in PAPER_LORA.items():
            if key not in cfg.lora.model_fields_set:
                setattr(cfg.lora, key, value)

    def config_problems(self, cfg: Config) -> list[str]:
        settings = cfg.longlora
        if settings.context is not None and cfg.data.max_length > settings.context:
            return [f"data.max_length {cfg.data.max_length} exceeds longlora.context {settings.context}: raise "
                    "longlora.context or lower data.max_length"]
        return []

    def attention_length(self, cfg: Config, row_length: int) -> int:
        return group_layout(row_length, cfg.longlora.group_ratio)[0]  # S2-Attn attends within groups

    def attach(self, model: nn.Module, cfg: Config, console: Console, quiet: bool = False) -> AttachedMethod:
        settings, lora = cfg.longlora, cfg.lora
        problem = family_problem(model.config)
        if problem:
            raise AdapterError(problem)
        attach_lora(model, lora.targets, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, rslora=lora.rslora)
        trained = unfreeze_base_tensors(model, settings.trainable)
        originals = FrozenCopies.copies(model, trained)
        native = model.config.max_position_embeddings
        context = settings.context or 2 * native  # unset: twice the native context
        factor = interpolation_factor(model.config, context)
        rope = interpolate_positions(model, factor)
        if not quiet:
            console.print(f"LongLoRA: context {context} on a model of native context {native}: RoPE "
                          f"interpolated by {factor}" + (" (none needed)" if factor == 1 else "")
                          + f"; S2-Attn groups of {settings.group_ratio:g} x the row length while training")
        return LongLoRAMethod(self.name, model, originals, rope, settings.group_ratio)

    def save(self, attached: AttachedMethod, tokenizer: Any, cfg: Config, out: Path, base_model: str,
             steps: int) -> str:
        from slimtune.adapters import save_lora_adapter

        model = attached.model
        trained = [name for name, param in model.named_parameters() if param.requires_grad and "lora_" not in name]
        saved = saved_module_names(model, trained)
        model.config.use_cache = True
        model.config.to_json_file(out / MODEL_CONFIG)
        save_lora_adapter(model, out, base_model=base_model, dropout=cfg.lora.dropout, modules_to_save=saved or None)
        return f"{WEIGHTS_NAME}, {CONFIG_NAME}, {MODEL_CONFIG} (RoPE interpolated by {linear_factor(model.config.rope_parameters):g})"

    def recognises(self, run_dir: Path) -> bool:
        from slimtune.adapters import read_adapter_config

        if not (run_dir / CONFIG_NAME).is_file() or not (run_dir / MODEL_CONFIG).is_file():
            return False
        config = read_adapter_config(run_dir)
        return config["peft_type"] == "LORA" and bool(config.get("modules_to_save"))

    def recorded_base(self, run_dir: Path) -> str | None:
        from slimtune.adapters import read_adapter_config

        return read_adapter_config(run_dir).get("base_model_name_or_path")

    def load(self, run_dir: Path, base_name: str | None, quantized: bool) -> tuple[nn.Module, Any, AttachedMethod]:
        from slimtune.adapters import load_lora_adapter, module_paths, read_adapter_config

        config = read_adapter_config(run_dir)
        saved = read_model_config(run_dir)
        model, tokenizer = load_base(base_name, quantized)
        names = config.get("modules_to_save") or []
        trained = [name for path in module_paths(model, names)
                   for name, _ in model.named_parameters() if name.startswith(path + ".")]
        originals = FrozenCopies.copies(model, list(dict.fromkeys(trained)))
        factor = linear_factor(saved.get("rope_parameters") or {}) / linear_factor(model.config.rope_parameters)
        rope = interpolate_positions(model, round(factor))
        load_lora_adapter(model, run_dir)
        return model, tokenizer, LongLoRAMethod(self.name, model, originals, rope)


def read_model_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / MODEL_CONFIG
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path}: cannot read the run's model config ({exc}); it holds the interpolated RoPE, "
                           "restore it from the run") from None

