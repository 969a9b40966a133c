"""Choices that depend on the machine, measured once per machine and cached under `$SLIMTUNE_HOME`.

Which is faster is not the same everywhere: on one CPU the bf16 flash-attention backward ran at less
than half the speed of fp32 maths, on another (AMX) bf16 may win; the best CPU thread count depends on
cores, hyper-threads and what else runs. So instead of assuming, the first run on a machine times the
candidates (a second or two) and stores the answer in `$SLIMTUNE_HOME/tuning.json` (default
`~/.cache/slimtune/tuning.json`), keyed by the machine (CPU model, core count, torch version); later
runs read it. A config value other than `auto` / null overrides the measurement and measures nothing.

    {"<machine key>": {"cpu_attention@128": {"best": "fp32", "fp32_ms": 3.1, "bf16_ms": 7.4, ...},
                       "cpu_threads": {"best": 2, "gflops": {"1": 820.0, "2": 1530.0}}}}

The attention answer also depends on the length attended over: on one AMX machine fp32 maths won at
rows of ~112 tokens while bf16 flash won at 4096-token blocks (1.35x). So it is measured per length
band (128, 512, 2048, 8192 tokens), at the band nearest to the run's typical attention length.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from slimtune.models.gguf_cache import slimtune_home

CACHE_NAME = "tuning.json"


def cache_path() -> Path:
    return slimtune_home() / CACHE_NAME


def machine_key() -> str:
    """What the measurements depend on: CPU model, logical cores, torch version."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} | {os.cpu_count()} cpus | torch {torch.__version__}"


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # missing or damaged: measure again and rewrite it
    return data if isinstance(data, dict) else {}


def recorded(name: str, path: Path | None = None) -> dict | None:
    """This machine's cached entry `name`, or None."""
    data = _read_cache(path or cache_path())
    mine = data.get(machine_key())
    entry = mine.get(name) if isinstance(mine, dict) else None
    return entry if isinstance(entry, dict) else None


def record(name: str, entry: dict, path: Path | None = None) -> None:
    """Store `entry` as this machine's `name` (a failed write only means measuring again next time)."""
    path = path or cache_path()
    key = machine_key()
    data = _read_cache(path)
    if not isinstance(data.get(key), dict):
        data[key] = {}
    data[key][name] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        partial.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        os.replace(partial, path)
    except OSError:
        pass


def measured(name: str, measure: Callable[[], dict], path: Path | None = None) -> dict:
    """This machine's cached result `name`, or `measure()` run now and cached."""
    entry = recorded(name, path)
    if entry is not None and "best" in entry:
        return entry
    entry = measure()
    record(name, entry, path)
    return entry


def _best_ms(runs: dict[str, Callable[[], None]], repeats: int = 5) -> dict[str, float]:
    """Each candidate's best time in ms. The candidates take turns (a, b, a, b, ...), so that other work
    slowing the machine for a while slows both rather than deciding the answer."""
    for run in runs.values():
        run()  # warm-up: first-call allocations and kernel selection
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: seconds * 1e3 for name, seconds in best.items()}


ATTENTION_BANDS = (128, 512, 2048, 8192)  # attention lengths measured; a run uses the nearest (log scale)


def attention_band(length: int) -> int:
    """The measured attention length nearest to `length` on a log scale."""
    return min(ATTENTION_BANDS, key=lambda band: abs(math.log(max(length, 1) / band)))


def time_cpu_attention(batch: int | None = None, heads: int = 9, kv_heads: int = 3, length: int = 128,
                       head_dim: int = 64) -> dict:
    """Forward + backward of causal attention on bf16 q, k, v (the bundled model's heads; `batch` rows of
    `length` tokens, by default 512 tokens in all or one row): fp32 maths (`fp32_attention`) vs bf16
    SDPA. Returns {"best", "fp32_ms", "bf16_ms", "shape"}."""
    import torch.nn.functional as F

    from slimtune.train.cpu_attention import fp32_attention

    batch = batch or max(1, 512 // length)

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, h, length, head_dim, generator=generator, dtype=torch.bfloat16).requires_grad_()
               for h in (heads, kv_heads, kv_heads))
    grad = torch.randn(batch, length, heads, head_dim, generator=generator, dtype=torch.bfloat16)

    def fp32_maths() -> None:
        fp32_attention(q, k, v, None, None, None, True).backward(grad)

    def bf16_maths() -> None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out.transpose(1, 2).backward(grad)

    repeats = 5 if length <= 512 else 2  # a long row takes seconds; its timing is steadier too
    times = _best_ms({"fp32_ms": fp32_maths, "bf16_ms": bf16_maths}, repeats)
    return {"best": "fp32" if times["fp32_ms"] <= times["bf16_ms"] else "bf16", **times,
            "shape": [batch, heads, kv_heads, length, head_dim]}


def time_cpu_threads(size: int = 768, seconds: float = 0.3) -> dict:
    """bf16 matmul GFLOP/s at each candidate thread count (all logical CPUs, and half of them when that
    is a whole number: hyper-threads often slow matmuls down). Returns {"best", "gflops"}."""
    total = os.cpu_count() or 1
    candidates = sorted({total, max(1, total // 2)}, reverse=True)
    previous = torch.get_num_threads()
    a = torch.randn(size, size, dtype=torch.bfloat16)
    b = torch.randn(size, size, dtype=torch.bfloat16)
    gflops: dict[str, float] = {}
    try:
        for threads in candidates:
            torch.set_num_threads(threads)
            a @ b
            best, deadline = 0.0, time.perf_counter() + seconds
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                a @ b
                best = max(best, 2 * size**3 / (time.perf_counter() - start))
            gflops[str(threads)] = round(best / 1e9, 1)
    finally:
        torch.set_num_threads(previous)
    # A tie within 3% goes to the larger count (the rest of the step has parallel work too).
    top = max(gflops.values())
    best = max(int(t) for t, value in gflops.items() if value >= 0.97 * top)
    return {"best": best, "gflops": gflops}


def cpu_attention_maths(setting: str, length: int = 128, measure: Callable[[], dict] | None = None) -> str:
    """'fp32' or 'bf16' for train.attention_precision ('auto' reads or measures this machine's answer
    for attention over about `length` tokens)."""
    if setting != "auto":
        return setting
    band = attention_band(length)
    return str(measured(f"cpu_attention@{band}", measure or (lambda: time_cpu_attention(length=band)))["best"])


def cpu_threads(setting: int | None, measure: Callable[[], dict] = time_cpu_threads) -> int:
    """The thread count for train.threads (null reads or measures this machine's best)."""
    if setting is not None:
        return setting
    return int(measured("cpu_threads", measure)["best"])


def apply_cpu_threads(setting: int | None, world_size: int) -> None:
    """Set torch's CPU thread count for training: `setting` when given; else, for one process whose
    threads nobody chose (OMP_NUM_THREADS), this machine's measured best. Under torchrun each process
    keeps its share (train/distributed.py)."""
    if setting is not None:
        torch.set_num_threads(setting)
    elif world_size == 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(cpu_threads(None))
