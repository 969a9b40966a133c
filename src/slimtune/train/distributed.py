"""Several processes: torchrun's environment, the process group, and DDP / FSDP2 around the model.

`torchrun --nproc_per_node=N -m slimtune train CONFIG` starts N copies of the command with RANK,
LOCAL_RANK and WORLD_SIZE set. Each copy checks the run, loads the model, attaches the method, and
`start_processes` joins the default process group (nccl on CUDA, gloo on CPU) with a timeout on
every collective, so a rank that dies makes the others fail with a message instead of waiting forever.

The loss is computed by `ResponseLoss`, one module holding the model, because DDP and FSDP2 hook into
a module's forward and the loss reads the LM head's weight directly (`train/loss.py`) rather than
through the model's own forward. It is then wrapped:

- DDP (`wrap_ddp`): every rank holds the whole model; only trainable parameters are synchronised
  (frozen weights and buffers, e.g. an NF4 base, are never broadcast) and their gradients averaged by
  DDP's bucketed all-reduce; accumulation micro-batches run under `no_sync`.
- FSDP2 (`wrap_fsdp`): `fully_shard` on every decoder layer, then on the whole; each rank keeps 1/N of
  every *parameter* (frozen or trained) and of its gradient and optimizer moments, and gathers one layer
  at a time in forward and backward. Buffers are not sharded: an NF4 base (QLoRA), stored as buffers,
  stays whole on every rank, so FSDP2 shards only its adapters (and embeddings, norms, head).

Files stay in one-process form: checkpoints and the finished adapter/model hold full tensors, gathered
on every rank and written by rank 0, so a run resumes with any number of processes.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import timedelta

import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.train.loss import response_loss_sum

LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


def launched_world_size() -> int:
    """How many processes torchrun started for this run (1 when started as one plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s random draws (dropout) after the model is built under torchrun:
    different per rank and reproducible (a one-process run does not reseed)."""
    return seed + 1_000_003 * rank


def start_processes(device_setting: str, timeout_s: float) -> torch.device:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU); returns this process's device.

    CUDA: `cuda:LOCAL_RANK`. CPU: the process keeps the threads torchrun/`slimtune train --nproc` gave it
    (OMP_NUM_THREADS), else an equal share of the machine's cores."""
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # A cuda setting without CUDA is the check stage's to report; the group still forms, on gloo.
    use_cuda = device_setting in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
        if "OMP_NUM_THREADS" not in os.environ:
            local = int(os.environ.get("LOCAL_WORLD_SIZE", launched_world_size()))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                device_id=device if use_cuda else None)
    return device


def stop_processes() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


class ResponseLoss(nn.Module):
    """The model and its response-token loss as one module: forward(batch) -> (sum-CE, token count)."""

    def __init__(self, model: nn.Module, chunk: int) -> None:
        super().__init__()
        self.model, self.chunk = model, chunk

    def forward(self, batch: dict) -> tuple[torch.Tensor, int]:
        return response_loss_sum(self.model, batch, self.chunk)


def wrap_ddp(module: ResponseLoss, device: torch.device) -> nn.Module:
    """DDP over the trainable parameters only: frozen ones and buffers are identical on every rank
    already (same files, same seed) and are neither broadcast nor reduced."""
    from torch.nn.parallel import DistributedDataParallel

    ignored = [name for name, p in module.named_parameters() if not p.requires_grad]
    ignored += [name for name, _ in module.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignored)
    with warnings.catch_warnings():
        # broadcast_buffers is deprecated, but its successor still syncs buffers at init, which is what
        # this avoids (an NF4 base lives in buffers); torch's own warning says to keep it until then.
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                       broadcast_buffers=False)


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated decoder layers (the units FSDP2 gathers one at a time)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def wrap_fsdp(module: ResponseLoss, device: torch.device, world_size: int) -> nn.Module:
    """FSDP2: `fully_shard` each decoder layer, then the whole (embeddings, final norm, LM head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    for block in decoder_blocks(module.model):
        fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextmanager
def gradient_sync(module: nn.Module, sync: bool) -> Iterator[None]:
    """Around one micro-batch's forward and backward: synchronise gradients only when `sync` (the
    step's last micro-batch), so accumulation costs one reduction per optimizer step."""
    if is_sharded(module):
        module.set_requires_gradient_sync(sync)
        yield
    elif hasattr(module, "no_sync") and not sync:
        with module.no_sync():
            yield
    else:
        with nullcontext():
            yield


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded (DTensor) one, gathered on every rank (a collective); others as they are."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`value` (a whole tensor from a file) placed the way `like` is: this rank's shard of a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor):
        return distribute_tensor(value.to(like.device, like.dtype), like.device_mesh, like.placements)
    return value


def _from_fsdp(hook) -> bool:
    hook = getattr(hook, "hook", hook)  # torch's _WrappedHook
    return getattr(getattr(hook, "__func__", hook), "__module__", "").startswith("torch.distributed.fsdp")


