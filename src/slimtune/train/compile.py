"""Regional `torch.compile` of the decoder layers during training (`train.compile`).

Every decoder layer's `forward` is replaced, on the instance, by one compiled function per layer
class: parameters are inputs of the traced graph (torch's inlining of built-in modules), so the 30
layers of a 30-layer model share the graphs traced for the first one and compile time does not grow
with depth. Only the layers are compiled: the embedding, the chunked LM head and loss, the optimizer and
module hooks (DDP's) stay eager. Gradient checkpointing lives inside a layer's `forward` and is traced
as a checkpointed region.

Shapes are dynamic from the first compile (`dynamic=True`): batch size and width are symbols, so the
length-grouped padded widths (multiples of 8) and packed rows of every length reuse the same graphs.
A layer is traced once or twice: with and without a padding mask. The first layer stays eager when
the embedding is frozen (its input needs no gradient, which would need a graph of its own). Inside the compiled region the LoRA
dropout and the CPU attention take compiler-friendly forms (`methods/lowrank.py`,
`train/cpu_attention.py`, both chosen by `torch.compiler.is_compiling()`).

The compiled forwards are removed when training ends, so evaluation and generation run eagerly
(a KV cache and one-token steps would only cost more compiles).

Compiling costs about a third as much when inductor finds the kernels in its cache (`inductor_cache_dir`),
so a run that ran compiled layers records their signature in `tuning.json`: `auto` then counts the next
compile of the same layers on this machine as a warm one, while that cache holds files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from slimtune.train.tuning import record, recorded

# Measured with `python bench/train_speed.py` (README, "Measured") on the 2-core CPU VM here: compiled
# LoRA steps of the bundled model (4 x ~112 tokens, dropout 0.05) took 0.49 s against 0.61 s eager, ~0.26 ms
# saved per trained token. Compiling the layers (`bench/slimtune_runner.py --compile true --steps 8`, a fresh
# inductor cache, then the same again) took ~28 s with an empty inductor cache and ~11 s with it warm. So on
# CPU `auto` compiles a run that trains at least ~110k tokens per process, rounded up, or ~42k where these
# very layers were compiled on this machine before (their kernels are in the cache: `was_compiled_here`).
# No GPU was available to measure; on CUDA the step count decides.
AUTO_MIN_TOKENS_CPU = 150_000
AUTO_MIN_TOKENS_CPU_WARM = 50_000
AUTO_MIN_STEPS_CUDA = 200


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers (transformers' `GradientCheckpointingLayer`s), in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def compiler_problem(device: torch.device) -> str | None:
    """Why `torch.compile` cannot compile for `device` here, in one line; None if it can."""
    if device.type == "cpu":
        compiler = os.environ.get("CXX") or "g++"
        if shutil.which(compiler) is None:
            return (f"torch.compile on CPU needs a C++ compiler and '{compiler}' is not on PATH: install g++ "
                    "(e.g. apt-get install g++) or set CXX, or use train.compile=false")
        return None
    if device.type == "cuda":
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            return "torch.compile on CUDA needs the 'triton' package: pip install triton, or use train.compile=false"
        return None
    return f"train.compile is not supported on device '{device.type}': use train.compile=false"


def auto_decision(device: torch.device, steps: int, distributed: str, tokens: int | None = None,
                  warm: bool = False) -> tuple[bool, str]:
    """Whether `train.compile: auto` compiles this run, and why (one short phrase). `tokens`: about how
    many tokens each process trains in the run (unknown: not compiled on CPU); `warm`: these layers were
    compiled on this machine before, so their kernels are cached and compiling costs a third."""
    if distributed == "fsdp":
        return False, "FSDP2 shards the layers (compiled layers are not supported with it)"
    if device.type == "cpu":
        least = AUTO_MIN_TOKENS_CPU_WARM if warm else AUTO_MIN_TOKENS_CPU
        cache = "compiled here before, kernels cached" if warm else "nothing cached yet"
        if tokens is None or tokens < least:
            trained = "an unknown number of" if tokens is None else f"{tokens:,}"
            return False, (f"{trained} training tokens are too few to pay back compiling on CPU "
                           f"(auto compiles from {least:,}: {cache})")
        return True, f"{tokens:,} training tokens on CPU ({cache})"
    if device.type != "cuda":
        return False, f"train.compile is not supported on device '{device.type}'"
    if steps < AUTO_MIN_STEPS_CUDA:
        return False, f"{steps} steps are too few to pay back the compile time (auto compiles from {AUTO_MIN_STEPS_CUDA})"
    return True, f"{steps} steps on CUDA"


def inductor_cache_dir() -> Path:
    """Where inductor keeps compiled kernels: `$TORCHINDUCTOR_CACHE_DIR`, by default under /tmp (which a
    reboot empties). torch fixes it when `torch._dynamo` is first imported, so it is read, not chosen;
    read without creating it (torch's own `cache_dir()` would)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir())


def layer_signature(layer: nn.Module) -> str:
    """A name for what a compiled layer's graphs depend on: every submodule's class and plain settings
    (sizes, rank, dropout, scaling, eps, checkpointing ...) and every parameter's shape, dtype and
    trainability. Two runs with equal signatures reuse each other's cached kernels."""
    parts = []
    for name, module in layer.named_modules():
        settings = sorted((k, v) for k, v in vars(module).items()
                          if not k.startswith("_") and isinstance(v, (bool, int, float, str)))
        parts.append(f"{name}:{type(module).__qualname__}:{settings}")
    parts += [f"{name}:{tuple(p.shape)}:{p.dtype}:{p.requires_grad}" for name, p in layer.named_parameters()]
    digest = hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]
    return f"compiled {type(layer).__name__} {digest}"


