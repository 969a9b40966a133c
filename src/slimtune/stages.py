"""A training run in four stages: check -> build -> train -> finish.

- *check* reads no weights and touches nothing: the config (already validated), the tokenizer, every
  line of the data, the method on a weightless skeleton of the model (targets, ranks, layer
  selections), its run-length checks (AdaLoRA's schedule), trackers, the device and the output
  directory (a finished run, an unfinished run's checkpoints, resume). Every problem is reported at
  once, one line each. `slimtune plan` stops here.
- *build* prepares the output directory (only now is a previous run's file removed, and only with
  overwrite=true), loads the weights (QLoRA: streamed and quantized layer by layer on the CPU, so the
  16-bit model never exists whole), fuses, switches attention and attaches the method.
- *train* is the one loop (`train/loop.py`) through a `Runtime`.
- *finish* evaluates the base view and the tuned model, writes the report, pictures and the method's
  files, weights last.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.markup import escape
from safetensors import SafetensorError

from slimtune.config import Config, TrainSettings
from slimtune.data import Dataset, load_dataset
from slimtune.errors import ConfigError, OutputWriteError, SlimtuneError
from slimtune.evaluate import evaluate_model, format_metrics_table, message_text
from slimtune.methods.base import AttachedMethod, Method
from slimtune.methods.registry import finished_weights
from slimtune.models import load_model
from slimtune.models.loader import load_tokenizer, resolve_model
from slimtune.models.skeleton import build_skeleton
from slimtune.models.streaming import load_quantized_model
from slimtune.models.vision import processor_for, vision_problems
from slimtune.runs import CHECKPOINTS, RUN_CONFIG, output_problems, prepare_output, resume_point
from slimtune.train.checkpoint import Checkpoint
from slimtune.train.fused import fuse_modules
from slimtune.train.heap import heap_control_available, set_mmap_threshold
from slimtune.train.loop import TrainSummary, run_training, seed_everything, total_steps
from slimtune.train.metrics import plot_loss
from slimtune.train.precision import resolve_device, resolve_precision, weight_dtype
from slimtune.train.prepare import slimtune_attention, training_mode
from slimtune.train.runtime import Runtime
from slimtune.train.trackers import tracker_problems


@dataclass
class TrainResult:
    """What `finetune` produced: the run directory and the before/after evaluation."""

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


@dataclass
class CheckedRun:
    """Everything the check stage established; building needs nothing else."""

    cfg: Config
    method: Method
    tokenizer: Any
    train_set: Dataset
    eval_set: Dataset | None
    steps: int
    device: torch.device
    resume_from: Checkpoint | None
    skeleton: torch.nn.Module  # the model on the meta device with the method attached (for planning)


@dataclass
class BuiltRun:
    checked: CheckedRun
    model: torch.nn.Module
    attached: AttachedMethod
    base_model: str  # what the run's files record as their base
    precision: str
    packing: bool
    runtime: Runtime


# -- check ---------------------------------------------------------------------------------------------

def _device_problems(settings: TrainSettings) -> list[str]:
    if settings.device == "cuda" and not torch.cuda.is_available():
        return ["train.device: cuda, but this machine has no CUDA device (or this torch build has no CUDA): "
                "use train.device=auto or cpu"]
    return []


def check_run(cfg: Config, console: Console | None = None) -> CheckedRun:
    """The check stage: every problem at once, as one `ConfigError` (exit status 2); reads no weights."""
    console = console or Console(stderr=True)
    started = time.perf_counter()
    method = cfg.plugin
    problems = tracker_problems(cfg.train.report_to) + _device_problems(cfg.train)
    tokenizer = resolved = train_set = eval_set = skeleton = processor = None
    try:
        resolved = resolve_model(cfg.model)
        tokenizer = load_tokenizer(resolved, cfg.model)
        processor = processor_for(resolved, cfg.model)
    except SlimtuneError as exc:
        problems.append(str(exc))
    if resolved is not None:
        problems += vision_problems(cfg, processor is not None)
    if tokenizer is not None:
        for split, path in (("train", cfg.data.train), ("eval", cfg.data.eval)):
            if path is None:
                continue
            try:
                loaded = load_dataset(path, tokenizer, cfg.data.format, cfg.data.max_length, processor,
                                      cfg.data.image_max_pixels)
            except SlimtuneError as exc:
                problems.append(f"data.{split}: {exc}")
                continue
            train_set, eval_set = (loaded, eval_set) if split == "train" else (train_set, loaded)
    steps = total_steps(len(train_set), cfg.train) if train_set is not None else None
    if resolved is not None:
        try:
            skeleton = build_skeleton(resolved)
        except SlimtuneError as exc:
            problems.append(str(exc))
        else:
            problems += method.check(cfg, skeleton, steps if steps is not None else cfg.train.max_steps or 1,
                                     Console(quiet=True))
    problems += output_problems(cfg)
    resume_from = None
    if cfg.resume and not finished_weights(cfg.output):  # a finished run is output_problems' to report
        try:
            resume_from = resume_point(cfg)
        except SlimtuneError as exc:
            problems.append(str(exc))
    if problems:
        lines = "\n".join(f"  - {problem}" for problem in problems)
        raise ConfigError(f"{len(problems)} problem(s) found before loading any weights:\n{lines}")
    console.print(f"checked config, data, targets and output in {time.perf_counter() - started:.1f} s",
                  highlight=False)
    return CheckedRun(cfg, method, tokenizer, train_set, eval_set, steps, resolve_device(cfg.train.device),
                      resume_from, skeleton)


# -- build ---------------------------------------------------------------------------------------------

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


def build_run(checked: CheckedRun, console: Console, stack: ExitStack) -> BuiltRun:
    """The build stage. Model preparation registered on `stack` is undone when the run ends, however."""
    cfg, device = checked.cfg, checked.device
    prepare_output(cfg)
    seed_everything(cfg.train.seed)
    _tune_heap(cfg.train, device, console)
    precision = resolve_precision(cfg.train.precision, device)
    dtype = weight_dtype(precision)
    if cfg.quantized:
        # Streamed: each linear weight is quantized on the CPU as it is read, then moved to the device.
        model, _, base_model, quantized, note = load_quantized_model(cfg.model, dtype, device, dtype)
        if note:
            console.print(f"note: {escape(note)}")
        console.print(f"quantized {len(quantized)} linear layers to NF4 (double quantization, block 64)")
    else:
        model, _, base_model = load_model(cfg.model, dtype=dtype)
        model.to(device)
    packing = stack.enter_context(slimtune_attention(model, cfg.train, console))
    if cfg.train.fused_ops:
        fuse_modules(model)
    seed_everything(cfg.train.seed)  # the method's initialisation draws from the seed alone
    attached = checked.method.attach(model, cfg, console)
    return BuiltRun(checked, model, attached, base_model, precision, packing, Runtime(device))


# -- finish --------------------------------------------------------------------------------------------

def _evaluate(built: BuiltRun, console: Console) -> tuple[dict, dict, list, list]:
    checked, ev = built.checked, built.checked.cfg.eval
    args = (checked.tokenizer, checked.eval_set, ev.generations, ev.max_new_tokens, ev.batch_size, built.precision)
    console.print("evaluating the base model ...")
    with built.attached.base_view() as base_model:
        base, base_replies = evaluate_model(base_model, *args)
    console.print("evaluating the tuned model ...")
    tuned, tuned_replies = evaluate_model(built.model, *args)
    return base, tuned, base_replies, tuned_replies


def finish_run(built: BuiltRun, summary: TrainSummary, console: Console) -> TrainResult:
    """The finish stage: evaluation, report, pictures, then the method's files (weights last)."""
    checked, cfg, out = built.checked, built.checked.cfg, built.checked.cfg.output
    base_metrics: dict[str, float] = {}
    tuned_metrics: dict[str, float] = {}
    report: dict[str, Any] = {"model": cfg.model, "steps": summary.steps, "train_tokens_per_s": summary.tokens_per_s}
    if checked.eval_set is not None:
        base_metrics, tuned_metrics, base_replies, tuned_replies = _evaluate(built, console)
        report.update(base=base_metrics, tuned=tuned_metrics, generations=[
            {"prompt": conv[-2]["content"], "reference": message_text(conv[-1]), "base": b, "tuned": t}
            for conv, b, t in zip(checked.eval_set.conversations, base_replies, tuned_replies)
        ])
        console.print("[bold]evaluation on data.eval[/bold]")
        console.print(escape(format_metrics_table(base_metrics, tuned_metrics)), highlight=False)
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot_loss(summary.rows, out / "loss.png",
              {"base": base_metrics["loss"], "tuned": tuned_metrics["loss"]} if tuned_metrics else None)
    pictures = checked.method.write_reports(built.attached, summary.rows, cfg, out)
    # The method's weights are written last: their presence marks a finished run.
    try:
        written = checked.method.save(built.attached, checked.tokenizer, cfg, out, built.base_model, summary.steps)
    except (OSError, SafetensorError) as exc:
        raise OutputWriteError(
            f"could not write the result to '{out}' ({getattr(exc, 'strerror', None) or exc}); free disk space or "
            f"fix permissions, then rerun with resume=true: the final checkpoint in {out / CHECKPOINTS} holds the "
            "trained weights"
        ) from None
    console.print(f"wrote {escape(str(out))}/ ({written}, {', '.join(pictures + ['metrics.jsonl', 'loss.png', 'eval.json'])})")
    return TrainResult(out, summary.steps, summary.examples, summary.tokens, summary.seconds, built.precision,
                       built.packing, base_metrics, tuned_metrics)


