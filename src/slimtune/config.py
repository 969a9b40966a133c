"""Typed, validated run configuration: YAML file + `key.sub=value` overrides -> `Config`.

One place for every default. Unknown keys are errors that suggest the closest valid key, and all
problems in a file are reported at once, so a typo never costs a training run.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
import re

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slimtune.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraSettings(_Section):
    """LoRA (Hu et al., 2021): y = W x + (alpha / r) B A x with A (r, d_in), B (d_out, r)."""

    r: int = Field(16, gt=0, description="Rank of the update B A.")
    alpha: float = Field(32.0, gt=0, description="Scale numerator: the update is multiplied by alpha / r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter's input x.")
    targets: str | list[str] = Field(
        "all-linear",
        description="Modules to adapt: 'all-linear' (every nn.Linear but the LM head), a list of names "
        "(a module matches if its path equals or ends with '.<name>'), or one regex matched against the "
        "full module path.",
    )
    rslora: bool = Field(False, description="rsLoRA: scale the update by alpha / sqrt(r) instead of alpha / r.")
    use_dora: bool = Field(False, description="DoRA: also learn a per-output magnitude m; W' = m (W + s B A) / "
                           "||W + s B A||. Same as method: dora.")
    rank_pattern: dict[str, int] = Field(
        default_factory=dict, description="Per-module rank: {regex: r}; a key matches a module path that ends "
        "with it after a '.' (PEFT's rank_pattern), e.g. {v_proj: 8}.")
    alpha_pattern: dict[str, float] = Field(
        default_factory=dict, description="Per-module alpha, matched like rank_pattern (PEFT's alpha_pattern).")

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _patterns_valid(cls, value: dict[str, float]) -> dict[str, float]:
        for key, number in value.items():
            try:
                re.compile(key)
            except re.error as exc:
                raise ValueError(f"key '{key}' is not a valid regex ({exc})") from None
            if number <= 0:
                raise ValueError(f"value for '{key}' must be > 0, got {number}")
        return value


class AdaLoraSettings(_Section):
    """AdaLoRA (Zhang et al., 2023): SVD-form updates s P diag(lambda) Q whose rank moves to the matrices
    that matter. Uses lora.targets, lora.alpha (s = alpha / init_r) and lora.dropout."""

    init_r: int = Field(12, gt=0, description="Initial rank of every adapted matrix.")
    target_r: int = Field(8, gt=0, description="Average rank per matrix after allocation: the final budget is "
                          "target_r x the number of adapted matrices.")
    tinit: int | None = Field(None, ge=0, description="Steps at the initial budget before ranks are pruned; "
                              "null = 10% of the steps.")
    tfinal: int | None = Field(None, ge=0, description="Final steps with the allocation frozen at the target budget; "
                               "null = 20% of the steps.")
    delta_t: int = Field(1, gt=0, description="Reallocate ranks every delta_t steps during the budget decay.")
    beta1: float = Field(0.85, gt=0, lt=1, description="EMA factor of the sensitivity |theta * grad|.")
    beta2: float = Field(0.85, gt=0, lt=1, description="EMA factor of the sensitivity's uncertainty.")
    orth_reg: float = Field(0.1, ge=0, description="Weight of the orthogonality penalty ||P^T P - I||^2 + "
                            "||Q Q^T - I||^2 (mean over adapted matrices), added to the loss and logged as extra_loss.")

    @model_validator(mode="after")
    def _target_within_initial(self) -> "AdaLoraSettings":
        if self.target_r > self.init_r:
            raise ValueError(f"adalora.target_r={self.target_r} exceeds adalora.init_r={self.init_r}: ranks are only "
                             "pruned, so use target_r <= init_r")
        return self


class FreezeSettings(_Section):
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


class DataSettings(_Section):
    """Where the examples come from and how they become tokens."""

    train: Path = Field(description="JSON or JSONL file of training examples.")
    eval: Path | None = Field(None, description="Held-out examples; without it no evaluation runs.")
    format: Literal["auto", "alpaca", "sharegpt", "messages"] = Field(
        "auto", description="Row format; 'auto' detects it from the first row's keys."
    )
    max_length: int = Field(1024, gt=1, description="Examples are truncated to this many tokens.")


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
    offload_optimizer: bool = Field(False, description="adamw8bit only: keep the moments in CPU memory and "
                                    "stream them to the device per parameter.")
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="Fraction of steps with linear warmup.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="LR decay after warmup.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm; null = off.")
    seed: int = Field(0, description="Seeds adapter init, dropout and data order.")
    grad_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    checkpoint_fraction: float = Field(1.0, gt=0, le=1, description="With grad_checkpointing: the fraction of "
                                       "decoder layers recomputed, spread evenly; memory and time fall between no "
                                       "checkpointing and all layers (measured in the README).")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="bf16: base weights stored in bf16, adapters/optimizer fp32, bf16 autocast. "
        "auto: bf16 where the hardware has fast bf16 matmuls (CUDA, AVX512-BF16/AMX CPUs), else fp32.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA if available, else CPU.")
    packing: bool = Field(False, description="Pack each micro-batch into one row without padding; attention "
                          "stays within each example. Off by default: on a 2-core CPU it measured within a few "
                          "percent of length-grouped padded batches (bench/train_speed.py, slimtune vs "
                          "slimtune-packed).")
    group_by_length: bool = Field(True, description="Without packing: batch examples of similar length.")
    pad_to_multiple_of: int = Field(8, ge=1, description="Without packing: round the padded batch width up to a "
                                    "multiple of this. Fewer distinct tensor sizes let the CPU allocator reuse freed "
                                    "memory (measured: ~100 MB lower peak RSS at 4 x 110 tokens); 1 pads to the "
                                    "longest example only.")
    mmap_threshold_mb: float | None = Field(
        4, gt=0, le=32, description="CPU, glibc: allocations of this many MiB or more get their own memory map, "
        "returned to the system when freed, instead of coming from the heap, where the holes they leave stay "
        "resident (measured: ~70 MB lower peak RSS on the bundled model, no measurable speed cost). "
        "Process-wide, set when training starts; null keeps glibc's own threshold, which grows to 32 MiB.")
    trim_memory: bool = Field(False, description="CPU, glibc: after every optimizer step hand the heap's free "
                              "pages back to the system (malloc_trim). Lower peak RSS, slightly slower steps.")
    fused_ops: bool = Field(True, description="Fused RMSNorm and SwiGLU (Llama-style models) for training.")
    loss_chunk: int = Field(1024, gt=0, description="Tokens per chunk of the LM head + cross-entropy.")
    log_every: int = Field(1, gt=0, description="Write a metrics.jsonl row every N optimizer steps.")
    save_every: int | None = Field(100, gt=0, description="Checkpoint every N steps (and at the end); null = only at the end.")
    keep_checkpoints: int = Field(2, gt=0, description="Keep the newest N checkpoints.")
    on_nan: Literal["stop", "skip"] = Field(
        "stop", description="Non-finite loss or gradients: stop with a diagnostic, or skip the step.")


class EvalSettings(_Section):
    """Evaluation on `data.eval` before and after training."""

    generations: int = Field(8, ge=0, description="Greedy generations shown side by side (base vs tuned).")
    max_new_tokens: int = Field(64, gt=0, description="Token limit for each generation.")
    batch_size: int = Field(8, gt=0, description="Examples per evaluation batch.")


class Config(_Section):
    """A whole run. See the README's config reference for every key."""

    model: str = Field("smollm2-135m", description="Base model: alias, HF directory, .gguf file or hub id.")
    method: Literal["lora", "qlora", "dora", "adalora", "freeze", "full"] = Field(
        "lora", description="Fine-tuning method: lora (lora.*), qlora (LoRA on a base frozen in 4-bit NF4), "
        "dora (LoRA with lora.use_dora), adalora (adalora.*: adaptive rank allocation), freeze (freeze.*: train "
        "a chosen subset), full (every parameter).")
    quantize: Literal["none", "nf4"] = Field(
        "none", description="nf4: freeze the base's linear layers (not the LM head) in 4-bit NormalFloat with "
        "double quantization, block 64 (QLoRA); method: qlora implies it.")
    output: Path = Field(Path("runs/run"), description="Run directory for adapter files, metrics and eval.")
    overwrite: bool = Field(False, description="Replace a finished run already in `output`.")
    resume: bool = Field(False, description="Continue from the newest complete checkpoint in `output`.")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    adalora: AdaLoraSettings = Field(default_factory=AdaLoraSettings)
    freeze: FreezeSettings = Field(default_factory=FreezeSettings)
    data: DataSettings
    train: TrainSettings = Field(default_factory=TrainSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)

    @field_validator("model")
    @classmethod
    def _model_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a model, e.g. 'smollm2-135m' or a HF model directory")
        return value

    @model_validator(mode="after")
    def _freeze_selects_something(self) -> "Config":
        if self.method == "freeze" and not self.freeze.selects_anything():
            raise ValueError("method: freeze needs a selection: set freeze.last_layers (e.g. 2), first_layers, "
                             "layers, patterns, train_embeddings, train_norms or train_lm_head")
        return self

    @model_validator(mode="after")
    def _quantize_fits_method(self) -> "Config":
        if self.quantized and self.method in ("freeze", "full"):
            raise ValueError(f"quantize: nf4 freezes the base in 4 bits, but method: {self.method} trains base "
                             "weights; use it with method: lora or qlora")
        if self.quantized and self.uses_dora:
            raise ValueError("DoRA on a 4-bit base is not supported yet: use method: qlora without lora.use_dora, "
                             "or dora without quantize")
        return self

    @model_validator(mode="after")
    def _adalora_options(self) -> "Config":
        if self.method != "adalora":
            return self
        unused = [key for key, value in (("lora.use_dora", self.lora.use_dora), ("lora.rslora", self.lora.rslora),
                                         ("lora.rank_pattern", self.lora.rank_pattern),
                                         ("lora.alpha_pattern", self.lora.alpha_pattern)) if value]
        if unused:
            raise ValueError(f"method: adalora allocates ranks itself and does not support {', '.join(unused)}: "
                             "remove them (adalora.init_r and adalora.target_r set the ranks)")
        return self

    @property
    def quantized(self) -> bool:
        """True when the base's linear layers are frozen in NF4 (method qlora or quantize: nf4)."""
        return self.method == "qlora" or self.quantize == "nf4"

    @property
    def uses_dora(self) -> bool:
        return self.method == "dora" or (self.method in ("lora", "qlora") and self.lora.use_dora)

    def to_yaml_dict(self) -> dict[str, Any]:
        """The resolved config as plain YAML-able data (paths as strings)."""
        return self.model_dump(mode="json")


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
            raise ConfigError(f"override '{item}' is not KEY=VALUE: write it like train.lr=1e-4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier override of '{part}'")
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
        problems = "\n".join("  - " + _describe(e) for e in exc.errors())
        raise ConfigError(f"{source} has {exc.error_count()} problem(s):\n{problems}") from None


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
