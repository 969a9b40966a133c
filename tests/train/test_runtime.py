"""The runtime seam: one process is the identity; two gloo processes agree on sums, stops and gathers."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from slimtune.train.runtime import ProcessGroupRuntime, Runtime


def test_one_process_collectives_are_the_identity():
    runtime = Runtime(torch.device("cpu"))
    value = torch.tensor([1.0, 2.0, 3.0])
    assert runtime.is_main and runtime.sum(7) == 7 and runtime.any(False) is False and runtime.any(True) is True
    assert runtime.gather("x") == ["x"] and runtime.full_tensor(value) is value


def _worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        runtime = ProcessGroupRuntime(torch.device("cpu"))
        results[rank] = (runtime.is_main, runtime.sum(rank + 10), runtime.any(rank == 1), runtime.any(False),
                         runtime.gather({"rank": rank}))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_agree():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(port, results), nprocs=2, join=True)
    for rank in (0, 1):
        is_main, total, any_one, any_none, gathered = results[rank]
        assert is_main == (rank == 0), "rank 0 is the main process"
        assert total == 21 and any_one is True and any_none is False, results[rank]
        assert gathered == [{"rank": 0}, {"rank": 1}], gathered