def finetune(cfg: Config, console: Console | None = None) -> TrainResult:
    """Fine-tune `cfg.model` with `cfg.method` on `cfg.data`; writes the run directory `cfg.output`.

    Everything that can be checked is checked before any weight loads or any file in `output` changes,
    so bad input fails in seconds, not after an hour, and never costs a previous run."""
    console = console or Console(stderr=True)
    checked = check_run(cfg, console)
    with ExitStack() as stack:
        built = build_run(checked, console, stack)
        train_set, eval_set = checked.train_set, checked.eval_set
        console.print(
            f"slimtune: {checked.method.name} on {escape(cfg.model)}; {len(train_set)} training examples "
            f"({train_set.format}, {train_set.num_tokens:,} tokens)" + (f", {len(eval_set)} eval examples" if eval_set else "")
            + f"; {checked.device.type}, {built.precision}{', packed' if built.packing else ''}"
        )
        if checked.resume_from is not None:
            console.print(f"resuming from {escape(str(checked.resume_from.path))} (step {checked.resume_from.step})")
        trainable, total = built.attached.parameter_counts()
        console.print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
        (cfg.output / RUN_CONFIG).write_text(yaml.safe_dump(cfg.to_yaml_dict(), sort_keys=False), encoding="utf-8")
        with training_mode(built.model, cfg.train, console):
            summary = run_training(
                built.model, built.attached, train_set, cfg.train, checked.tokenizer.pad_token_id,
                cfg.output / "metrics.jsonl", console, device=checked.device, precision=built.precision,
                packing=built.packing, checkpoint_dir=cfg.output / CHECKPOINTS, resume_from=checked.resume_from,
                config_snapshot=cfg.to_yaml_dict(), runtime=built.runtime)
        return finish_run(built, summary, console)


__all__ = ["BuiltRun", "CheckedRun", "TrainResult", "build_run", "check_run", "finetune", "finish_run"]
