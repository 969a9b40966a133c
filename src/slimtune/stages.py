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
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.markup import escape

from slimtune.atomic import reported_write_failures
from slimtune.config import Config, TrainSettings
from slimtune.data import Dataset, load_dataset
from slimtune.errors import ConfigError, SlimtuneError
from slimtune.data.images import message_text
from slimtune.evaluate import evaluate_model, format_metrics_table
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
from slimtune.train.compile import compile_problem, compiled_layers
from slimtune.train.tuning import apply_cpu_threads
from slimtune.train.distributed import launched_world_size, peer_failures, rank_seed, resolve_mode, start_processes, stop_processes
from slimtune.train.runtime import ProcessGroupRuntime, Runtime
from slimtune.train.signals import StopRequested, requested_stop, stop_point, stop_requests
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
    distributed: str = "single"  # single | ddp | fsdp (train.distributed resolved for this many processes)


def run_tokens_per_process(checked: CheckedRun) -> int:
    """About how many tokens each process trains in the run: steps x its examples per step x the mean
    example length (what `train.compile: auto` weighs against the compile time)."""
    train = checked.cfg.train
    mean_length = checked.train_set.num_tokens / max(len(checked.train_set), 1)
    return round(checked.steps * train.batch_size * train.grad_accum * mean_length)


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
                                      cfg.data.image_max_pixels,
                                      note=lambda text: console.print(escape(text), highlight=False, soft_wrap=True))
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
    mode, more = resolve_mode(cfg.train.distributed, method.shards_with_fsdp, cfg.train.optimizer, skeleton,
                              cfg.quantized, cfg.train.device, launched_world_size())
    problems += more + output_problems(cfg)
    if problem := compile_problem(cfg.train.compile, resolve_device(cfg.train.device), mode):
        problems.append(f"train.compile: {problem}")
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
                      resume_from, skeleton, mode)


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