def was_compiled_here(signature: str, precision: str) -> bool:
    """Whether layers of this signature were compiled and trained at this precision on this machine
    (`train/tuning.py` keeps the record) and inductor's cache still holds files."""
    cache = inductor_cache_dir()
    try:
        cached = cache.is_dir() and any(cache.iterdir())
    except OSError:
        cached = False
    return cached and recorded(f"{signature} {precision}") is not None


def compile_problem(setting: str, device: torch.device, distributed: str) -> str | None:
    """For `train.compile: true`, the config problem that stops it here (the check stage reports it)."""
    if setting != "true":
        return None
    if distributed == "fsdp":
        return "train.compile=true is not supported with train.distributed=fsdp: use ddp, or train.compile=false"
    return compiler_problem(device)


def compile_layers(layers: list[nn.Module]) -> int:
    """Replace each layer's forward by its class's compiled forward; returns how many layers."""
    compiled: dict[type, object] = {}
    for layer in layers:
        cls = type(layer)
        if cls not in compiled:
            compiled[cls] = torch.compile(cls.forward, dynamic=True)
        layer.forward = types.MethodType(compiled[cls], layer)
    return len(layers)


def uncompile_layers(layers: list[nn.Module]) -> None:
    """Back to the class's own (eager) forward."""
    for layer in layers:
        layer.__dict__.pop("forward", None)


@contextmanager
def compiled_layers(model: nn.Module, setting: str, device: torch.device, steps: int, distributed: str,
                    console: Console, tokens: int | None = None, precision: str = "") -> Iterator[bool]:
    """Compiled decoder layers inside the block when `setting` ('auto' | 'true' | 'false') asks for it;
    yields whether they are. `true` was checked by `compile_problem` before anything loaded; `auto`
    falls back to eager with a note when no compiler is available. A block that ran compiled graphs
    records their signature (`precision`: the run's, part of what the graphs depend on) so that `auto`
    knows the next compile is a warm one (module docstring)."""
    candidates = decoder_layers(model)
    # Taken before training, which may change a layer's settings (AdaLoRA's ranks), and only where read.
    signature = layer_signature(candidates[-1]) if candidates and setting != "false" else ""
    enabled, reason = setting == "true", "train.compile=true"
    if setting == "auto":
        warm = device.type == "cpu" and bool(signature) and was_compiled_here(signature, precision)
        enabled, reason = auto_decision(device, steps, distributed, tokens, warm=warm)
        reason = f"train.compile=auto: {reason}"
        problem = compiler_problem(device) if enabled else None
        if problem:
            console.print(f"note: train.compile=auto runs eagerly: {problem}")
            enabled = False
    layers = candidates if enabled else []
    embeddings = model.get_input_embeddings() if layers else None
    if layers and embeddings is not None and not embeddings.weight.requires_grad:
        # The first layer's input (a frozen embedding's output) needs no gradient, every other layer's
        # does: compiling it too would trace the layer a second time. It stays eager.
        layers = layers[1:]
    if enabled and not layers:
        console.print("note: this model has no decoder layers slimtune can compile; train.compile has no effect")
    if layers:
        # Some layers differ (mask or not, first layer or not); the default limit of 8 graphs per code
        # object is enough, but a model mixing layer kinds in one class could need more.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
        compile_layers(layers)
        console.print(f"compiling {len(layers)} decoder layers ({reason}; the first steps include the compile)")
    try:
        if not layers:
            yield False
            return
        from torch._dynamo.utils import counters  # graphs dynamo traced in this process so far

        graphs = counters["stats"]["unique_graphs"]
        yield True
        if counters["stats"]["unique_graphs"] > graphs:  # compiled, and the block ended well
            record(f"{signature} {precision}", {"torch": torch.__version__})
    finally:
        uncompile_layers(layers)
