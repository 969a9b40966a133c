"""A frozen linear layer whose weight is stored in NF4 (the base layer of QLoRA).

    y = x W^T + b,        W = dequantize_nf4(state) in `compute_dtype`        (x: (..., d_in), W: (d_out, d_in))

The weight lives only as packed 4-bit codes plus its scaling constants (`slimtune.quant.nf4`); the
full-precision W exists for the duration of one matmul. In training the backward pass dequantizes W
again instead of keeping it for the gradient, so the autograd graph holds no full-size weight
(QLoRA's point: memory ~0.52 bytes per frozen parameter). Gradients flow to x (and to the bias if
someone unfreezes it), never to W.

Quantization is an explicit call (`Linear4bit.from_linear`, `quantize_model`); `.to()` and `.cuda()`
only move the stored tensors: they never re-quantize, and `.to(dtype)` leaves the float32 constants
untouched. `load_bnb_4bit_state` builds the layer from the tensors a bitsandbytes "bnb-4bit"
checkpoint stores, so such checkpoints load without bitsandbytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from slimtune.errors import ModelLoadError
from slimtune.quant.nf4 import (
    BLOCKSIZES,
    DYNAMIC_MAP,
    NESTED_BLOCKSIZE,
    NF4_CODEBOOK,
    NF4State,
    dequantize_nf4,
    quantize_nf4,
)

_STATE_BUFFERS = ("absmax", "absmax_codes", "nested_absmax", "offset")
_FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _use_scratch(x: torch.Tensor) -> bool:
    # On CPU every fresh weight-sized temporary is a new heap allocation; CUDA's caching allocator
    # already reuses freed blocks, so there the buffers would only be held for nothing.
    return x.device.type == "cpu"


class _NF4Matmul(torch.autograd.Function):
    """x W^T + b with W dequantized in forward and again in backward (nothing full-size is saved)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, state: NF4State, dtype: torch.dtype) -> torch.Tensor:
        ctx.state, ctx.dtype, ctx.has_bias = state, dtype, bias is not None
        return F.linear(x, dequantize_nf4(state, dtype, scratch=_use_scratch(x)), bias)

    @staticmethod
    @once_differentiable  # a double backward would keep the scratch weight that the next layer overwrites
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ dequantize_nf4(ctx.state, ctx.dtype, scratch=_use_scratch(grad_out))  # (..., d_out) @ (d_out, d_in)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(dim=0)
        return grad_x, grad_bias, None, None


