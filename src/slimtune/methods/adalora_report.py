"""Pictures of an AdaLoRA run: where the rank went, and how the budget shrank.

- `rank_heatmap.png`: decoder layer (rows) x module (columns), each cell the final kept rank out of
  `init_r`, written in the cell; modules that are not adapted stay blank.
- `rank_budget.png`: the budget b(t) and the rank kept by the latest allocation, per optimizer step,
  from the `budget` / `rank` columns of metrics.jsonl.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

RANK_HEATMAP = "rank_heatmap.png"
BUDGET_PLOT = "rank_budget.png"


def rank_grid(ranks: Mapping[str, int]) -> tuple[list[str], list[str], list[list[float | None]]]:
    """(row labels, column labels, cells): rows are layers (by the number in the path), columns module names."""
    def split(path: str) -> tuple[str, str]:
        match = re.search(r"(?:^|\.)(\d+)\.(.+)$", path)
        return (match.group(1), match.group(2)) if match else ("-", path)

    rows: dict[str, None] = {}
    columns: dict[str, None] = {}
    cells: dict[tuple[str, str], int] = {}
    for path, rank in ranks.items():
        row, column = split(path)
        rows.setdefault(row)
        columns.setdefault(column)
        cells[(row, column)] = rank
    row_labels = sorted(rows, key=lambda r: (not r.isdigit(), int(r) if r.isdigit() else 0, r))
    column_labels = list(columns)
    grid = [[cells.get((row, column)) for column in column_labels] for row in row_labels]
    return row_labels, column_labels, grid


def plot_rank_heatmap(ranks: Mapping[str, int], init_r: int, path: Path) -> None:
    """Final rank per layer and module as an annotated heatmap PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows, columns, grid = rank_grid(ranks)
    values = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(columns), 1.2 + 0.32 * len(rows)))
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0, vmax=init_r, aspect="auto")
    ax.set_xticks(range(len(columns)), [c.rsplit(".", 1)[-1] for c in columns], rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_ylabel("layer")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if value is not None:
                ax.text(j, i, str(value), ha="center", va="center", fontsize=7,
                        color="white" if value < 0.6 * init_r else "black")
    total = sum(ranks.values())
    ax.set_title(f"AdaLoRA final rank per matrix (total {total}, initial {init_r} each)", fontsize=9)
    fig.colorbar(image, ax=ax, label="kept rank")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_budget(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Budget b(t) and the kept rank per step, from metrics rows that carry them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logged = [row for row in rows if "budget" in row]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in logged], [r["budget"] for r in logged], color="tab:blue", linewidth=2,
            label="budget b(t)")
    ax.step([r["step"] for r in logged], [r["rank"] for r in logged], where="post", color="tab:orange",
            linewidth=1, label="rank kept by the latest allocation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("total rank (triplets)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
