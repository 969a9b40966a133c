"""Learning-rate schedules: linear warmup, then cosine, linear or constant.

For step t (0-based, the step about to be taken), warmup w and total T steps the multiplier is
    t < w:  (t + 1) / w
    else:   p = (t - w) / max(1, T - w);  cosine: 0.5 (1 + cos(pi p)),  linear: 1 - p,  constant: 1.
The first step therefore trains with a non-zero learning rate.
"""

from __future__ import annotations

import math


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(total_steps * warmup_ratio)


def lr_multiplier(step: int, total_steps: int, warmup: int, schedule: str) -> float:
    """The factor applied to the peak learning rate at optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {schedule!r}: use cosine, linear or constant")
