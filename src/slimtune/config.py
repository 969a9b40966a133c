"""Typed, validated run configuration: YAML file + `key.sub=value` overrides -> `Config`.

One place for every default. Unknown keys are errors that suggest the closest valid key, and all
problems in a file are reported at once, so a typo never costs a training run.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from slimtune.errors import ConfigError
from slimtune.methods.adalora import AdaLoraSettings
from slimtune.methods.freeze import FreezeSettings
from slimtune.methods.longlora import LongLoraSettings
from slimtune.methods.lora import LoraSettings
from slimtune.models.vision import VisionSettings
from slimtune.section import Section as _Section

# The sections that belong to methods (each defined in its method's module); a method reads some of them.
METHOD_SECTIONS = ("lora", "adalora", "freeze", "longlora")


class DataSettings(_Section):
    """Where the examples come from and how they become tokens."""

    train: Path = Field(description="JSON or JSONL file of training examples.")
    eval: Path | None = Field(None, description="Held-out examples; without it no evaluation runs.")
    format: Literal["auto", "alpaca", "sharegpt", "messages"] = Field(
        "auto", description="Row format; 'auto' detects it from the first row's keys."
    )
    max_length: int = Field(1024, gt=1, description="Examples are truncated to this many tokens.")
    image_max_pixels: int = Field(768 * 768, gt=0, description="Vision-language models: images larger than this "
                                  "many pixels (width x height) are scaled down, aspect ratio kept, before the "
                                  "processor sees them.")


class TrainSettings(_Section):
    """The one training loop's knobs."""

    epochs: int = Field(1, gt=0, description="Passes over the training data (ignored if max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps to run; overrides epochs.")
    batch_size: int = Field(4, gt=0, description="Examples per micro-batch.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay on adapter matrices.")
    optimizer: Literal["adamw", "adamw8bit"] = Field(
        "adamw", description="adamw: fp32 moments; adamw8bit: moments in 8-bit blocks (~2 bytes/param instead of 8).")
    offload_optimizer: bool = Field(False, description="Keep the optimizer's moments in CPU memory (pinned on "
                                    "CUDA) and stream them to the device per parameter.")
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="Fraction of steps with linear warmup.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="LR decay after warmup.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm; null = off.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seeds adapter init, dropout and data order (0 to 2**32-1, "
                      "the range NumPy's generator takes).")
    grad_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    checkpoint_fraction: float = Field(1.0, gt=0, le=1, description="With grad_checkpointing: the fraction of "
                                       "decoder layers recomputed, spread evenly; memory and time fall between no "
                                       "checkpointing and all layers (measured in the README).")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="bf16: base weights stored in bf16, adapters/optimizer fp32, bf16 autocast. "
        "auto: bf16 where the hardware has fast bf16 matmuls (CUDA, AVX512-BF16/AMX CPUs), else fp32.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA if available, else CPU.")
    packing: bool = Field(False, description="Pack each micro-batch into one row without padding; attention "
                          "stays within each example. Off by default: on 2-core CPUs it measured from within a "
                          "few percent of length-grouped padded batches to ~11% slower (one attention call per "
                          "example; bench/train_speed.py, slimtune vs slimtune-packed).")
    group_by_length: bool = Field(True, description="Without packing: batch examples of similar length.")
    pad_to_multiple_of: int = Field(8, ge=1, description="Round the padded batch width (with packing: the packed "
                                    "row, by a padding segment of its own) up to a multiple of this. Fewer distinct "
                                    "tensor sizes let the CPU allocator reuse freed memory (measured: ~100 MB lower "
                                    "peak RSS padded, ~230 MB packed, at 4 x 110 tokens); 1 pads to the longest "
                                    "example only (packed: no padding).")
    mmap_threshold_mb: float | None = Field(
        4, gt=0, le=32, description="CPU, glibc: allocations of this many MiB or more get their own memory map, "
        "returned to the system when freed, instead of coming from the heap, where the holes they leave stay "
        "resident (measured: ~70 MB lower peak RSS on the bundled model, no measurable speed cost). "
        "Process-wide, set when training starts; null keeps glibc's own threshold, which grows to 32 MiB.")
    trim_memory: bool = Field(False, description="CPU, glibc: after every optimizer step hand the heap's free "
                              "pages back to the system (malloc_trim). Lower peak RSS, slightly slower steps.")
    fused_ops: bool = Field(True, description="Fused RMSNorm and SwiGLU (Llama-style models) for training.")
    compile: Literal["auto", "true", "false"] = Field(
        "auto", description="torch.compile each decoder layer for training (regional: one compile per layer class, "
        "dynamic shapes). auto: only where it measurably pays back its compile time (see the README); true needs a "
        "C++ compiler on CPU, triton on CUDA.")
    attention_precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="CPU, bf16 training: the attention maths in fp32 (bf16 memory) or bf16. auto: whichever "
        "is faster on this machine, measured once and cached under $SLIMTUNE_HOME.")
    threads: int | None = Field(None, gt=0, le=4096, description="CPU threads for training; null: the count measured "
                                "fastest on this machine (cached under $SLIMTUNE_HOME).")
    loss_chunk: int = Field(1024, gt=0, description="Tokens per chunk of the LM head + cross-entropy.")
    log_every: int = Field(1, gt=0, description="Write a metrics.jsonl row every N optimizer steps.")
    save_every: int | None = Field(100, gt=0, description="Checkpoint every N steps (and at the end); null = only at the end.")
    keep_checkpoints: int = Field(2, gt=0, description="Keep the newest N checkpoints.")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="Trackers that get every metrics row besides metrics.jsonl: tensorboard "
        "(event files in <output>/tensorboard), wandb, mlflow (each needs its package; their own environment "
        "variables choose offline modes).")
    on_nan: Literal["stop", "skip"] = Field(
        "stop", description="Non-finite loss or gradients: stop with a diagnostic, or skip the step.")
    distributed: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="Under torchrun (several processes): ddp keeps the whole model on every process; fsdp "
        "shards parameters, gradients and optimizer moments over processes (FSDP2, per decoder layer); auto: ddp "
        "when the model fits each device, else fsdp. train.batch_size is per process.")
    distributed_timeout_s: float = Field(
        900, gt=0, description="Under torchrun: how long a process waits for the others in a collective before the "
        "run stops with an error (a process that died or hangs).")

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_from_bool(cls, value: Any) -> Any:
        """YAML and the command line read `true` / `false` as booleans."""
        return ("true" if value else "false") if isinstance(value, bool) else value