class Linear4bit(nn.Module):
    """Frozen NF4 linear layer; see the module docstring. Build it with `from_linear`."""

    def __init__(self, state: NF4State, bias: torch.Tensor | None = None, compute_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        if len(state.shape) != 2:
            raise ValueError(f"Linear4bit needs a 2-D weight (d_out, d_in), got shape {tuple(state.shape)}")
        self.out_features, self.in_features = state.shape
        if bias is not None and bias.shape != (self.out_features,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({self.out_features},) for weight {tuple(state.shape)}")
        self.blocksize = state.blocksize
        self.weight_dtype = state.dtype  # dtype of the weight before quantization
        self.compute_dtype = compute_dtype
        # `weight` holds the packed codes (bitsandbytes' name); code that checks `layer.weight.device` works.
        self.register_buffer("weight", state.codes)
        for name in _STATE_BUFFERS:
            self.register_buffer(name, getattr(state, name))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
    ) -> Linear4bit:
        """Quantize `linear.weight` to NF4 on its current device; the bias is copied, unquantized and frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        state = quantize_nf4(linear.weight, blocksize=blocksize, double_quant=double_quant)
        return cls(state, linear.bias, compute_dtype)

    @property
    def state(self) -> NF4State:
        """The quantized weight, sharing this module's buffers."""
        return NF4State(
            codes=self.weight,
            shape=torch.Size((self.out_features, self.in_features)),
            dtype=self.weight_dtype,
            blocksize=self.blocksize,
            **{name: getattr(self, name) for name in _STATE_BUFFERS},
        )

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W (d_out, d_in) in `dtype` (default: the compute dtype), rounded once from float32."""
        return dequantize_nf4(self.state, dtype or self.compute_dtype)

    def weight_bytes(self) -> int:
        """Bytes of the packed codes and scaling constants (not the bias, not the shared codebooks)."""
        return self.state.nbytes()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        out = _NF4Matmul.apply(x.to(self.compute_dtype), bias, self.state, self.compute_dtype)
        return out.to(x.dtype)

    def _apply(self, fn, recurse=True):
        # nn.Module.to(dtype) would round every floating buffer to dtype; the float32 scaling constants
        # must keep their bits, so they follow device moves only.
        constants = {name: self._buffers[name] for name in ("absmax", "nested_absmax", "offset") if self._buffers[name] is not None}
        super()._apply(fn, recurse)
        for name, original in constants.items():
            self._buffers[name] = original.to(self._buffers[name].device)
        return self

    def extra_repr(self) -> str:
        double = "double_quant" if self.absmax_codes is not None else "no double_quant"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"nf4 blocksize={self.blocksize}, {double}, compute_dtype={self.compute_dtype}"
        )


def quantize_model(
    model: nn.Module,
    skip: Sequence[str] = ("lm_head",),
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
) -> list[str]:
    """Replace every `nn.Linear` of `model` by a `Linear4bit`, in place; returns the replaced paths.

    A module is skipped when its path equals an entry of `skip` or ends with "." + entry (so the
    default keeps the output head `lm_head` in full precision, as QLoRA does). Quantize before
    attaching adapters: LoRA's own `lora_A` / `lora_B` are linear layers too.

    Afterwards the parameters left in full precision (embeddings, norms, the head) are copied into
    memory of their own: weights loaded from safetensors can be views of one memory-mapped file, and
    a single surviving view would keep the whole mapping, and every page the quantization read, resident
    (measured on the bundled model: 150 MB of RSS).
    """
    paths = [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name]
    if any(path.rpartition(".")[2] in ("lora_A", "lora_B") for path in paths):
        raise ValueError("the model already has LoRA layers: call quantize_model on the base model, then attach LoRA")
    chosen = [p for p in paths if not any(p == s or p.endswith("." + s) for s in skip)]
    for path in chosen:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        linear = getattr(parent, child)
        setattr(parent, child, Linear4bit.from_linear(linear, blocksize, double_quant, compute_dtype))
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()
    return chosen


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> list[str]:
    """Replace every `Linear4bit` of `model` (LoRA base layers included) by an `nn.Linear` holding its
    dequantized weight in `dtype`, in place; returns the replaced paths. This is the explicit step
    before merging a QLoRA adapter: W' = dequantize(W_nf4) + s B A."""
    paths = [name for name, module in model.named_modules() if isinstance(module, Linear4bit)]
    for path in paths:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        quantized = getattr(parent, child)
        linear = nn.Linear(quantized.in_features, quantized.out_features, bias=quantized.bias is not None,
                           device=quantized.weight.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(quantized.dequantized_weight(torch.float32).to(dtype))
            if quantized.bias is not None:
                linear.bias.copy_(quantized.bias.to(dtype))
        linear.requires_grad_(False)
        setattr(parent, child, linear)
    return paths


def load_bnb_4bit_state(
    tensors: Mapping[str, torch.Tensor], prefix: str, compute_dtype: torch.dtype = torch.bfloat16
) -> Linear4bit:
    """Build a `Linear4bit` from one layer of a bitsandbytes NF4 ("bnb-4bit") checkpoint.

    `tensors` maps checkpoint keys to tensors (e.g. `safetensors.torch.load_file(path)`); `prefix` is
    the layer path, e.g. "model.layers.0.self_attn.q_proj" ("" for a bare layer's own state dict).
    bitsandbytes (and transformers' `save_pretrained` of a 4-bit model) store, under `<prefix>.`:
        weight                               packed codes, uint8 ((n + 1) // 2, 1); another dtype, same
                                             bytes, if bnb_4bit_quant_storage was set
        weight.absmax                        float32 (n_blocks,), or uint8 8-bit codes with double quantization
        weight.quant_map                     float32 (16,): the NF4 codebook
        weight.nested_absmax                 float32 (ceil(n_blocks / 256),)     (double quantization only)
        weight.nested_quant_map              float32 (256,): the dynamic map     (double quantization only)
        weight.quant_state.bitsandbytes__nf4 uint8 bytes of a JSON object: quant_type, blocksize, dtype,
                                             shape and (nested) nested_blocksize, nested_dtype, nested_offset
    and the bias, if any, under `<prefix>.bias`.
    """
    key = f"{prefix}.weight" if prefix else "weight"
    bias_key = f"{prefix}.bias" if prefix else "bias"
    blob_key = f"{key}.quant_state.bitsandbytes__nf4"
    if key not in tensors:
        raise ModelLoadError(f"checkpoint has no tensor '{key}': check the layer prefix '{prefix}'")
    if blob_key not in tensors:
        found = sorted(k for k in tensors if k.startswith(f"{key}.quant_state."))
        what = f"it has {', '.join(found)}; only nf4 is supported" if found else "is the layer quantized with bitsandbytes?"
        raise ModelLoadError(f"checkpoint has no NF4 quantization state '{blob_key}': {what}")

    def tensor(name: str) -> torch.Tensor:
        if f"{key}.{name}" not in tensors:
            raise ModelLoadError(f"bnb-4bit checkpoint is missing '{key}.{name}'")
        return tensors[f"{key}.{name}"]

    meta = json.loads(bytes(tensors[blob_key].to(torch.uint8).tolist()).decode("utf-8"))
    if meta.get("quant_type") != "nf4" or meta.get("blocksize") not in BLOCKSIZES or meta.get("dtype") not in _FLOAT_DTYPES:
        raise ModelLoadError(
            f"unsupported bnb-4bit quantization state for '{key}': {meta} "
            f"(need quant_type nf4, blocksize in {BLOCKSIZES}, dtype in {sorted(_FLOAT_DTYPES)})"
        )
    if not torch.equal(tensor("quant_map").float().cpu(), NF4_CODEBOOK):
        raise ModelLoadError(f"'{key}.quant_map' is not the NF4 codebook: {tensor('quant_map').tolist()}")
    shape = torch.Size(meta["shape"])
    numel, n_blocks = shape.numel(), -(-shape.numel() // meta["blocksize"])
    codes = tensors[key].contiguous().view(torch.uint8).reshape(-1)
    if codes.numel() != (numel + 1) // 2:
        raise ModelLoadError(f"'{key}' holds {codes.numel()} bytes, expected {(numel + 1) // 2} for shape {list(shape)}")
    fields = {}
    if "nested_offset" in meta or f"{key}.nested_absmax" in tensors:
        if meta.get("nested_blocksize") != NESTED_BLOCKSIZE:
            raise ModelLoadError(f"'{blob_key}' has nested_blocksize {meta.get('nested_blocksize')}, expected {NESTED_BLOCKSIZE}")
        if not torch.equal(tensor("nested_quant_map").float().cpu(), DYNAMIC_MAP):
            raise ModelLoadError(f"'{key}.nested_quant_map' is not bitsandbytes' 8-bit dynamic map")
        if tensor("absmax").dtype != torch.uint8:
            raise ModelLoadError(f"'{key}.absmax' is {tensor('absmax').dtype}; with double quantization it must hold uint8 codes")
        fields["absmax_codes"] = tensor("absmax")
        fields["nested_absmax"] = tensor("nested_absmax").float()
        # float32 -> JSON (via a Python float) -> float32 is exact
        fields["offset"] = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=codes.device)
    else:
        fields["absmax"] = tensor("absmax").float()
    absmax = fields.get("absmax", fields.get("absmax_codes"))
    if absmax.numel() != n_blocks:
        raise ModelLoadError(f"'{key}.absmax' has {absmax.numel()} entries, expected {n_blocks} for shape {list(shape)}")
    if "nested_absmax" in fields and fields["nested_absmax"].numel() != -(-n_blocks // NESTED_BLOCKSIZE):
        raise ModelLoadError(f"'{key}.nested_absmax' has {fields['nested_absmax'].numel()} entries, expected {-(-n_blocks // NESTED_BLOCKSIZE)}")
    state = NF4State(codes=codes, shape=shape, dtype=_FLOAT_DTYPES[meta["dtype"]], blocksize=meta["blocksize"], **fields)
    return Linear4bit(state, tensors.get(bias_key), compute_dtype)