def unshard_for_finish(module: nn.Module) -> None:
    """After training under FSDP2: gather every layer's parameters on every process, then turn the
    modules back into plain ones holding whole copies, so process 0 alone can evaluate and save.

    FSDP2 has no call that undoes `fully_shard`: its hooks would reshard in `state_dict()` and gather
    in forward (collectives process 0 cannot make alone), and its unsharded tensors live in all-gather
    buffers that safetensors cannot save. So its forward and state-dict hooks are removed and each
    module gets back the class it had; the training is over, nothing of FSDP is needed any more."""
    from torch.distributed.fsdp import FSDPModule

    sharded = [sub for sub in module.modules() if isinstance(sub, FSDPModule)]
    for sub in sharded:
        sub.unshard()
    copies: dict[int, nn.Parameter] = {}  # by identity: tied weights stay tied
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is not None:
                if id(param) not in copies:
                    copies[id(param)] = nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
                sub._parameters[name] = copies[id(param)]
    for sub in module.modules():  # FSDP hooks sit on every module that owns a parameter
        for hooks in (sub._forward_pre_hooks, sub._forward_hooks, sub._state_dict_pre_hooks, sub._state_dict_hooks,
                      sub._load_state_dict_pre_hooks, sub._load_state_dict_post_hooks):
            for key in [key for key, hook in hooks.items() if _from_fsdp(hook)]:
                del hooks[key]
                sub._forward_pre_hooks_with_kwargs.pop(key, None)
                sub._forward_hooks_with_kwargs.pop(key, None)
    for sub in sharded:
        sub.__class__ = next(base for base in type(sub).__bases__ if not issubclass(base, FSDPModule))


def _device_bytes(device_setting: str) -> int:
    """Memory one process may use: its GPU's, or the machine's RAM split between the local processes."""
    if device_setting != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory
    local = int(os.environ.get("LOCAL_WORLD_SIZE", launched_world_size()))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, local)


def training_bytes(skeleton: nn.Module, quantized: bool) -> int:
    """Rough memory of training `skeleton` (the method attached) in one process without sharding:
    the weights (NF4: 4.5 bits per linear weight) + 16 bytes per trainable parameter (fp32 value,
    gradient, two AdamW moments). Activations are left out: they do not shrink with FSDP."""
    weights = sum(p.numel() * (0.5625 if quantized and p.ndim == 2 and not p.requires_grad else p.element_size())
                  for p in skeleton.parameters())
    trainable = sum(p.numel() for p in skeleton.parameters() if p.requires_grad)
    return int(weights + 16 * trainable)


def resolve_mode(setting: str, shardable: bool, optimizer: str, skeleton: nn.Module | None, quantized: bool,
                 device_setting: str, world_size: int) -> tuple[str, list[str]]:
    """(mode, problems) for `train.distributed` in a run of `world_size` processes: single, ddp or fsdp."""
    if world_size == 1:
        return "single", []
    problems = []
    if setting == "fsdp" and not shardable:
        problems.append("train.distributed: fsdp cannot shard this method (its state is computed from whole "
                        "matrices on every process): use train.distributed=ddp")
    if setting == "fsdp" and optimizer != "adamw":
        problems.append(f"train.distributed: fsdp works with train.optimizer=adamw, not {optimizer} "
                        "(its 8-bit blocks are not sharded): use train.optimizer=adamw or train.distributed=ddp")
    if setting != "auto":
        return setting, problems
    fits = skeleton is None or training_bytes(skeleton, quantized) < 0.8 * _device_bytes(device_setting)
    return ("ddp" if fits or not shardable or optimizer != "adamw" else "fsdp"), problems


class PeerFailure(SlimtuneError):
    """Another process of the run died or stopped answering; every process stops."""


@contextmanager
def peer_failures(rank: int) -> Iterator[None]:
    """Turn a failed collective (a peer that exited, or the timeout) into one clear error per process.

    The line is printed here, at once: torchrun sends SIGTERM to the surviving processes as soon as it
    sees one die, and used inside the loop (where SIGTERM only sets a flag) this is the last moment the
    process is sure to live long enough to say why it stops."""
    import torch.distributed as dist

    try:
        yield
    except RuntimeError as exc:
        # gloo reports a lost peer as a plain RuntimeError naming its transport; nccl and timeouts as DistError.
        if not isinstance(exc, dist.DistError) and not any(mark in str(exc) for mark in ("gloo", "NCCL", "nccl")):
            raise
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        failure = PeerFailure(
            f"process {rank}: another process of this run stopped or stopped answering ({first}); this process "
            "stops too. Continue from the newest checkpoint with resume=true"
        )
        print(f"error: {failure}", file=sys.stderr, flush=True)
        failure.reported = True
        raise failure from None