def build_run(checked: CheckedRun, console: Console, stack: ExitStack, runtime: Runtime | None = None) -> BuiltRun:
    """The build stage. Model preparation registered on `stack` is undone when the run ends, however.

    With several processes (`runtime`), every process builds the same model from the same seed; the
    loop wraps it in DDP or FSDP2. Each process then reseeds by its rank, so dropout draws differ."""
    cfg, device = checked.cfg, checked.device
    runtime = runtime or Runtime(device)
    if runtime.is_main:
        prepare_output(cfg)
    runtime.barrier()  # the others start once process 0 has prepared the output
    seed_everything(cfg.train.seed)
    _tune_heap(cfg.train, device, console)
    if device.type == "cpu":
        stack.callback(torch.set_num_threads, torch.get_num_threads())
        apply_cpu_threads(cfg.train.threads, runtime.world_size)
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
    lengths = sorted(len(example.input_ids) for example in checked.train_set.examples)
    row_length = lengths[len(lengths) // 2] if lengths else cfg.data.max_length  # the median row
    attention_length = checked.method.attention_length(cfg, row_length)
    packing = stack.enter_context(slimtune_attention(model, cfg.train, console, attention_length))
    if cfg.train.fused_ops:
        fuse_modules(model)
    seed_everything(cfg.train.seed)  # the method's initialisation draws from the seed alone
    attached = checked.method.attach(model, cfg, console)
    if runtime.world_size > 1:
        seed_everything(rank_seed(cfg.train.seed, runtime.rank))
    return BuiltRun(checked, model, attached, base_model, precision, packing, runtime)


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


def _finish_hint(out: Path) -> str:
    return f"rerun with resume=true: the final checkpoint in {out / CHECKPOINTS} holds the trained weights"


def _write_routing_signature(built: BuiltRun, console: Console) -> list[str]:
    """The run's routing signature (slimtune.routing) from its training prompts on the base view; a failure
    only warns, since the trained weights still have to be written."""
    from slimtune.routing import SIGNATURE_NAME, build_signature

    checked = built.checked
    try:
        with built.attached.base_view() as base:
            was_training = base.training
            base.eval()
            try:
                signature = build_signature(base, checked.tokenizer, checked.train_set.conversations, checked.cfg.model)
            finally:
                base.train(was_training)
        signature.save(checked.cfg.output)
    except Exception as exc:  # noqa: BLE001 - optional output; the weights matter more
        console.print(f"[yellow]warning:[/yellow] routing signature not written ({escape(str(exc))}); compute it later "
                      f"with `slimtune signature {escape(str(checked.cfg.output))}`", highlight=False)
        return []
    return [SIGNATURE_NAME]


def finish_run(built: BuiltRun, summary: TrainSummary, console: Console) -> TrainResult:
    """The finish stage: evaluation, report, pictures, then the method's files (weights last).

    A signal during evaluation stops it (the final checkpoint holds everything; resume=true finishes the
    run); one during the writes lets them complete. A failed write is one line naming the fix."""
    checked, cfg, out = built.checked, built.checked.cfg, built.checked.cfg.output
    built.runtime.unshard()  # FSDP2: every process gathers the whole model; from here on process 0 works alone
    if not built.runtime.is_main:
        return TrainResult(out, summary.steps, summary.examples, summary.tokens, summary.seconds, built.precision,
                           built.packing)
    base_metrics: dict[str, float] = {}
    tuned_metrics: dict[str, float] = {}
    report: dict[str, Any] = {"model": cfg.model, "steps": summary.steps, "train_tokens_per_s": summary.tokens_per_s}
    if checked.eval_set is not None:
        try:
            base_metrics, tuned_metrics, base_replies, tuned_replies = _evaluate(built, console)
        except StopRequested as stopped:
            raise StopRequested(f"{stopped}; {_finish_hint(out)}", resumable=True) from None
        report.update(base=base_metrics, tuned=tuned_metrics, generations=[
            {"prompt": conv[-2]["content"], "reference": message_text(conv[-1]), "base": b, "tuned": t}
            for conv, b, t in zip(checked.eval_set.conversations, base_replies, tuned_replies)
        ])
        console.print("[bold]evaluation on data.eval[/bold]")
        console.print(escape(format_metrics_table(base_metrics, tuned_metrics)), highlight=False)
    with reported_write_failures(f"the result to '{out}'", _finish_hint(out)):
        (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        plot_loss(summary.rows, out / "loss.png",
                  {"base": base_metrics["loss"], "tuned": tuned_metrics["loss"]} if tuned_metrics else None)
        pictures = checked.method.write_reports(built.attached, summary.rows, cfg, out)
        pictures += _write_routing_signature(built, console)
        # The method's weights are written last: their presence marks a finished run.
        written = checked.method.save(built.attached, checked.tokenizer, cfg, out, built.base_model, summary.steps)
    console.print(f"wrote {escape(str(out))}/ ({written}, {', '.join(pictures + ['metrics.jsonl', 'loss.png', 'eval.json'])})")
    if requested_stop():
        console.print(f"note: {requested_stop()} arrived while the result was being written; the run is complete")
    return TrainResult(out, summary.steps, summary.examples, summary.tokens, summary.seconds, built.precision,
                       built.packing, base_metrics, tuned_metrics)


def _join_processes(cfg: Config, console: Console, stack: ExitStack
                    ) -> tuple[ProcessGroupRuntime | None, Console]:
    """Under torchrun: join the process group (left when the run ends); only process 0 prints."""
    if launched_world_size() == 1:
        return None, console
    import torch.distributed as dist

    if not dist.is_initialized():  # a caller that formed the group keeps it
        start_processes(cfg.train.device, cfg.train.distributed_timeout_s)
        stack.callback(stop_processes)
    runtime = ProcessGroupRuntime(torch.device("cpu"))  # device and mode are set after the check stage
    return runtime, console if runtime.is_main else Console(quiet=True)


def _check_everywhere(cfg: Config, console: Console, runtime: ProcessGroupRuntime | None) -> CheckedRun:
    """The check stage in every process; if any finds a problem, all stop (process 0 reports its own)."""
    if runtime is None:
        return check_run(cfg, console)
    failure: ConfigError | None = None
    try:
        checked = check_run(cfg, console)
        checked.device = _process_device(checked.device)
    except ConfigError as exc:
        failure = exc
    if runtime.any(failure is not None):
        raise failure or ConfigError("another process of this run found problems before loading any weights "
                                     "(process 0 lists them)")
    return checked


def _process_device(device: torch.device) -> torch.device:
    """This process's own GPU under torchrun (cuda:LOCAL_RANK); the CPU as it is."""
    import os

    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if device.type == "cuda" else device


def finetune(cfg: Config, console: Console | None = None,
             on_trained: Callable[[TrainSummary], None] | None = None) -> TrainResult:
    """Fine-tune `cfg.model` with `cfg.method` on `cfg.data`; writes the run directory `cfg.output`.

    Everything that can be checked is checked before any weight loads or any file in `output` changes,
    so bad input fails in seconds, not after an hour, and never costs a previous run. SIGTERM / SIGINT
    anywhere stop the run at the next safe point with `StopRequested` (see train/signals.py). `on_trained`
    is called between training and the finish stage (`slimtune compare` reads the training peak there)."""
    console = console or Console(stderr=True)
    with stop_requests(), ExitStack() as stack:
        runtime, console = _join_processes(cfg, console, stack)
        stack.enter_context(peer_failures(runtime.rank if runtime else 0))
        checked = _check_everywhere(cfg, console, runtime)
        if runtime is not None:
            runtime.device, runtime.mode = checked.device, checked.distributed
            console.print(f"{runtime.world_size} processes ({checked.distributed}); train.batch_size "
                          f"{cfg.train.batch_size} per process, {cfg.train.batch_size * runtime.world_size} per micro-batch")
        again = ("resume=true continues from the checkpoint" if cfg.resume else "nothing was trained or written")
        stop_point("before loading the model", cfg.resume, again)
        built = build_run(checked, console, stack, runtime)
        stop_point("after loading the model, before training", cfg.resume, again)
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
        if built.runtime.is_main:
            with reported_write_failures(f"the run config to '{cfg.output / RUN_CONFIG}'", "run the same command again"):
                (cfg.output / RUN_CONFIG).write_text(yaml.safe_dump(cfg.to_yaml_dict(), sort_keys=False), encoding="utf-8")
        with training_mode(built.model, cfg.train, console), built.attached.training_patches(), \
                compiled_layers(built.model, cfg.train.compile, checked.device, checked.steps, checked.distributed,
                                console, tokens=run_tokens_per_process(checked), precision=built.precision):
            summary = run_training(
                built.model, built.attached, train_set, cfg.train, checked.tokenizer.pad_token_id,
                cfg.output / "metrics.jsonl", console, device=checked.device, precision=built.precision,
                packing=built.packing, checkpoint_dir=cfg.output / CHECKPOINTS, resume_from=checked.resume_from,
                config_snapshot=cfg.to_yaml_dict(), runtime=built.runtime)
        if on_trained is not None:
            on_trained(summary)
        result = finish_run(built, summary, console)
        if runtime is None or runtime.world_size == 1:
            _record_train_rate(cfg, checked, built.precision, summary, console)
        return result


def _record_train_rate(cfg: Config, checked: CheckedRun, precision: str, summary: TrainSummary,
                       console: Console) -> None:
    """After the run is saved: its rate for `slimtune plan` on this machine (plan_report.record_train_rate).
    Anything going wrong here costs the plan a measurement, never the run."""
    from slimtune.plan_report import record_train_rate

    try:
        record_train_rate(cfg, checked.train_set, checked.device.type, precision, summary.tokens, summary.seconds,
                          summary.steps)
    except Exception as exc:  # noqa: BLE001 - the run is complete; this only feeds a later estimate
        console.print(f"note: this run's training rate was not recorded for `slimtune plan` ({escape(str(exc))})")


__all__ = ["BuiltRun", "CheckedRun", "TrainResult", "build_run", "check_run", "finetune", "finish_run"]
