"""What the loop tells the world: a progress bar, metrics.jsonl, trackers, and when to checkpoint.

Only the main process reports; the others run the same calls as no-ops, so the loop has no branches
on ranks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from slimtune.config import TrainSettings
from slimtune.train.metrics import MetricsLog
from slimtune.train.runtime import Runtime
from slimtune.train.trackers import open_trackers


class Reporter:
    """Use as a context manager around the loop; `report` once per optimizer step."""

    def __init__(self, settings: TrainSettings, total_steps: int, first_step: int, metrics_path: Path,
                 console: Console, runtime: Runtime, config_snapshot: dict[str, Any] | None = None) -> None:
        self.settings, self.total_steps, self.first_step = settings, total_steps, first_step
        self.active = runtime.is_main
        self.console = console
        self.log = MetricsLog(metrics_path, keep_until=first_step - 1 if first_step > 1 else None) if self.active else None
        self.trackers = (open_trackers(settings.report_to, metrics_path.parent, config_snapshot or {})
                         if self.active else [])
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=console, transient=False, disable=not self.active,
        )
        self.task = None

    def __enter__(self) -> Reporter:
        self.progress.__enter__()
        self.task = self.progress.add_task("train", total=self.total_steps, completed=self.first_step - 1,
                                           loss="-", lr="-", tps="-")
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)
        for tracker in self.trackers:
            tracker.close()

    @property
    def rows(self) -> list[dict]:
        return self.log.rows if self.log is not None else []

    def report(self, step: int, row: dict[str, Any], finite: bool) -> None:
        """Log `row` (every train.log_every steps, the last step and any skipped step) and move the bar."""
        if not self.active:
            return
        if step % self.settings.log_every == 0 or step == self.total_steps or not finite:
            self.log.write(row)
            for tracker in self.trackers:
                tracker.log(row, step)
        self.progress.update(self.task, advance=1, loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                             tps=f"{row['tokens_per_s']:,.0f}")

    def checkpoint_due(self, step: int) -> bool:
        """Checkpoints every train.save_every steps and at the end."""
        every = self.settings.save_every
        return step == self.total_steps or bool(every and step % every == 0)
