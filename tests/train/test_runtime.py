"""The runtime seam: one process is the identity; two gloo processes agree on sums, stops and gradients."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from slimtune.train.runtime import ProcessGroupRuntime, Runtime


def test_one_process_collectives_are_the_identity():
    runtime = Runtime(torch.device("cpu"))
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.tensor([1.0, 2.0, 3.0])
    runtime.average_gradients([param])
    assert runtime.is_main and runtime.sum(7) == 7 and runtime.any(False) is False and runtime.any(True) is True
    assert torch.equal(param.grad, torch.tensor([1.0, 2.0, 3.0]))


def _worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        runtime = ProcessGroupRuntime(torch.device("cpu"))
        a, b = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(3))
        a.grad = torch.full((2, 2), float(rank + 1))          # 1 on rank 0, 2 on rank 1
        b.grad = torch.arange(3, dtype=torch.float32) * (rank + 1)
        runtime.average_gradients([a, b])
        results[rank] = (runtime.is_main, runtime.sum(rank + 10), runtime.any(rank == 1), runtime.any(False),
                         a.grad.tolist(), b.grad.tolist())
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_agree():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(port, results), nprocs=2, join=True)
    expected_b = [0.0, 1.5, 3.0]  # mean of [0, 1, 2] and [0, 2, 4]
    for rank in (0, 1):
        is_main, total, any_one, any_none, grad_a, grad_b = results[rank]
        assert is_main == (rank == 0), "rank 0 is the main process"
        assert total == 21 and any_one is True and any_none is False, results[rank]
        assert grad_a == [[1.5, 1.5], [1.5, 1.5]] and grad_b == expected_b, (grad_a, grad_b)
