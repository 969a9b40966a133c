"""The one training loop, its schedules, loss and logging."""

from slimtune.train.loop import TrainSummary, run_training

__all__ = ["TrainSummary", "run_training"]
