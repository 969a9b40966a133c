"""Training checkpoints that survive crashes: written whole or not at all.

A checkpoint directory `checkpoints/step-000040/` holds
- `trainable.safetensors`: the trainable parameters by name;
- `optimizer.safetensors` + the `optimizer` entry of `state.json`: AdamW moments and step counts,
  and the hyperparameters of each parameter group;
- `method.safetensors`: the method's own state where it has one (AdaLoRA's importance averages and masks);
- `rng.safetensors` + `state.json`: torch, Python and NumPy RNG states (of process 0; several processes
  add `rng-rank<r>.safetensors`, their dropout draws differ), the step, the data position
  (micro-batches consumed: the order itself is a pure function of the seed), token and example
  counts, elapsed time, the scheduler state and the resolved config.
Tensors are safetensors; everything else is JSON. Nothing is unpickled.

It is written into a temporary sibling directory, flushed, and renamed into place; `COMPLETE` is the
last file written. A directory without it (a kill during the save) is never picked on resume and is
removed by the next save. Only the newest `keep` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from slimtune.atomic import staged_directory

_NAME = re.compile(r"^step-(\d+)$")
MARKER = "COMPLETE"
METHOD_STATE = "method.safetensors"


@dataclass
class Checkpoint:
    """What a checkpoint restores besides tensors it writes straight into the model/optimizer."""

    path: Path
    step: int
    state: dict[str, Any]


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's torch (CPU and CUDA), Python and NumPy RNG states: (tensors, JSON-able meta)."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64))}
    meta = {"python": [py_version, list(py_state), py_gauss],
            "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{index}"] = state
    return tensors, meta


def _restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    cuda = [tensors[f"cuda{i}"] for i in range(len(tensors)) if f"cuda{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def optimizer_tensors(optimizer: torch.optim.Optimizer, whole: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
                      ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer's state as flat tensors ("<param index>.<key>") and JSON meta. `whole` turns a
    sharded tensor into the whole one (every process calls this, in the same order, under FSDP)."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"{index}.{key}"] = whole(value) if torch.is_tensor(value) else torch.tensor(value)
    return tensors, {"param_groups": state["param_groups"]}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                    place: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        param = params[int(index)]
        if value.shape == param.shape and value.ndim:  # moments shaped like their parameter: shard them alike
            value = place(value, param)
        per_param.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": meta["param_groups"]})


def save_checkpoint(
    root: Path,
    step: int,
    named_params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: dict[str, Any],
    config: dict[str, Any],
    keep: int,
    method_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
    rank_rngs: list[tuple[dict[str, torch.Tensor], dict[str, Any]]] | None = None,
) -> Path:
    """Write `root/step-NNNNNN` atomically and prune older checkpoints; returns its path.

    `optimizer_state` (from `optimizer_tensors`, whole tensors) replaces reading `optimizer` here;
    `rank_rngs` are the RNG states of processes 1, 2, ... (this process's own is taken here)."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    target = root / f"step-{step:06d}"
    with staged_directory(target) as staging:
        save_file({k: v.detach().contiguous().cpu() for k, v in named_params.items()}, str(staging / "trainable.safetensors"))
        opt_tensors, opt_meta = optimizer_state or optimizer_tensors(optimizer)
        save_file({k: v.contiguous().cpu() for k, v in opt_tensors.items()}, str(staging / "optimizer.safetensors"))
        if method_state:
            save_file({k: v.detach().contiguous().cpu() for k, v in method_state.items()},
                      str(staging / METHOD_STATE))
        rng_tensors, rng_meta = rng_state()
        save_file(rng_tensors, str(staging / _rng_file(0)))
        rank_meta = {}
        for rank, (tensors, meta) in enumerate(rank_rngs or [], start=1):
            save_file(tensors, str(staging / _rng_file(rank)))
            rank_meta[str(rank)] = meta
        scheduler_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        state = {"step": step, "progress": progress, "optimizer": opt_meta, "rng": rng_meta,
                 "rng_ranks": rank_meta, "scheduler": scheduler_state, "config": config}
        (staging / "state.json").write_text(json.dumps(state), encoding="utf-8")
        for path in staging.iterdir():  # data on disk before the marker and the rename
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
        (staging / MARKER).write_text(str(step), encoding="utf-8")
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old.path, ignore_errors=True)
    return target


def _rng_file(rank: int) -> str:
    return "rng.safetensors" if rank == 0 else f"rng-rank{rank}.safetensors"


def list_checkpoints(root: Path) -> list[Checkpoint]:
    """Complete checkpoints under `root`, oldest first (state not loaded)."""
    found = []
    if root.is_dir():
        for path in root.iterdir():
            match = _NAME.match(path.name)
            if match and (path / MARKER).is_file():
                found.append(Checkpoint(path, int(match.group(1)), {}))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(root: Path) -> Checkpoint | None:
    """The newest complete checkpoint with its state.json read, or None."""
    checkpoints = list_checkpoints(root)
    if not checkpoints:
        return None
    newest = checkpoints[-1]
    newest.state = json.loads((newest.path / "state.json").read_text(encoding="utf-8"))
    return newest


def restore_checkpoint(
    checkpoint: Checkpoint,
    named_params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    place: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = lambda value, like: value,
    rank: int = 0,
) -> dict[str, Any]:
    """Load weights, optimizer, scheduler and RNG states; returns the saved progress dict.

    `place(whole, like)` puts a whole tensor from the file where `like` lives (this process's shard under
    FSDP). Process `rank` restores its own RNG state; one the checkpoint lacks (resuming with more
    processes than saved it) is seeded from the step and the rank instead."""
    weights = load_file(str(checkpoint.path / "trainable.safetensors"))
    missing = sorted(set(named_params) - set(weights))
    if missing:
        raise ValueError(f"checkpoint {checkpoint.path} lacks {len(missing)} trainable tensors, e.g. {missing[:2]}")
    with torch.no_grad():
        for name, param in named_params.items():
            param.copy_(place(weights[name].to(param.dtype), param))
    device = next(iter(named_params.values())).device
    opt_tensors = {k: v.to(device) if v.ndim else v for k, v in load_file(str(checkpoint.path / "optimizer.safetensors")).items()}
    _load_optimizer(optimizer, opt_tensors, checkpoint.state["optimizer"], place)
    scheduler.load_state_dict({**checkpoint.state["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    rng_path = checkpoint.path / _rng_file(rank)
    meta = checkpoint.state["rng"] if rank == 0 else checkpoint.state.get("rng_ranks", {}).get(str(rank))
    if rng_path.is_file() and meta is not None:
        _restore_rng(load_file(str(rng_path)), meta)
    else:
        torch.manual_seed(checkpoint.step + 1_000_003 * rank)
    return checkpoint.state["progress"]


def load_method_state(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """The method state a checkpoint holds ({} when the method keeps none)."""
    path = checkpoint.path / METHOD_STATE
    return load_file(str(path)) if path.is_file() else {}
