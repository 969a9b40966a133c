"""The training loop, written once for every method.

Per optimizer step: take `grad_accum` micro-batches, count their labelled tokens N, backpropagate
sum-CE / N for each (so every response token weighs the same however the tokens fall into
micro-batches), add the method's extra loss if it has one (logged separately), clip the global
gradient norm, step AdamW and the schedule, then call the method's `on_step_end` hook (before the
gradients are cleared).

With W processes (`Runtime`), a micro-batch of batch_size examples per process is one share of a
global micro-batch of W x batch_size examples, drawn in the order one process with that batch size
would see (process r takes the r-th share), and N is summed over processes: W processes with batch b
take the same steps as one process with batch W x b.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from slimtune.config import TrainSettings
from slimtune.data import Dataset, Encoded, pad_batch
from slimtune.methods.base import AttachedMethod
from slimtune.atomic import reported_write_failures
from slimtune.errors import SlimtuneError
from slimtune.train.distributed import peer_failures
from slimtune.train.checkpoint import (
    Checkpoint, load_method_state, optimizer_tensors, restore_checkpoint, rng_state, save_checkpoint,
)
from slimtune.train.heap import release_free_memory
from slimtune.train.reporter import Reporter
from slimtune.train.runtime import Runtime
from slimtune.train.optim8bit import build_optimizer
from slimtune.train.packing import pack_examples
from slimtune.train.precision import autocast
from slimtune.train.signals import StopRequested, stop_requests
from slimtune.train.schedule import lr_multiplier, warmup_steps


@dataclass
class TrainSummary:
    steps: int
    examples: int
    tokens: int
    seconds: float
    final_loss: float
    rows: list[dict]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def total_steps(num_examples: int, settings: TrainSettings) -> int:
    if settings.max_steps is not None:
        return settings.max_steps
    return settings.epochs * math.ceil(num_examples / (settings.batch_size * settings.grad_accum))


def _length_grouped(order: list[int], dataset: Dataset, batch_size: int, generator: torch.Generator) -> list[int]:
    """Reorder so each batch holds examples of similar length (less padding), batches in random order.

    Sorting happens inside windows of 50 batches, so the data order stays random at a larger scale.
    """
    window = batch_size * 50
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        block = sorted(order[start: start + window], key=lambda i: len(dataset.examples[i].input_ids))
        batches += [block[i: i + batch_size] for i in range(0, len(block), batch_size)]
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [i for b in shuffled for i in batches[b]]


def micro_batches(dataset: Dataset, batch_size: int, seed: int, group_by_length: bool = False
                  ) -> Iterator[tuple[list[Encoded], float]]:
    """Endless shuffled micro-batches (a new permutation each epoch), with the epoch position."""
    generator = torch.Generator().manual_seed(seed)
    epoch = 0
    while True:
        order = torch.randperm(len(dataset), generator=generator).tolist()
        if group_by_length:
            order = _length_grouped(order, dataset, batch_size, generator)
        for start in range(0, len(order), batch_size):
            chunk = [dataset.examples[i] for i in order[start: start + batch_size]]
            yield chunk, epoch + (start + len(chunk)) / len(order)
        epoch += 1


def process_share(chunk: list[Encoded], rank: int, batch_size: int) -> tuple[list[Encoded], float]:
    """Process `rank`'s examples of a global micro-batch, and the weight of its loss.

    The last micro-batch of an epoch can leave a process without examples; it then runs the chunk's
    first example with weight 0, so every process takes part in the gradient reduction."""
    share = chunk[rank * batch_size: (rank + 1) * batch_size]
    return (share, 1.0) if share else (chunk[:1], 0.0)


def make_batch(examples: list[Encoded], packing: bool, pad_token_id: int, device: torch.device,
               pad_multiple: int = 1, max_width: int | None = None) -> dict:
    """A packed (one row, no padding) or padded micro-batch on `device`; see `pad_batch` for the widths."""
    batch = (pack_examples(examples, pad_multiple, pad_token_id) if packing
             else pad_batch(examples, pad_token_id, pad_multiple, max_width))
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


class TrainingInterrupted(StopRequested):
    """Training stopped on a signal after saving a checkpoint; resuming continues from it."""

    def __init__(self, step: int, signal_name: str, checkpoint: Path) -> None:
        super().__init__(f"{signal_name}: stopped after step {step}, checkpoint saved to {checkpoint}", True)
        self.step, self.checkpoint = step, checkpoint


class NonFiniteLossError(SlimtuneError):
    """The loss or the gradients stopped being finite and `train.on_nan` is 'stop'."""


def _non_finite_report(step: int, micro: list, loss_finite: bool, named: dict[str, torch.nn.Parameter]) -> str:
    bad = [name for name, p in named.items() if p.grad is not None and not torch.isfinite(p.grad).all()]
    sources = [example.source for chunk, _ in micro for example in chunk]
    what = "the loss" if not loss_finite else "the gradients"
    return (
        f"step {step}: {what} became non-finite (NaN/inf). Batch examples: {', '.join(sources[:8])}"
        + (" ..." if len(sources) > 8 else "")
        + (f". Parameters with non-finite gradients ({len(bad)}): {', '.join(bad[:5])}" if bad else "")
        + ". Try a lower train.lr, train.precision=fp32, or train.on_nan=skip to skip such steps."
    )


@dataclass
class StepResult:
    """One optimizer step's numbers, before the optimizer acts on them."""

    loss: float          # sum-CE over the step's labelled tokens / their (global) count
    extra: float         # the method's extra loss, summed over micro-batches
    grad_norm: float     # global gradient norm (before clipping)
    finite: bool


