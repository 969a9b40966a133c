"""Where the training loop runs: device, rank, world size, and the few collectives it needs.

The loop, checkpoints and saving take a `Runtime` and never call `torch.distributed` themselves, so
several processes plug in here. `Runtime` is one process: every collective is the identity.
`ProcessGroupRuntime` is the same interface over an initialised `torch.distributed` process group
(gloo on CPU, nccl on CUDA), for the launcher that starts several processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Runtime:
    """One process: rank 0 of 1, collectives are no-ops."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

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

    def average_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Make every process's gradients the mean over processes (a no-op for one process)."""

    def barrier(self) -> None:
        """Wait until every process gets here."""


class ProcessGroupRuntime(Runtime):
    """The same interface over the default `torch.distributed` process group."""

    def __init__(self, device: torch.device) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("ProcessGroupRuntime needs torch.distributed.init_process_group() first")
        super().__init__(device, dist.get_rank(), dist.get_world_size())

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

    def average_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        import torch.distributed as dist

        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        self._all_reduce(flat, dist.ReduceOp.SUM).div_(self.world_size)
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset: offset + grad.numel()].view_as(grad))
            offset += grad.numel()

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()