class EvalSettings(_Section):
    """Evaluation on `data.eval` before and after training."""

    generations: int = Field(8, ge=0, description="Greedy generations shown side by side (base vs tuned).")
    max_new_tokens: int = Field(64, gt=0, description="Token limit for each generation.")
    batch_size: int = Field(8, gt=0, description="Examples per evaluation batch.")


class Config(_Section):
    """A whole run. See the README's config reference for every key."""

    model: str = Field("smollm2-135m", description="Base model: alias, HF directory, .gguf file or hub id.")
    method: str = Field(
        "lora", description="Fine-tuning method: lora (lora.*), qlora (LoRA on a base frozen in 4-bit NF4), "
        "dora (LoRA with a learned magnitude), adalora (adalora.*: adaptive rank allocation), freeze (freeze.*: "
        "train a chosen subset), full (every parameter), longlora (longlora.*: extend the context with S2-Attn and "
        "interpolated RoPE).")
    quantize: Literal["none", "nf4"] = Field(
        "none", description="nf4: freeze the base's linear layers (not the LM head) in 4-bit NormalFloat with "
        "double quantization, block 64. A PEFT-style alias: method: lora with quantize: nf4 is method: qlora; "
        "adalora accepts it too.")
    output: Path = Field(Path("runs/run"), description="Run directory for adapter files, metrics and eval.")
    overwrite: bool = Field(False, description="Replace a finished run, or an unfinished run's checkpoints, "
                            "already in `output`.")
    resume: bool = Field(False, description="Continue from the newest complete checkpoint in `output`.")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    adalora: AdaLoraSettings = Field(default_factory=AdaLoraSettings)
    freeze: FreezeSettings = Field(default_factory=FreezeSettings)
    longlora: LongLoraSettings = Field(default_factory=LongLoraSettings)
    data: DataSettings
    train: TrainSettings = Field(default_factory=TrainSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    vision: VisionSettings = Field(default_factory=VisionSettings)

    @field_validator("model")
    @classmethod
    def _model_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a model, e.g. 'smollm2-135m' or a HF model directory")
        if "\0" in value:
            raise ValueError("a model name or path cannot hold a NUL byte")
        return os.path.expanduser(value) if value.startswith("~") else value  # a path in the home directory

    @field_validator("method")
    @classmethod
    def _method_known(cls, value: str) -> str:
        from slimtune.methods.registry import METHODS

        if value not in METHODS:
            raise ValueError(f"unknown method '{value}': choose one of {', '.join(METHODS)}")
        return value

    @model_validator(mode="after")
    def _fits_method(self) -> "Config":
        """Checks across sections, every problem at once (one line each)."""
        self.plugin.apply_defaults(self)
        problems = self._unread_keys() + self._quantize_problems() + self.plugin.config_problems(self)
        if problems:
            raise ValueError("\n  - ".join(problems))
        return self

    def _unread_keys(self) -> list[str]:
        """A key the method does not read is an error naming what it reads (and its equivalent, if any)."""
        plugin = self.plugin
        problems = []
        for section in METHOD_SECTIONS:
            given = sorted(getattr(self, section).model_fields_set)
            read = plugin.sections.get(section, ()) if section in plugin.sections else ()
            if section in plugin.sections and read is None:
                continue
            for key in given:
                if key in read:
                    continue
                dotted = f"{section}.{key}"
                hint = plugin.equivalents.get(dotted)
                reads = ", ".join(f"{name}.*" if keys is None else ", ".join(f"{name}.{k}" for k in keys)
                                  for name, keys in plugin.sections.items()) or "no method section"
                problems.append(f"{dotted} does not apply to method: {self.method}"
                                + (f" (use {hint})" if hint else "") + f"; it reads {reads}")
        return problems

    def _quantize_problems(self) -> list[str]:
        plugin = self.plugin
        if self.quantize == "nf4" and not (plugin.accepts_quantized_base or plugin.quantized_base):
            what = "trains base weights" if plugin.trains_base_weights else "does not support a 4-bit base yet"
            return [f"quantize: nf4 freezes the base in 4 bits, but method: {self.method} {what}; "
                    "use method: qlora (or lora, adalora with quantize: nf4)"]
        if self.method == "qlora" and self.lora.use_dora:
            return ["DoRA on a 4-bit base is not supported yet: use method: qlora without lora.use_dora, "
                    "or method: dora without quantize"]
        return []

    @property
    def method_name(self) -> str:
        """The method after PEFT-style aliases: lora + lora.use_dora is dora, lora + quantize: nf4 is qlora."""
        if self.method == "lora" and self.lora.use_dora:
            return "dora"
        if self.method == "lora" and self.quantize == "nf4":
            return "qlora"
        return self.method

    @property
    def plugin(self):
        """The `Method` plugin that runs this config (methods/registry.py)."""
        from slimtune.methods.registry import get_method

        return get_method(self.method_name)

    @property
    def quantized(self) -> bool:
        """True when the base's linear layers are frozen in NF4 (method qlora or quantize: nf4)."""
        return self.plugin.quantized_base or self.quantize == "nf4"

    @property
    def uses_dora(self) -> bool:
        return self.method_name == "dora"

    def to_yaml_dict(self) -> dict[str, Any]:
        """The resolved config as plain YAML-able data (paths as strings), with only the method sections
        and keys that the method reads, so that the file reads back as the same config."""
        data = self.model_dump(mode="json")
        sections = self.plugin.sections
        for section in METHOD_SECTIONS:
            if section not in sections:
                del data[section]
            elif sections[section] is not None:
                data[section] = {key: data[section][key] for key in sections[section]}
        return data


def drop_unread_sections(data: dict[str, Any]) -> dict[str, Any]:
    """A saved run's config without the method keys its method does not read (older runs saved every
    section), so it validates under today's per-method rules."""
    from slimtune.methods.registry import METHODS

    plugin = METHODS.get(data.get("method", "lora"))
    if plugin is None:
        return data
    data = dict(data)
    for section in METHOD_SECTIONS:
        if section not in plugin.sections:
            data.pop(section, None)
        elif plugin.sections[section] is not None and isinstance(data.get(section), dict):
            data[section] = {k: v for k, v in data[section].items() if k in plugin.sections[section]}
    return data


def _valid_keys(section: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of a section, nested ones included."""
    keys = []
    for name, field in section.model_fields.items():
        keys.append(prefix + name)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_valid_keys(annotation, prefix + name + "."))
    return keys


def _first_required_key(key: str) -> str:
    """A missing section is named by the key inside it without a default ('data' -> 'data.train'):
    `key=VALUE` only works for that leaf key."""
    section: Any = Config
    for part in key.split("."):
        field = getattr(section, "model_fields", {}).get(part)
        section = field.annotation if field is not None else None
    while isinstance(section, type) and issubclass(section, BaseModel):
        required = [name for name, field in section.model_fields.items() if field.is_required()]
        if not required:
            break
        key, section = f"{key}.{required[0]}", section.model_fields[required[0]].annotation
    return key


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
        candidates = [k for k in _valid_keys(Config) if k.startswith(parent) and "." not in k[len(parent):]]
        close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'?" if close else "valid keys here: " + ", ".join(candidates)
        return f"unknown key '{key}': {hint}"
    if error["type"] == "missing":
        key = _first_required_key(key)
        return f"missing key '{key}': add it to the config file or pass {key}=VALUE"
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    if not key:  # a check across sections: the input is the whole config, too long to echo
        return message
    return f"{key}: {message} (got {error.get('input')!r})"


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["train.lr=1e-4", "lora.targets=[q_proj,v_proj]"]` -> nested dict; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not KEY=VALUE: write it like train.lr=1e-4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.strip().split(".")
        if not all(part.strip() for part in parts):
            raise ConfigError(f"override {item!r} has an empty part in its key: write it like train.lr=1e-4")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
            node = child
        node[parts[-1]] = value
    return tree


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def build_config(data: dict[str, Any], source: str = "config") -> Config:
    """Validate a nested dict; every problem is listed in one `ConfigError`."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        # One line per problem: a check across sections reports several at once (joined by "\n  - "),
        # and no message may break the list with a line break of its own.
        problems = [" ".join(part.split()) for e in exc.errors() for part in _describe(e).split("\n  - ")]
        lines = "\n".join(f"  - {problem}" for problem in problems)
        raise ConfigError(f"{source} has {len(problems)} problem(s):\n{lines}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config file, apply `key.sub=value` overrides (they win), validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist: pass the path of a YAML file, e.g. examples/extract.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)}); fix the syntax there") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save the file as UTF-8") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys (model:, data:, ...), got {type(data).__name__}")
    data = _deep_merge(data, parse_overrides(overrides or []))
    return build_config(data, source=str(path))