def train_step(module: torch.nn.Module, method: AttachedMethod, batches: list[dict], params: list[torch.nn.Parameter],
               settings: TrainSettings, precision: str, device: torch.device, runtime: Runtime) -> StepResult:
    """Forward and backward over one step's micro-batches, gradients averaged over processes and clipped.

    `module` is `runtime.wrap(model, ...)`: forward(batch) -> (sum-CE, count). Each micro-batch
    backpropagates weight x sum-CE / N with N the labelled tokens of the whole step summed over every
    process, so each response token weighs the same however tokens fall into micro-batches and
    processes; the method's extra loss is added per micro-batch (divided by their number) and reported
    on its own. Gradients are reduced once, with the last micro-batch."""
    label_tokens = runtime.sum(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches if b["weight"]))
    # DDP / FSDP average gradients over processes; dividing by N / world size makes that average the sum.
    per_process = max(label_tokens, 1) / runtime.world_size
    step_loss = extra_total = 0.0
    for index, batch in enumerate(batches):
        with runtime.gradient_sync(module, sync=index == len(batches) - 1):
            with autocast(precision, device):
                loss_sum, _ = module(batch)
            loss_sum = loss_sum * batch["weight"]
            loss = loss_sum / per_process
            extra = method.extra_loss()
            if extra is not None:
                extra = extra / len(batches)
                extra_total += float(extra.detach())
                loss = loss + extra
            loss.backward()
        step_loss += float(loss_sum.detach())
    step_loss = runtime.sum(step_loss) / max(label_tokens, 1)
    if settings.max_grad_norm is not None:
        grad_norm = float(runtime.full_tensor(torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)))
    else:
        grad_norm = float(runtime.full_tensor(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])))
    # isfinite, not a threshold: a NaN compares false with everything and would slip through.
    return StepResult(step_loss, extra_total, grad_norm, math.isfinite(step_loss) and math.isfinite(grad_norm))


