"""Where the training loop runs: device, rank, world size, and the few collectives it needs.

The loop, checkpoints and saving take a `Runtime` and never call `torch.distributed` themselves, so
several processes plug in here. `Runtime` is one process: every collective is the identity and the
model is called as it is. `ProcessGroupRuntime` is the same interface over an initialised
`torch.distributed` process group (gloo on CPU, nccl on CUDA), with the model wrapped in DDP or FSDP2
(`train/distributed.py`); torchrun starts its processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimtune.train import distributed


@dataclass
class Runtime:
    """One process: rank 0 of 1, collectives are no-ops."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    mode: str = "single"  # single | ddp | fsdp

    @property
    def is_main(self) -> bool:
        """The process that writes files, prints progress and reports to trackers."""
        return self.rank == 0

    def sum(self, value: float) -> float:
        """`value` summed over every process (the global count of labelled tokens, say)."""
        return value

    def any(self, flag: bool) -> bool:
        """True if `flag` is true in any process (agree on stopping after a signal)."""
        return flag

    def gather(self, value: Any) -> list[Any]:
        """`value` of every process, in rank order, on every process (small picklable objects only)."""
        return [value]

    def barrier(self) -> None:
        """Wait until every process gets here."""

    def wrap(self, model: nn.Module, chunk: int) -> nn.Module:
        """The module the loop calls: forward(batch) -> (sum-CE over response tokens, their count)."""
        return distributed.ResponseLoss(model, chunk)

    @contextmanager
    def gradient_sync(self, module: nn.Module, sync: bool) -> Iterator[None]:
        """Around a micro-batch's forward and backward; gradients are reduced only when `sync`."""
        yield

    def full_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """The whole of a (possibly sharded) tensor; every process must call it, in the same order."""
        return tensor

    def shard_like(self, value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A whole tensor read from a file, placed like `like` (this process's shard, if sharded)."""
        return value

    def unshard(self) -> None:
        """After training: make every parameter whole on every process, for evaluation and saving."""


class ProcessGroupRuntime(Runtime):
    """The same interface over the default `torch.distributed` process group; `mode` is ddp or fsdp."""

    def __init__(self, device: torch.device, mode: str = "ddp") -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("ProcessGroupRuntime needs torch.distributed.init_process_group() first")
        super().__init__(device, dist.get_rank(), dist.get_world_size(), mode)
        self.module: nn.Module | None = None

    def _all_reduce(self, tensor: torch.Tensor, op) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=op)
        return tensor

    def sum(self, value: float) -> float:
        import torch.distributed as dist

        return float(self._all_reduce(torch.tensor([float(value)], dtype=torch.float64, device=self.device),
                                      dist.ReduceOp.SUM))

    def any(self, flag: bool) -> bool:
        import torch.distributed as dist

        return bool(self._all_reduce(torch.tensor([int(flag)], device=self.device), dist.ReduceOp.MAX))

    def gather(self, value: Any) -> list[Any]:
        import torch.distributed as dist

        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def wrap(self, model: nn.Module, chunk: int) -> nn.Module:
        module = distributed.ResponseLoss(model, chunk)
        if self.mode == "fsdp":
            self.module = distributed.wrap_fsdp(module, self.device, self.world_size)
        else:
            self.module = distributed.wrap_ddp(module, self.device)
        return self.module

    @contextmanager
    def gradient_sync(self, module: nn.Module, sync: bool) -> Iterator[None]:
        with distributed.gradient_sync(module, sync):
            yield

    def full_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        return distributed.full_tensor(tensor)

    def shard_like(self, value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return distributed.shard_like(value, like)

    def unshard(self) -> None:
        if self.mode == "fsdp" and self.module is not None:
            distributed.unshard_for_finish(self.module)
