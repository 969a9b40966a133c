"""The Python API: each CLI command is a thin layer over one of these functions."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.markup import escape

from slimtune.atomic import staged_directory
from slimtune.adapters import (
    CONFIG_NAME, WEIGHTS_NAME, adalora_adapter_config, load_lora_adapter, read_adapter_config, save_adalora_adapter,
    save_lora_adapter,
)
from slimtune.config import Config, EvalSettings, TrainSettings, build_config
from slimtune.data import Message, load_dataset
from slimtune.errors import AdapterError, DataError, OutputWriteError, SlimtuneError
from slimtune.evaluate import evaluate_model, format_eval_report, format_metrics_table, generate_replies
from slimtune.methods.freeze import (
    FREEZE_CONFIG, FREEZE_WEIGHTS, FreezeMethod, FullMethod, attach_freeze, attach_full, embeddings_tied, load_freeze,
    read_freeze_config, save_freeze,
)
from slimtune.methods.adalora import AdaLoRAMethod, AdaLoRASchedule, attach_adalora
from slimtune.methods.adalora_report import BUDGET_PLOT, RANK_HEATMAP, plot_budget, plot_rank_heatmap
from slimtune.methods.base import AttachedMethod
from slimtune.methods.lora import LoRAMethod, adapters_disabled, attach_lora, lora_layers, merge_and_unload
from slimtune.models import load_model
from slimtune.quant import Linear4bit, dequantize_model, quantize_model
from slimtune.train.checkpoint import Checkpoint, latest_checkpoint
from slimtune.train.heap import heap_control_available, set_mmap_threshold
from slimtune.train.loop import run_training, seed_everything, total_steps
from slimtune.train.metrics import plot_loss
from slimtune.train.fused import fuse_modules
from slimtune.train.packing import use_packed_attention
from slimtune.train.precision import resolve_device, resolve_precision, weight_dtype

RUN_CONFIG = "config.yaml"
MERGE_REPORT = "slimtune_merge.json"  # written by merge_run for a QLoRA run: merged vs 4-bit outputs
EVAL_REPORT, EVAL_METRICS = "eval_report.md", "eval_metrics.json"


@dataclass
class TrainResult:
    """What `train` produced: the run directory and the before/after evaluation."""

    output: Path
    steps: int
    examples: int
    tokens: int
    train_seconds: float
    precision: str
    packing: bool
    base: dict[str, float] = field(default_factory=dict)
    tuned: dict[str, float] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else 0.0


CHECKPOINTS = "checkpoints"
# A full fine-tuning run is a plain HF model directory; these files are what it adds.
FULL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
FULL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt")
# Any of these in `output` marks a finished run (each is written last by its method).
FINISHED_MARKERS = (WEIGHTS_NAME, FREEZE_WEIGHTS, *FULL_WEIGHTS)


def _finished(out: Path) -> bool:
    return any((out / name).exists() for name in FINISHED_MARKERS)
# Config keys whose change makes a checkpoint meaningless to continue from.
_RESUME_INSENSITIVE = {"resume", "overwrite", "output", "eval", "train.log_every", "train.save_every",
                       "train.keep_checkpoints", "train.on_nan", "train.device", "data.eval"}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _resume_point(cfg: Config) -> Checkpoint:
    """The checkpoint to resume from, after checking it fits the current config."""
    checkpoint = latest_checkpoint(cfg.output / CHECKPOINTS)
    if checkpoint is None:
        raise SlimtuneError(
            f"resume=true, but '{cfg.output / CHECKPOINTS}' holds no complete checkpoint: run without resume=true"
        )
    saved, current = _flatten(checkpoint.state.get("config", {})), _flatten(cfg.to_yaml_dict())
    changed = [
        f"{key}: {saved.get(key)!r} -> {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
        and key not in _RESUME_INSENSITIVE and key.split(".")[0] not in _RESUME_INSENSITIVE
    ]
    if changed:
        raise SlimtuneError(
            f"cannot resume from {checkpoint.path}: the config differs where it matters ({'; '.join(changed)}); "
            "restore those values, or start a new run in another output directory"
        )
    return checkpoint


def _prepare_output(cfg: Config) -> Path:
    out = cfg.output
    if _finished(out) and cfg.resume:
        raise SlimtuneError(f"resume=true, but the run in '{out}' already finished: nothing to resume")
    if _finished(out) and not cfg.overwrite:
        raise SlimtuneError(
            f"output '{out}' already holds a finished run: choose another output=..., or pass overwrite=true to replace it"
        )
    if out.exists() and not out.is_dir():
        raise SlimtuneError(f"output '{out}' exists and is not a directory: choose another output=...")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("", encoding="utf-8")
        probe.unlink()
    except OSError as exc:
        raise SlimtuneError(f"cannot write to output '{out}' ({exc.strerror}): choose a writable directory") from None
    return out


def _clear_previous_run(out: Path) -> None:
    """Remove an older run's files; called only once every check has passed, so a bad config never
    costs a finished run."""
    for name in (WEIGHTS_NAME, CONFIG_NAME, FREEZE_WEIGHTS, FREEZE_CONFIG, *FULL_WEIGHTS, *FULL_FILES, "eval.json",
                 "loss.png", "metrics.jsonl", RUN_CONFIG, EVAL_REPORT, EVAL_METRICS, RANK_HEATMAP, BUDGET_PLOT):
        (out / name).unlink(missing_ok=True)
    # Checkpoints of the old run would be pruned in step order against the new run's, or resumed from.
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)


def _print_eval(console: Console, base: dict[str, float], tuned: dict[str, float]) -> None:
    console.print("[bold]evaluation on data.eval[/bold]")
    console.print(escape(format_metrics_table(base, tuned)), highlight=False)


def attach_method(model: torch.nn.Module, cfg: Config, console: Console) -> AttachedMethod:
    """Attach `cfg.method` to `model` and return the handle the training loop uses."""
    if cfg.method == "adalora":
        ada = cfg.adalora
        attach_adalora(model, cfg.lora.targets, init_r=ada.init_r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout)
        return AdaLoRAMethod(model, init_r=ada.init_r, target_r=ada.target_r, tinit=ada.tinit, tfinal=ada.tfinal,
                             delta_t=ada.delta_t, beta1=ada.beta1, beta2=ada.beta2, orth_reg=ada.orth_reg)
    if cfg.method in ("lora", "qlora", "dora"):
        lora = cfg.lora
        attach_lora(model, lora.targets, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, rslora=lora.rslora,
                    use_dora=cfg.uses_dora, rank_pattern=lora.rank_pattern, alpha_pattern=lora.alpha_pattern)
        return LoRAMethod(cfg.method, model)
    if cfg.method == "full":
        attach_full(model)
        return FullMethod("full", model)
    settings = cfg.freeze
    attach_freeze(model, last_layers=settings.last_layers, first_layers=settings.first_layers, layers=settings.layers,
                  patterns=settings.patterns, train_embeddings=settings.train_embeddings,
                  train_norms=settings.train_norms, train_lm_head=settings.train_lm_head)
    if embeddings_tied(model) and settings.train_embeddings != settings.train_lm_head:
        console.print("note: this model ties the LM head to the input embeddings, so training one trains both")
    return FreezeMethod("freeze", model)


def adalora_config(model: torch.nn.Module, cfg: Config, base_model: str, steps: int) -> dict[str, Any]:
    """The PEFT AdaLoRA config of a trained model: settings, the resolved schedule and the kept triplets."""
    from slimtune.adapters import target_modules_for
    from slimtune.methods.adalora import svd_layers

    layers = svd_layers(model)
    ada = cfg.adalora
    plan = AdaLoRASchedule.resolve(steps, ada.tinit, ada.tfinal, ada.delta_t)
    return adalora_adapter_config(
        init_r=ada.init_r, target_r=ada.target_r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
        target_modules=target_modules_for(model, list(layers)), base_model=base_model, tinit=plan.tinit,
        tfinal=plan.tfinal, delta_t=plan.delta_t, beta1=ada.beta1, beta2=ada.beta2, orth_reg=ada.orth_reg,
        total_step=plan.total, rank_pattern={path: layer.kept.tolist() for path, layer in layers.items()})


def save_method(model: torch.nn.Module, tokenizer, cfg: Config, out: Path, base_model: str,
                steps: int | None = None) -> str:
    """Write the trained result into `out`, its weights file last; returns what was written, for the log.

    `steps` (the run's T) goes into an AdaLoRA adapter's config, with the resolved schedule."""
    if cfg.method == "adalora":
        save_adalora_adapter(model, out, adalora_config(model, cfg, base_model, steps or 1))
        return f"{WEIGHTS_NAME}, {CONFIG_NAME}, {RANK_HEATMAP}, {BUDGET_PLOT}"
    if cfg.method in ("lora", "qlora", "dora"):
        save_lora_adapter(model, out, base_model=base_model, dropout=cfg.lora.dropout)
        return f"{WEIGHTS_NAME}, {CONFIG_NAME}"
    if cfg.method == "freeze":
        save_freeze(model, out, base_model=base_model)
        return f"{FREEZE_WEIGHTS}, {FREEZE_CONFIG}"
    # full: a plain HF model directory, staged beside `out` and moved in with the weights last.
    with staged_directory(out / ".full-model") as staging:
        model.config.use_cache = True
        model.save_pretrained(staging, safe_serialization=True)
        model.config.use_cache = False
        tokenizer.save_pretrained(staging)
    staged = out / ".full-model"
    files = sorted(staged.iterdir(), key=lambda f: f.name.startswith("model"))
    for file in files:
        os.replace(file, out / file.name)
    staged.rmdir()
    return "a Hugging Face model directory (model.safetensors, config.json, tokenizer)"


def _tune_heap(settings: TrainSettings, device: torch.device, console: Console) -> None:
    """Apply train.mmap_threshold_mb before the model loads (its load and quantization allocate large
    temporaries too); say once when the allocator settings cannot take effect here."""
    if device.type != "cpu":
        return
    if not heap_control_available():
        # Only a setting the user chose is worth a note; the default threshold is a silent tuning.
        if settings.trim_memory or "mmap_threshold_mb" in settings.model_fields_set:
            console.print("note: train.mmap_threshold_mb and train.trim_memory need glibc's allocator; "
                          "this C library has none, so they have no effect")
        return
    if settings.mmap_threshold_mb is not None:
        set_mmap_threshold(int(settings.mmap_threshold_mb * 2**20))


def finetune(cfg: Config, console: Console | None = None) -> TrainResult:
    """Fine-tune `cfg.model` with `cfg.method` on `cfg.data`; writes the run directory `cfg.output`.

    Everything that can be checked (config, data, targets, output directory) is checked before the
    first training step, so bad input fails in seconds, not after an hour.
    """
    console = console or Console(stderr=True)
    out = _prepare_output(cfg)
    resume_from = _resume_point(cfg) if cfg.resume else None
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    _tune_heap(cfg.train, device, console)
    precision = resolve_precision(cfg.train.precision, device)
    model, tokenizer, resolved = load_model(cfg.model, dtype=weight_dtype(precision))
    model.to(device)
    # slimtune's attention function, packed or not: it keeps packed examples apart, and on CPU it runs
    # the attention maths in fp32, which is faster there than bf16 (train/packing.py).
    packing = use_packed_attention(model) and cfg.train.packing
    if cfg.train.fused_ops:
        fuse_modules(model)
    if cfg.train.packing and not packing:
        console.print("note: this architecture cannot use packed attention; training with padded batches")
    if cfg.quantized:
        # Explicit, before the base evaluation: the base QLoRA trains on is the 4-bit one.
        quantized = quantize_model(model, compute_dtype=weight_dtype(precision))
        console.print(f"quantized {len(quantized)} linear layers to NF4 (double quantization, block 64)")
    train_set = load_dataset(cfg.data.train, tokenizer, cfg.data.format, cfg.data.max_length)
    eval_set = load_dataset(cfg.data.eval, tokenizer, cfg.data.format, cfg.data.max_length) if cfg.data.eval else None
    console.print(
        f"slimtune: {cfg.method} on {escape(cfg.model)}; {len(train_set)} training examples ({train_set.format}, "
        f"{train_set.num_tokens:,} tokens)" + (f", {len(eval_set)} eval examples" if eval_set else "")
        + f"; {device.type}, {precision}{', packed' if packing else ''}"
    )

    base_metrics: dict[str, float] = {}
    base_replies: list[str] = []
    ev = cfg.eval
    if eval_set is not None:
        console.print("evaluating the base model ...")
        base_metrics, base_replies = evaluate_model(
            model, tokenizer, eval_set, ev.generations, ev.max_new_tokens, ev.batch_size, precision)

    seed_everything(cfg.train.seed)
    method = attach_method(model, cfg, console)
    if resume_from is None:
        _clear_previous_run(out)
    else:
        console.print(f"resuming from {escape(str(resume_from.path))} (step {resume_from.step})")
    if isinstance(method, AdaLoRAMethod):  # a schedule that does not fit the run fails now, not at step 1
        AdaLoRASchedule.resolve(total_steps(len(train_set), cfg.train), cfg.adalora.tinit, cfg.adalora.tfinal,
                                cfg.adalora.delta_t)
    trainable, total = method.parameter_counts()
    console.print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")

    (out / RUN_CONFIG).write_text(yaml.safe_dump(cfg.to_yaml_dict(), sort_keys=False), encoding="utf-8")
    summary = run_training(model, method, train_set, cfg.train, tokenizer.pad_token_id, out / "metrics.jsonl",
                           console, device=device, precision=precision, packing=packing,
                           checkpoint_dir=out / CHECKPOINTS, resume_from=resume_from,
                           config_snapshot=cfg.to_yaml_dict())

    tuned_metrics: dict[str, float] = {}
    report: dict[str, Any] = {"model": cfg.model, "steps": summary.steps, "train_tokens_per_s": summary.tokens_per_s}
    if eval_set is not None:
        console.print("evaluating the tuned model ...")
        tuned_metrics, tuned_replies = evaluate_model(
            model, tokenizer, eval_set, ev.generations, ev.max_new_tokens, ev.batch_size, precision)
        report.update(base=base_metrics, tuned=tuned_metrics, generations=[
            {"prompt": conv[-2]["content"], "reference": conv[-1]["content"], "base": b, "tuned": t}
            for conv, b, t in zip(eval_set.conversations, base_replies, tuned_replies)
        ])
        _print_eval(console, base_metrics, tuned_metrics)
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot_loss(summary.rows, out / "loss.png",
              {"base": base_metrics["loss"], "tuned": tuned_metrics["loss"]} if tuned_metrics else None)
    if isinstance(method, AdaLoRAMethod):
        plot_rank_heatmap(method.final_ranks(), cfg.adalora.init_r, out / RANK_HEATMAP)
        plot_budget(summary.rows, out / BUDGET_PLOT)
    # The adapter is written last: its presence marks a finished run.
    try:
        written = save_method(model, tokenizer, cfg, out, resolved, summary.steps)
    except OSError as exc:
        raise OutputWriteError(
            f"could not write the adapter to '{out}' ({exc.strerror or exc}); free disk space or fix permissions, "
            f"then rerun with resume=true: the final checkpoint in {out / CHECKPOINTS} holds the trained weights"
        ) from None
    console.print(f"wrote {escape(str(out))}/ ({written}, metrics.jsonl, loss.png, eval.json)")
    return TrainResult(out, summary.steps, summary.examples, summary.tokens, summary.seconds, precision, packing,
                       base_metrics, tuned_metrics)


def run_config(run_dir: str | Path) -> Config | None:
    """The resolved config a slimtune run saved, or None for a bare PEFT adapter directory."""
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        return None
    return build_config(yaml.safe_load(path.read_text(encoding="utf-8")), source=str(path))


def run_kind(run_dir: str | Path) -> str:
    """'adapter' (LoRA / DoRA, PEFT files), 'freeze' (trained tensors) or 'full' (a HF model directory)."""
    run_dir = Path(run_dir)
    if (run_dir / CONFIG_NAME).is_file():
        return "adapter"
    if (run_dir / FREEZE_CONFIG).is_file():
        return "freeze"
    if (run_dir / "config.json").is_file() and any((run_dir / name).is_file() for name in FULL_WEIGHTS):
        return "full"
    raise AdapterError(
        f"'{run_dir}' holds no finished run: expected {CONFIG_NAME} (LoRA/DoRA), {FREEZE_CONFIG} (freeze) or "
        f"config.json + model.safetensors (full); point to a finished run's output directory"
    )


def _base_model_name(run_dir: Path, model: str | None) -> str:
    cfg = run_config(run_dir)
    kind = run_kind(run_dir)
    if kind == "adapter":
        recorded = read_adapter_config(run_dir).get("base_model_name_or_path")
    else:
        recorded = read_freeze_config(run_dir).get("base_model") if kind == "freeze" else None
    base_name = model or (cfg.model if cfg else None) or recorded
    if not base_name:
        raise AdapterError(f"'{run_dir}' does not name its base model: pass --model")
    return base_name


def load_run(run_dir: str | Path, model: str | None = None):
    """(model, tokenizer) of a finished run, in eval mode.

    `run_dir` is a slimtune run (LoRA/DoRA adapter, freeze tensors or a full model) or any PEFT LoRA adapter
    directory. For adapters and freeze runs the base model is `model` if given, else the run's `model`
    key, else the base model the run's files record.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AdapterError(f"run directory '{run_dir}' does not exist: pass the `output` directory of a training run")
    kind = run_kind(run_dir)
    if kind == "full":
        base, tokenizer, _ = load_model(str(run_dir))
        return base.eval(), tokenizer
    # _base_model_name reads (and so checks) the adapter config: a bad one fails before the base loads.
    base, tokenizer, _ = load_model(_base_model_name(run_dir, model))
    cfg = run_config(run_dir)
    if cfg is not None and cfg.quantized:  # the adapter was trained on the 4-bit base: rebuild that base
        quantize_model(base, compute_dtype=torch.float32)
    if kind == "adapter":
        load_lora_adapter(base, run_dir)
    else:
        load_freeze(base, run_dir)
    base.eval()
    return base, tokenizer


def merge_run(run_dir: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Merge the run into its base and save a plain HF model directory: W' = W + s B A for LoRA,
    m (W + s B A) / ||W + s B A|| for DoRA, base + trained tensors for freeze, a copy for full."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise SlimtuneError(f"merge output '{out}' is not empty: choose a new directory")
    model, tokenizer = load_run(run_dir)
    quantized_logits = None
    if any(isinstance(m, Linear4bit) for m in model.modules()):
        # QLoRA: W' = dequantize(W_nf4) + s B A. Probe the unmerged 4-bit model first to report the change.
        probe = tokenizer("The merge check: one two three four five.", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            quantized_logits = model(input_ids=probe).logits.float()
        dequantize_model(model, torch.float32)
    merge_and_unload(model)  # a no-op for freeze and full runs: their weights already hold the result
    broken = [name for name, param in model.named_parameters() if not torch.isfinite(param).all()]
    if broken:
        raise AdapterError(f"cannot merge '{run_dir}': {len(broken)} tensors hold NaN or inf (e.g. {broken[:2]}); "
                           "the run is broken")
    report = None
    if quantized_logits is not None:
        with torch.no_grad():
            merged_logits = model(input_ids=probe).logits.float()
        report = {"source": str(run_dir), "probe_tokens": int(probe.shape[1]),
                  "max_abs_prob_diff_vs_unmerged_nf4": float(
                      (merged_logits.softmax(-1) - quantized_logits.softmax(-1)).abs().max())}
    if dtype is not None:
        model.to(dtype)
    model.config.use_cache = True
    # Written beside the target and renamed: an interrupted merge never leaves a half-written model.
    with staged_directory(out) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if report is not None:
            (staging / MERGE_REPORT).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return out


def generate(model, tokenizer, prompt: str | list[Message], max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, system: str | None = None) -> str:
    """One reply to `prompt` (a user message, or a whole conversation), greedy unless temperature > 0."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    return generate_replies(model, tokenizer, [messages], max_new_tokens, 1, temperature, top_p)[0]


def evaluate_run(run_dir: str | Path, data: str | Path | None = None, generations: int | None = None,
                 max_new_tokens: int | None = None, batch_size: int | None = None,
                 console: Console | None = None) -> dict[str, Any]:
    """Evaluate a run's base model (adapter disabled) and tuned model (base + adapter) on `data`.

    Both get the response-token loss and perplexity on every example, and greedy replies on the first
    `generations` examples scored by exact match, mean ROUGE-L F1 and corpus BLEU. `data` defaults to the
    run's `data.eval`; the other settings default to the run's `eval` section. Writes `eval_report.md`
    (metrics table, then each example with both replies) and `eval_metrics.json` into `run_dir`, and
    returns what the JSON holds. The models run in fp32, so figures do not depend on the hardware's
    bf16 path.
    """
    console = console or Console(stderr=True)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AdapterError(f"run directory '{run_dir}' does not exist: pass the `output` directory of a training run")
    cfg = run_config(run_dir)
    if data is None:
        if cfg is None or cfg.data.eval is None:
            missing = f"its {RUN_CONFIG} sets no data.eval" if cfg else f"it has no {RUN_CONFIG}"
            raise SlimtuneError(f"no evaluation data for '{run_dir}': {missing}; pass --data FILE (JSON or JSONL)")
        data, source = cfg.data.eval, f"data.eval in {run_dir / RUN_CONFIG}"
    else:
        source = "--data"
    data = Path(data)
    if not data.is_file():
        raise DataError(f"data file '{data}' ({source}) does not exist: pass an existing JSON or JSONL file with --data")
    settings = cfg.eval if cfg else EvalSettings()
    generations = settings.generations if generations is None else generations
    max_new_tokens = settings.max_new_tokens if max_new_tokens is None else max_new_tokens
    batch_size = settings.batch_size if batch_size is None else batch_size
    for name, value, least in (("generations", generations, 0), ("max_new_tokens", max_new_tokens, 1),
                               ("batch_size", batch_size, 1)):
        if value < least:
            raise SlimtuneError(f"{name} must be at least {least}, got {value}")

    model, tokenizer = load_run(run_dir)
    model.to(resolve_device("auto"))
    dataset = load_dataset(data, tokenizer, cfg.data.format if cfg else "auto", cfg.data.max_length if cfg else 1024)
    shown = min(generations, len(dataset))
    console.print(f"evaluating {escape(str(run_dir))} on {escape(str(data))}: {len(dataset)} examples, "
                  f"{shown} generations of up to {max_new_tokens} tokens")
    if lora_layers(model):
        console.print("evaluating the base model (adapter disabled) ...")
        with adapters_disabled(model):
            base, base_replies = evaluate_model(model, tokenizer, dataset, shown, max_new_tokens, batch_size)
    else:  # freeze / full: the tuned weights replaced the base ones, so load the base separately
        console.print("evaluating the base model ...")
        if run_kind(run_dir) == "full" and cfg is None:
            raise SlimtuneError(f"'{run_dir}' is a full model without {RUN_CONFIG}: nothing names its base model")
        base_model, _, _ = load_model(_base_model_name(run_dir, None))
        base_model.to(resolve_device("auto")).eval()
        base, base_replies = evaluate_model(base_model, tokenizer, dataset, shown, max_new_tokens, batch_size)
        del base_model
    console.print("evaluating the tuned model ...")
    tuned, tuned_replies = evaluate_model(model, tokenizer, dataset, shown, max_new_tokens, batch_size)

    outputs = [
        {"prompt": conversation[:-1], "reference": conversation[-1]["content"], "base": b, "tuned": t}
        for conversation, b, t in zip(dataset.conversations, base_replies, tuned_replies)
    ]
    result: dict[str, Any] = {
        "run": str(run_dir), "data": str(data), "examples": len(dataset), "generations": shown,
        "max_new_tokens": max_new_tokens, "base": base, "tuned": tuned, "outputs": outputs,
    }
    summary = (f"Data: `{data}`, {len(dataset)} examples ({base['tokens']:,} response tokens). Loss and perplexity "
               f"over all examples; exact match, ROUGE-L and BLEU on greedy replies to the first {shown} "
               f"(at most {max_new_tokens} new tokens).")
    report = format_eval_report(f"Evaluation of `{run_dir}`", summary, base, tuned, outputs)
    (run_dir / EVAL_REPORT).write_text(report, encoding="utf-8")
    (run_dir / EVAL_METRICS).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return result


__all__ = ["TrainResult", "evaluate_run", "finetune", "generate", "load_run", "merge_run", "run_config", "run_kind"]
