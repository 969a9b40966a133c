"""Load a safetensors model tensor by tensor, quantizing linear weights to NF4 as they arrive (QLoRA).

`from_pretrained` followed by `quantize_model` holds the whole 16-bit model first: on a GPU the peak is
the 16-bit model, which defeats the point of QLoRA, and on a CPU every page of the memory-mapped file
that was read stays resident until the map goes. Here the model starts as a skeleton (parameters on the
meta device, `models/skeleton.py`) and each tensor is read with plain file reads into memory of its own,
so the peak is the 4-bit model plus about one tensor in 16 bits:

    for each tensor in the checkpoint:
        read it (plain reads, no memory map), cast to the weight dtype
        if it is the weight of a linear layer to quantize: NF4 on the CPU -> Linear4bit -> device
        else: -> device, into the skeleton (tied names share one tensor)

A checkpoint whose names do not match the model's (architectures that transformers renames on load) is
reported to the caller, which then takes the ordinary path.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from slimtune.models.skeleton import build_skeleton, meta_parameters
from slimtune.train.heap import release_free_memory

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class NotStreamable(Exception):
    """The checkpoint cannot be streamed into the skeleton (names differ, unknown dtype, no safetensors)."""


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files of a HF model directory: the shards an index names, or model.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise NotStreamable(f"{model_dir} has no model.safetensors")


def read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for each tensor of one safetensors file, in file order, each in fresh memory.

    The format: an 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape,
    data_offsets: [begin, end]}} (offsets relative to the end of the header), then the data."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
        start = 8 + length
        entries = sorted(((name, info) for name, info in header.items() if name != "__metadata__"),
                         key=lambda item: item[1]["data_offsets"][0])
        for name, info in entries:
            dtype = _DTYPES.get(info["dtype"])
            if dtype is None:
                raise NotStreamable(f"{path.name}: tensor '{name}' has dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            handle.seek(start + begin)
            buffer = bytearray(end - begin)
            handle.readinto(buffer)
            flat = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
            yield name, flat.reshape(info["shape"])


def _tied_names(model: nn.Module) -> dict[str, list[str]]:
    """name -> every name of the same parameter (an LM head tied to the embeddings has two)."""
    by_id: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    return {name: names for names in by_id.values() for name in names}


def _place(model: nn.Module, name: str, value: torch.Tensor | nn.Parameter) -> bool:
    """Put `value` where the skeleton has parameter or buffer `name`; False if it has none. A parameter
    placed under several (tied) names must be one `nn.Parameter`, so pass it built."""
    parent_path, _, attr = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_path) if parent_path else model
    except AttributeError:
        return False
    if attr in parent._parameters and parent._parameters[attr] is not None:
        old = parent._parameters[attr]
        if tuple(old.shape) != tuple(value.shape):
            raise NotStreamable(f"'{name}' has shape {tuple(value.shape)} in the checkpoint, the model needs {tuple(old.shape)}")
        parent._parameters[attr] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, old.requires_grad)
        return True
    if attr in parent._buffers and parent._buffers[attr] is not None:
        parent._buffers[attr] = value
        return True
    return False


def stream_quantized(
    resolved: str,
    dtype: torch.dtype,
    device: torch.device,
    quantize: Callable[[str], bool],
    compute_dtype: torch.dtype,
    blocksize: int = 64,
    double_quant: bool = True,
    on_layer: Callable[[str, nn.Module], None] | None = None,
) -> tuple[nn.Module, list[str]]:
    """(model, quantized paths): `resolved` (a local HF directory) built as a skeleton and filled tensor
    by tensor; the linear layers for which `quantize(path)` holds become `Linear4bit` on `device`, one
    at a time, the other tensors are cast to `dtype` and moved to `device`.

    `on_layer(path, model)` is called after each layer is quantized (tests watch the model with it). Raises
    `NotStreamable` when the checkpoint does not fit the skeleton; the caller then loads the usual way.
    """
    from slimtune.quant.linear4bit import Linear4bit
    from slimtune.quant.nf4 import quantize_nf4

    model_dir = Path(resolved)
    if not model_dir.is_dir():
        raise NotStreamable(f"'{resolved}' is not a local directory")
    files = safetensors_files(model_dir)
    model = build_skeleton(resolved, dtype)
    linears = {path: module for path, module in model.named_modules() if isinstance(module, nn.Linear) and path}
    chosen = {path for path in linears if quantize(path)}
    tied = _tied_names(model)
    quantized: list[str] = []
    for file in files:
        for name, tensor in read_safetensors(file):
            path, _, leaf = name.rpartition(".")
            if tensor.is_floating_point():
                tensor = tensor.to(dtype)
            if leaf == "weight" and path in chosen:
                linear = linears[path]
                if tuple(tensor.shape) != tuple(linear.weight.shape):
                    raise NotStreamable(f"'{name}' has shape {tuple(tensor.shape)}, the model needs "
                                        f"{tuple(linear.weight.shape)}")
                layer = Linear4bit(quantize_nf4(tensor, blocksize=blocksize, double_quant=double_quant), None,
                                   compute_dtype).to(device)
                if linear.bias is not None:  # filled when the checkpoint's bias arrives
                    layer.bias = nn.Parameter(torch.empty_like(linear.bias, device="meta"), requires_grad=False)
                parent_path, _, child = path.rpartition(".")
                setattr(model.get_submodule(parent_path) if parent_path else model, child, layer)
                quantized.append(path)
                del tensor
                # The layer's temporaries (file bytes, cast copy, the quantizer's fp32 work) are freed
                # between long-lived codes; hand those holes back, or they stay resident.
                release_free_memory()
                if on_layer is not None:
                    on_layer(path, model)
                continue
            value = tensor.to(device)
            names = tied.get(name, [name])
            if len(names) > 1:
                value = nn.Parameter(value)
            if not all(_place(model, target, value) for target in names):
                raise NotStreamable(f"checkpoint tensor '{name}' has no place in {type(model).__name__}")
    missing = meta_parameters(model)
    if missing:
        raise NotStreamable(f"the checkpoint lacks {len(missing)} tensors of the model, e.g. {missing[:2]}")
    for module in model.modules():  # quantized bias parameters stay frozen, as quantize_model leaves them
        if isinstance(module, Linear4bit) and module.bias is not None:
            module.bias.requires_grad_(False)
    model.to(device)  # the buffers computed on the CPU (rotary frequencies)
    model.eval()
    return model, quantized


def load_quantized_model(name: str, dtype: torch.dtype, device: torch.device, compute_dtype: torch.dtype,
                         skip: tuple[str, ...] = ("lm_head",), on_layer: Callable[[str, nn.Module], None] | None = None
                         ) -> tuple[nn.Module, object, str, list[str], str | None]:
    """(model, tokenizer, resolved, quantized paths, note) for QLoRA: every linear layer but `skip` in NF4;
    a vision-language model's tower and projector stay in 16 bits (only its language model is quantized).

    Streams when it can (peak: the 4-bit model plus about one 16-bit tensor); otherwise loads the whole
    model on the CPU, quantizes it there and then moves it, and `note` says why."""
    from slimtune.models.head import contiguous_head_input
    from slimtune.models.loader import load_model, load_tokenizer, resolve_model
    from slimtune.quant.linear4bit import quantize_model

    resolved = resolve_model(name)

    from slimtune.models.vision import is_vision_path

    def wanted(path: str) -> bool:
        return not is_vision_path(path) and not any(path == s or path.endswith("." + s) for s in skip)

    try:
        model, quantized = stream_quantized(resolved, dtype, device, wanted, compute_dtype, on_layer=on_layer)
        model.config.use_cache = False
        contiguous_head_input(model)
        return model, load_tokenizer(resolved, name), resolved, quantized, None
    except NotStreamable as why:
        note = f"loading the whole model before quantizing it ({why})"
    model, tokenizer, resolved = load_model(name, dtype=dtype)
    vision = tuple(path for path, _ in model.named_modules() if path and is_vision_path(path))
    quantized = quantize_model(model, skip=skip + vision, compute_dtype=compute_dtype)  # on the CPU, before any move
    model.to(device)
    return model, tokenizer, resolved, quantized, note
