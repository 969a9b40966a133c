"""The training loop, written once for every method.

Per optimizer step: take `grad_accum` micro-batches, count their labelled tokens N, backpropagate
sum-CE / N for each (so every response token weighs the same however the tokens fall into
micro-batches), add the method's extra loss if it has one (logged separately), clip the global
gradient norm, step AdamW and the schedule, then call the method's `on_step_end` hook.
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
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from slimtune.config import TrainSettings
from slimtune.data import Dataset, Encoded, pad_batch
from slimtune.methods.base import AttachedMethod
from slimtune.train.loss import response_loss_sum
from slimtune.train.metrics import MetricsLog
from slimtune.train.packing import pack_examples
from slimtune.train.precision import autocast
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


def make_batch(examples: list[Encoded], packing: bool, pad_token_id: int, device: torch.device) -> dict:
    """A packed (one row, no padding) or padded micro-batch on `device`."""
    batch = pack_examples(examples) if packing else pad_batch(examples, pad_token_id)
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


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
) -> TrainSummary:
    """Train `method`'s parameters on `dataset`; logs to `metrics_path` (JSONL) and a progress bar.

    `packing` needs the model switched to packed attention (`use_packed_attention`) beforehand.
    """
    console = console or Console(stderr=True)
    params = method.trainable_parameters()
    if not params:
        raise RuntimeError("the method exposes no trainable parameters")
    steps = total_steps(len(dataset), settings)
    warmup = warmup_steps(steps, settings.warmup_ratio)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, steps, warmup, settings.schedule)
    )
    if settings.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    log = MetricsLog(metrics_path)
    batches = micro_batches(dataset, settings.batch_size, settings.seed, settings.group_by_length and not packing)
    tokens_seen = examples_seen = 0
    loss_value = float("nan")
    started = time.perf_counter()

    progress = Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
        TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=console, transient=False,
    )
    with progress:
        task = progress.add_task("train", total=steps, loss="-", lr="-", tps="-")
        for step in range(1, steps + 1):
            micro = [next(batches) for _ in range(settings.grad_accum)]
            prepared = [make_batch(chunk, packing, pad_token_id, device) for chunk, _ in micro]
            label_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in prepared)
            lr = optimizer.param_groups[0]["lr"]
            step_loss = 0.0
            extra_total = 0.0
            for batch in prepared:
                with autocast(precision, device):
                    loss_sum, _ = response_loss_sum(model, batch, settings.loss_chunk)
                loss = loss_sum / max(label_tokens, 1)
                extra = method.extra_loss()
                if extra is not None:
                    extra = extra / settings.grad_accum
                    extra_total += float(extra)
                    loss = loss + extra
                loss.backward()
                step_loss += float(loss_sum.detach()) / max(label_tokens, 1)
            tokens_seen += sum(len(example.input_ids) for chunk, _ in micro for example in chunk)
            examples_seen += sum(len(chunk) for chunk, _ in micro)
            if settings.max_grad_norm is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm))
            else:
                grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            hook_metrics = method.on_step_end(step, steps)
            loss_value = step_loss
            elapsed = time.perf_counter() - started
            tps = tokens_seen / elapsed if elapsed > 0 else 0.0
            if step % settings.log_every == 0 or step == steps:
                row = {
                    "step": step, "epoch": round(micro[-1][1], 4), "loss": round(step_loss, 6), "lr": lr,
                    "grad_norm": round(grad_norm, 6), "tokens": tokens_seen, "tokens_per_s": round(tps, 2),
                    "elapsed_s": round(elapsed, 3),
                }
                if extra_total:
                    row["extra_loss"] = round(extra_total, 6)
                row.update(hook_metrics)
                log.write(row)
            progress.update(task, advance=1, loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tps=f"{tps:,.0f}")
    if settings.grad_checkpointing:
        model.gradient_checkpointing_disable()
    model.eval()
    return TrainSummary(steps, examples_seen, tokens_seen, time.perf_counter() - started, loss_value, log.rows)
