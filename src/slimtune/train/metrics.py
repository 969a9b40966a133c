"""Run metrics: one JSON object per logged step in metrics.jsonl, and the loss curve as loss.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends rows to `metrics.jsonl` as they come, so a crash keeps what was logged."""

    def __init__(self, path: Path, keep_until: int | None = None) -> None:
        """Start a fresh log, or with `keep_until` (resuming) keep the rows up to that step."""
        self.path = path
        self.rows: list[dict[str, Any]] = []
        path.parent.mkdir(parents=True, exist_ok=True)
        if keep_until is not None and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a crash
                    continue
                if row.get("step", 0) <= keep_until:
                    self.rows.append(row)
        path.write_text("".join(json.dumps(row) + "\n" for row in self.rows), encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")


def plot_loss(rows: list[dict[str, Any]], path: Path, eval_losses: dict[str, float] | None = None) -> None:
    """Training loss per step (raw and smoothed) with optional eval-loss reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in rows]
    losses = [row["loss"] for row in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="train loss")
    if len(losses) >= 5:
        window = max(2, len(losses) // 20)
        smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, color="tab:blue", linewidth=2, label=f"train loss (mean of {window})")
    for (name, value), color in zip((eval_losses or {}).items(), ("tab:red", "tab:green")):
        ax.axhline(value, color=color, linestyle="--", linewidth=1, label=f"eval loss, {name}: {value:.3f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("response-token cross-entropy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    finally:  # a failed write (disk full) must not leak the figure
        plt.close(fig)
