"""Per-step timing and a torch.profiler breakdown of training steps, shared by both bench runners.

`StepClock.tick()` is called at the start of every optimizer step (slimtune: around the loop's
`train_step`; the peer: a Trainer callback). It records the step boundaries and profiles the steps
[profile_from, profile_from + profile_steps) with torch.profiler. Each profiled operator's *self*
time is put in one category, by its own name or the name of an enclosing range:

- optimizer: inside `Optimizer.step` / `Optimizer.zero_grad` (torch's own ranges);
- data/collate: inside `slimtune.collate` (the loop's batch building) or `enumerate(DataLoader)`;
- attention: an operator or enclosing range whose name mentions attention;
- matmul: mm, addmm, bmm, baddbmm, linear and the int/NF4 matmuls;
- copies/casts: copy_, to, _to_copy, contiguous, clone;
- allocator: empty, empty_strided, resize_;
- elementwise: every other operator (norms, activations, dropout, residual adds, compiled fused kernels);
- untraced: the step's wall time that no operator accounts for (Python, autograd bookkeeping,
  the profiler's own overhead).
"""

from __future__ import annotations

import statistics
import time

import torch

CATEGORIES = ("matmul", "attention", "elementwise", "copies/casts", "optimizer", "data/collate", "allocator",
              "untraced")
_MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_int_mm", "aten::mkldnn_linear",
           "aten::_weight_int4pack_mm", "aten::_weight_int8pack_mm", "aten::linear", "aten::matmul"}
_COPIES = {"aten::copy_", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone"}
_ALLOCATOR = {"aten::empty", "aten::empty_strided", "aten::resize_", "aten::empty_like", "[memory]"}


def _category(event) -> str:
    names = []
    node = event
    while node is not None:
        names.append(node.name)
        node = node.cpu_parent
    if any(n.startswith("Optimizer.") for n in names):
        return "optimizer"
    if any(n.startswith("slimtune.collate") or n.startswith("enumerate(DataLoader)") for n in names):
        return "data/collate"
    if any("attention" in n.lower() for n in names):
        return "attention"
    name = event.name
    if name in _MATMUL or "nf4" in name.lower() or "gemm" in name.lower():
        return "matmul"
    if name in _COPIES:
        return "copies/casts"
    if name in _ALLOCATOR:
        return "allocator"
    return "elementwise"


def breakdown(prof: torch.profiler.profile, wall_s: float, steps: int) -> tuple[dict[str, float], list]:
    """Seconds per step in each category, from the profiled steps' operator self times, and the 12
    operators with the most self time ([category, name, seconds per step])."""
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    per_op: dict[tuple[str, str], float] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue
        category = _category(event)
        seconds[category] += event.self_cpu_time_total / 1e6
        key = (category, event.name)
        per_op[key] = per_op.get(key, 0.0) + event.self_cpu_time_total / 1e6
    traced = sum(seconds.values())
    seconds["untraced"] = max(0.0, wall_s - traced)
    top = sorted(per_op.items(), key=lambda item: -item[1])[:12]
    return ({name: value / steps for name, value in seconds.items()},
            [[category, name, value / steps] for (category, name), value in top])


class StepClock:
    """Step boundaries and the profile of a few steps in the middle of a run."""

    def __init__(self, profile_from: int, profile_steps: int) -> None:
        self.profile_from, self.profile_steps = profile_from, profile_steps
        self.starts: list[float] = []
        self.profiler: torch.profiler.profile | None = None
        self.profile: dict[str, float] | None = None
        self.top_ops: list = []
        self.finished = False
        self.profile_overhead_s = 0.0  # closing the profiler and reading its events: not training time
        self.started_at = time.time()  # unix time of the first tick: when training began

    def tick(self) -> None:
        """At the start of each optimizer step (step numbers count from 1)."""
        now = time.perf_counter()
        if not self.starts:
            self.started_at = time.time()
        self.starts.append(now)
        step = len(self.starts)
        if self.profile_steps and step == self.profile_from:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.profiler.__enter__()
            self._profile_start = time.perf_counter()
        elif self.profiler is not None and step == self.profile_from + self.profile_steps:
            wall = time.perf_counter() - self._profile_start
            self.profile_overhead_s = -time.perf_counter()
            self.profiler.__exit__(None, None, None)
            self.profile, self.top_ops = breakdown(self.profiler, wall, self.profile_steps)
            self.profiler = None
            self.starts[-1] = time.perf_counter()  # this step starts after the profile is processed
            self.profile_overhead_s += self.starts[-1]

    def finish(self) -> None:
        """After training: close the last step (and a profile still open). Once; later calls do nothing."""
        if self.finished:
            return
        self.finished = True
        self.starts.append(time.perf_counter())
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            self.profiler = None

    def summary(self, tokens: int, warmup: int) -> dict:
        """Step times and steady-state tokens/s: the median step after `warmup` steps, profiled steps and
        the last step (it ends with the run's final save) left out, times the run's mean tokens per step."""
        durations = [b - a for a, b in zip(self.starts, self.starts[1:])]
        profiled = set(range(self.profile_from - 1, self.profile_from - 1 + self.profile_steps))
        steady = [d for i, d in enumerate(durations[:-1]) if i >= warmup and i not in profiled] or durations[-1:]
        step_s = statistics.median(steady) if steady else float("nan")
        per_step = tokens / max(len(durations), 1)
        return {"step_times": durations, "steady_step_s": step_s, "steady_tokens_per_s": per_step / step_s,
                "warmup_s": sum(durations[:warmup]), "train_started_unix": self.started_at,
                "profile_s_per_step": self.profile, "top_ops": self.top_ops,
                "profile_overhead_s": self.profile_overhead_s}