def run_training(
    model: torch.nn.Module,
    method: AttachedMethod,
    dataset: Dataset,
    settings: TrainSettings,
    pad_token_id: int,
    metrics_path: Path,
    console: Console | None = None,
    device: torch.device = torch.device("cpu"),
    precision: str = "fp32",
    packing: bool = False,
    checkpoint_dir: Path | None = None,
    resume_from: Checkpoint | None = None,
    config_snapshot: dict | None = None,
    runtime: Runtime | None = None,
) -> TrainSummary:
    """Train `method`'s parameters on `dataset`; logs to `metrics_path` (JSONL), trackers and a progress bar.

    The model is prepared beforehand (`train/prepare.py`: packed attention when `packing`, gradient
    checkpointing, train mode). With `checkpoint_dir`, checkpoints are written every
    `settings.save_every` steps, at the end, and when SIGTERM/SIGINT arrives (then `TrainingInterrupted`
    is raised). `resume_from` restores one.
    """
    console = console or Console(stderr=True)
    runtime = runtime or Runtime(device)
    module = runtime.wrap(model, settings.loss_chunk)  # DDP / FSDP2 with several processes: before the optimizer
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    params = method.trainable_parameters()
    if not params:
        raise RuntimeError("the method exposes no trainable parameters")
    steps = total_steps(len(dataset), settings)
    warmup = warmup_steps(steps, settings.warmup_ratio)
    optimizer = build_optimizer(params, settings.optimizer, settings.lr, settings.weight_decay,
                                settings.offload_optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, steps, warmup, settings.schedule)
    )
    # The global order: what one process with batch W x batch_size would see; each process takes its share.
    batches = micro_batches(dataset, settings.batch_size * runtime.world_size, settings.seed,
                            settings.group_by_length and not packing)
    longest = max(len(example.input_ids) for example in dataset.examples)  # never pad wider than the data
    first_step, tokens_seen, examples_seen, skipped, previous_elapsed = 1, 0, 0, 0, 0.0
    if resume_from is not None:
        progress_state = restore_checkpoint(resume_from, named, optimizer, scheduler, runtime.shard_like, runtime.rank)
        method.load_state_tensors(load_method_state(resume_from))
        first_step = resume_from.step + 1
        tokens_seen, examples_seen = progress_state["tokens"], progress_state["examples"]
        skipped, previous_elapsed = progress_state["skipped"], progress_state["elapsed_s"]
        for _ in range(progress_state["micro_batches"]):  # the order is a function of the seed alone
            next(batches)
    loss_value = float("nan")
    started = time.perf_counter()

    def checkpoint(step: int) -> Path | None:
        if checkpoint_dir is None:
            return None
        # Every process takes part: sharded tensors are gathered whole, and each one's RNG state is kept.
        whole = {name: runtime.full_tensor(p) for name, p in named.items()}
        optimizer_state = optimizer_tensors(optimizer, runtime.full_tensor)
        rngs = runtime.gather(rng_state())
        if not runtime.is_main:
            return None
        progress_state = {"tokens": tokens_seen, "examples": examples_seen, "skipped": skipped,
                          "micro_batches": step * settings.grad_accum, "processes": runtime.world_size,
                          "elapsed_s": previous_elapsed + time.perf_counter() - started}
        with reported_write_failures(f"a checkpoint to {checkpoint_dir} at step {step}",
                                     "rerun with resume=true (the previous checkpoint is intact)"):
            return save_checkpoint(checkpoint_dir, step, whole, optimizer, scheduler, progress_state,
                                   config_snapshot or {}, settings.keep_checkpoints, method.state_tensors(),
                                   optimizer_state, rngs[1:])

    with reported_write_failures(f"{metrics_path}", "rerun with resume=true (the newest checkpoint is intact), "
                                 "or without it if the run has none"):
        reporter = Reporter(settings, steps, first_step, metrics_path, console, runtime, config_snapshot)
    # Failed collectives are reported inside the block, while SIGTERM (torchrun's reaction to a dead
    # process) only sets the stop flag.
    with reporter, stop_requests() as stop, peer_failures(runtime.rank):
        for step in range(first_step, steps + 1):
            micro = [next(batches) for _ in range(settings.grad_accum)]  # global micro-batches
            prepared = []
            with torch.profiler.record_function("slimtune.collate"):  # named in profiles (bench/train_speed.py)
                for chunk, _ in micro:
                    share, weight = process_share(chunk, runtime.rank, settings.batch_size)
                    batch = make_batch(share, packing, pad_token_id, device, settings.pad_to_multiple_of, longest)
                    prepared.append({**batch, "weight": weight})
            lr = optimizer.param_groups[0]["lr"]
            result = train_step(module, method, prepared, params, settings, precision, device, runtime)
            tokens_seen += sum(len(example.input_ids) for chunk, _ in micro for example in chunk)
            examples_seen += sum(len(chunk) for chunk, _ in micro)
            if result.finite:
                optimizer.step()
            elif settings.on_nan == "stop":
                raise NonFiniteLossError(_non_finite_report(step, micro, math.isfinite(result.loss), named))
            else:
                skipped += 1
            scheduler.step()
            # Before zero_grad: AdaLoRA's importance scores read the gradients of this step.
            hook_metrics = method.on_step_end(step, steps) if result.finite else {}
            optimizer.zero_grad(set_to_none=True)
            if settings.trim_memory and device.type == "cpu":
                release_free_memory()
            if result.finite:
                loss_value = result.loss
            elapsed = previous_elapsed + time.perf_counter() - started
            row = {
                "step": step, "epoch": round(micro[-1][1], 4), "loss": round(result.loss, 6), "lr": lr,
                "grad_norm": round(result.grad_norm, 6), "tokens": tokens_seen,
                "tokens_per_s": round(tokens_seen / elapsed if elapsed > 0 else 0.0, 2), "elapsed_s": round(elapsed, 3),
            }
            if device.type == "cuda":  # peak since the process started (weights, activations, optimizer)
                row["max_memory_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            if not result.finite:
                row["skipped"] = True
            if result.extra:
                row["extra_loss"] = round(result.extra, 6)
            row.update(hook_metrics)
            with reported_write_failures(f"the metrics of step {step} to {metrics_path}",
                                         "rerun with resume=true (the newest checkpoint is intact)"):
                reporter.report(step, row, result.finite)
            if runtime.any(stop.requested):
                saved = checkpoint(step)
                runtime.barrier()  # see below
                raise TrainingInterrupted(step, stop.signal_name or "signal", saved or Path("(no checkpoint dir)"))
            if reporter.checkpoint_due(step):
                checkpoint(step)
        # Every process waits here without holding the GIL, which lets gloo's worker threads release the
        # last collectives' tensors (a tensor created in Python needs the GIL for that). Otherwise a process
        # that ends at once (any but process 0, which evaluates) could free the DDP module, whose process
        # group's destructor joins those threads while holding the GIL: it hung so, forever, in 3 of 9 runs
        # of tests/train/test_distributed.py's stop-and-resume test (gloo, 2 cores). Inside the block, so
        # that a peer gone by now is one clear error too.
        runtime.barrier()
    if skipped:
        console.print(f"note: skipped {skipped} step(s) with non-finite loss or gradients (train.on_nan=skip)")
    seconds = previous_elapsed + time.perf_counter() - started
    return TrainSummary(steps, examples_seen, tokens_seen, seconds, loss_value, reporter.rows)
