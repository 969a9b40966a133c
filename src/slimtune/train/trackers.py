"""Experiment trackers users already watch: TensorBoard, Weights & Biases, MLflow (`train.report_to`).

Each gets the same rows as metrics.jsonl (numeric fields, at the optimizer step). TensorBoard writes
event files into `<output>/tensorboard`; wandb and mlflow follow their own environment variables, so
their offline modes work as usual (`WANDB_MODE=offline`, `MLFLOW_TRACKING_URI=file:...`). None of them
is a dependency: a tracker that is not installed is a check-stage error naming the package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # name -> package to install


def tracker_problems(names: list[str]) -> list[str]:
    """A line for each tracker in `names` whose package is not installed."""
    return [f"train.report_to: {name} needs the package '{TRACKERS[name]}': pip install {TRACKERS[name]}, "
            f"or remove {name} from train.report_to"
            for name in names if importlib.util.find_spec(TRACKERS[name]) is None]


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    return {key: float(value) for key, value in row.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step"}


class TensorBoard:
    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, row: dict[str, Any], step: int) -> None:
        for key, value in _numbers(row).items():
            self.writer.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        import wandb

        self.run = wandb.init(project="slimtune", name=run_dir.name, dir=str(run_dir), config=config)

    def log(self, row: dict[str, Any], step: int) -> None:
        self.run.log({f"train/{k}": v for k, v in _numbers(row).items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        import mlflow

        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=run_dir.name)
        flat = {}
        for section, values in config.items():
            for key, value in (values.items() if isinstance(values, dict) else [("", values)]):
                flat[f"{section}.{key}".rstrip(".")] = str(value)[:250]
        mlflow.log_params(flat)

    def log(self, row: dict[str, Any], step: int) -> None:
        self.mlflow.log_metrics({f"train/{k}": v for k, v in _numbers(row).items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


_CLASSES = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


def open_trackers(names: list[str], run_dir: Path, config: dict[str, Any]) -> list:
    """One open tracker per name (call `close()` on each at the end)."""
    return [_CLASSES[name](run_dir, config) for name in names]
