"""NF4 4-bit quantization with double quantization (QLoRA, Dettmers et al. 2023, arXiv:2305.14314).

A weight is flattened and cut into blocks of `blocksize` values (the last block may be short). Each
block b keeps its absolute maximum m_b = max |w| (eq. 1 of the paper, absmax scaling), and each value
is replaced by the index of the nearest entry of the 16-value NormalFloat codebook q (Sec. 3):

    code_i = argmin_j |w_i / m_b - q_j|,        w_i ~= q[code_i] * m_b.

Two codes share a byte, the earlier value in the high nibble. Double quantization (Sec. 3) stores
the block maxima themselves in 8 bits: subtract their mean c (they are all positive, so centring
uses the signed 8-bit range), cut the result into blocks of 256, scale each by its own absmax M and
code it with the signed 8-bit dynamic map d (Dettmers 2015, arXiv:1511.04561):

    m_b ~= d[k_b] * M_{b // 256} + c.

For a (4096, 4096) weight with blocksize 64 that is 0.5 + 1/64 + 4/(64*256) ~= 0.516 bytes per value
instead of 2 (bf16) or 0.5625 without double quantization.

Everything here matches bitsandbytes (0.50, CPU) bit for bit, so pre-quantized `bnb-4bit`
checkpoints load and our tests can use bitsandbytes as the reference:
- 4-bit codes: the value is multiplied by the float32 reciprocal 1 / m_b (not divided by m_b),
  clamped to [-1, 1] and placed against the float32 midpoints of neighbouring codebook entries;
  a value exactly on a midpoint takes the lower code. bitsandbytes' CUDA decision tree does the same
  (its thresholds are these midpoints); its CPU path divides in the short last block instead.
- 8-bit codes of the centred maxima: bitsandbytes' CPU kernel does not search the map for the
  nearest entry; it first snaps the scaled value v to a grid of 65,536 points on [-1, 1],
  i = floor((v + 1) * 0.5 * 65535 + 0.5), and returns the map entry nearest to grid point i. We do
  the same (`quantize_dynamic_8bit`). For ~0.16% of values that entry is one step away from the
  exact nearest one, which bitsandbytes' CUDA kernel returns, so CUDA-made checkpoints differ
  there (they still load: dequantization is the same everywhere).
- A block whose absmax is 0 gets code 7 (the exact 0 of the codebook) in 4 bits and code 0 in 8 bits.
- Dequantization multiplies in float32 and rounds once to the requested dtype (round to nearest even).

Pure torch: runs wherever the tensors live (CPU or CUDA), no compiled extension. A fused
dequantize-and-matmul GPU kernel is deliberately out of scope here.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass, replace

import torch

# Appendix E of the QLoRA paper (bitsandbytes' `get_4bit_type("nf4")` holds the same values). Built
# from quantiles of N(0, 1): 8 for the positive half and 7 for the negative half, so that 0 is exact
# and -1, 1 are both representable; the whole set is divided by its largest value.
NF4_CODEBOOK = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # those bitsandbytes accepts for 4-bit
NESTED_BLOCKSIZE = 256  # block size of the 8-bit double quantization (fixed in QLoRA and bitsandbytes)
_LUT_POINTS = 65536  # grid of bitsandbytes' CPU 8-bit quantizer


def make_dynamic_map() -> torch.Tensor:
    """The signed 8-bit dynamic map (256 sorted float32 values in [-0.993, 1]) used for double quantization.

    Dynamic tree quantization (Dettmers 2015): a decimal exponent 10^-e, e = 6..0, and a linear
    fraction in [0.1, 1]; the smaller the exponent, the fewer fraction points. Exponent 10^(i-6)
    (i = 0..6) contributes the 2^i midpoints of an even split of [0.1, 1] into 2^i intervals, with
    both signs; 0 and 1 complete the 256 entries. Equal to bitsandbytes' `create_dynamic_map()`.
    """
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1.0, 2**i + 1, dtype=torch.float32)
        magnitudes = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - 6)
        values += magnitudes.tolist() + (-magnitudes).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_MAP = make_dynamic_map()


@functools.cache
def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lookup tables on `device`: (byte -> its two NF4 values (256, 2), the 15 NF4 midpoints,
    dynamic map, 65,536-point grid -> nearest dynamic-map code)."""
    nf4 = NF4_CODEBOOK.to(device)
    byte_to_pair = torch.stack([nf4.repeat_interleave(16), nf4.repeat(16)], dim=1)  # byte 16 * hi + lo
    nf4_midpoints = (nf4[:-1] + nf4[1:]) / 2
    dynamic = DYNAMIC_MAP.to(device)
    dynamic_midpoints = 0.5 * (dynamic[:-1] + dynamic[1:])
    grid = -1.0 + (2.0 * torch.arange(_LUT_POINTS, dtype=torch.float32, device=device)) / (_LUT_POINTS - 1)
    # entry i: how many midpoints lie strictly below grid point i, i.e. the index of its nearest map value
    grid_to_code = torch.searchsorted(dynamic_midpoints, grid, right=False).to(torch.uint8)
    return byte_to_pair, nf4_midpoints, dynamic, grid_to_code


@dataclass(frozen=True)
class NF4State:
    """A weight in NF4: packed codes plus the constants that scale them back.

    `absmax` is set without double quantization; `absmax_codes`, `nested_absmax` and `offset` with it.
    """

    codes: torch.Tensor  # uint8 ((numel + 1) // 2,): two 4-bit codes per byte, earlier value in the high nibble
    shape: torch.Size  # shape of the original weight
    dtype: torch.dtype  # dtype of the original weight (the default dequantization dtype)
    blocksize: int
    absmax: torch.Tensor | None = None  # float32 (n_blocks,): m_b
    absmax_codes: torch.Tensor | None = None  # uint8 (n_blocks,): k_b, 8-bit codes of m_b - offset
    nested_absmax: torch.Tensor | None = None  # float32 (ceil(n_blocks / 256),): M
    offset: torch.Tensor | None = None  # float32 (): c, the mean of the m_b

    @property
    def double_quant(self) -> bool:
        return self.absmax_codes is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def block_absmax(self) -> torch.Tensor:
        """float32 (n_blocks,): m_b, decoded from the 8-bit codes when double quantized."""
        if not self.double_quant:
            return self.absmax
        _, _, dynamic, _ = _tables(self.absmax_codes.device)
        centred = _scale_blocks(torch.index_select(dynamic, 0, self.absmax_codes.int()), self.nested_absmax,
                                NESTED_BLOCKSIZE)
        return centred + self.offset

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by field name (None fields left out)."""
        names = ("codes", "absmax", "absmax_codes", "nested_absmax", "offset")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def nbytes(self) -> int:
        """Bytes of the codes and the scaling constants (the shared codebooks are not counted)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device: torch.device | str) -> NF4State:
        """The same state on another device (values unchanged)."""
        return replace(self, **{name: t.to(device) for name, t in self.tensors().items()})


def _scale_blocks(values: torch.Tensor, scales: torch.Tensor, blocksize: int,
                  dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """values (n,) * scales[i // blocksize], computed in float32 and rounded once to `dtype` (into
    `out`, (n,), when given); the last block may be short."""
    n = values.numel()
    if n % blocksize == 0:  # the usual case: no padding copy, and the product is rounded as it is stored
        out = torch.empty(n, dtype=dtype, device=values.device) if out is None else out
        return torch.mul(values.view(-1, blocksize), scales.view(-1, 1), out=out.view(-1, blocksize)).view(-1)
    padded = torch.nn.functional.pad(values, (0, -n % blocksize)).view(-1, blocksize)
    product = (padded * scales.view(-1, 1)).view(-1)[:n]
    return product.to(dtype) if out is None else out.copy_(product)


def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks (n_blocks, blocksize) zero-padded, absmax (n_blocks,)) of a float32 vector."""
    blocks = torch.nn.functional.pad(flat, (0, -flat.numel() % blocksize)).view(-1, blocksize)
    return blocks, blocks.abs().amax(dim=1)


def quantize_dynamic_8bit(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization of a float32 vector: (codes uint8 (n,), absmax float32 (ceil(n / 256),)).

    values_i ~= DYNAMIC_MAP[codes_i] * absmax[i // 256]. Each block of 256 is multiplied by the float32
    reciprocal of its absmax, giving v in [-1, 1]; v goes to grid point floor((v + 1) * 0.5 * 65535 + 0.5)
    (each step rounded to float32) and takes the map entry nearest to that point, as bitsandbytes'
    CPU `quantize_blockwise(values, blocksize=256)` does (see the module docstring).
    """
    _, _, _, grid_to_code = _tables(values.device)
    n = values.numel()
    blocks, absmax = _blockwise_absmax(values, NESTED_BLOCKSIZE)
    scaled = (blocks * (1.0 / absmax).view(-1, 1)).clamp(-1.0, 1.0)  # NaN where absmax == 0, handled below
    grid_index = ((scaled + 1.0) * 0.5 * (_LUT_POINTS - 1) + 0.5).nan_to_num(0.0).to(torch.int64)
    codes = torch.where(absmax.view(-1, 1) == 0, 0, grid_to_code[grid_index])
    return codes.view(-1)[:n], absmax


_BLOCKS_PER_CHUNK = 4096  # quantize_nf4 works on 4096 blocks (2^18 values at block size 64) at a time


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4State:
    """Quantize a float32/bf16/fp16 tensor of any shape to NF4 (see the module docstring for the maths)."""
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"NF4 blocksize {blocksize} is not supported: use one of {', '.join(map(str, BLOCKSIZES))}")
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"NF4 quantizes float32, bfloat16 or float16 tensors, got {weight.dtype}: convert it first")
    if weight.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor (shape {tuple(weight.shape)})")
    _, nf4_midpoints, _, _ = _tables(weight.device)
    with torch.no_grad():
        flat = weight.detach().reshape(-1)
        n = flat.numel()
        packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=weight.device)
        absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=weight.device)
        # Whole blocks at a time, so the float32 work buffers (~25 bytes per element) stay a few MB
        # whatever the layer's size; every block is computed exactly as in one pass.
        step = blocksize * _BLOCKS_PER_CHUNK
        for start in range(0, n, step):
            part = flat[start: start + step].float()
            blocks, part_absmax = _blockwise_absmax(part, blocksize)  # (blocks, blocksize), (blocks,)
            scaled = (blocks * (1.0 / part_absmax.clamp(min=1e-38)).view(-1, 1)).clamp(-1.0, 1.0)
            codes = torch.bucketize(scaled.view(-1), nf4_midpoints, right=False, out_int32=True).to(torch.uint8)
            # zero padding codes to 7 (exact 0): it fills the low nibble of the last byte when n is odd
            m = part.numel()
            codes = codes[: m + m % 2]
            packed[start // 2: start // 2 + codes.numel() // 2] = (codes[0::2] << 4) | codes[1::2]
            absmax[start // blocksize: start // blocksize + part_absmax.numel()] = part_absmax
        state = NF4State(codes=packed, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize, absmax=absmax)
        if not double_quant:
            return state
        offset = absmax.mean()
        absmax_codes, nested_absmax = quantize_dynamic_8bit(absmax - offset)
    return replace(state, absmax=None, absmax_codes=absmax_codes, nested_absmax=nested_absmax, offset=offset)


class _Scratch(threading.local):
    """Per-thread work buffers for `dequantize_nf4(..., scratch=True)`, grown as needed, never shrunk."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (name, dtype, device)
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self.buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel]


_scratch = _Scratch()


def dequantize_nf4(state: NF4State, dtype: torch.dtype | None = None, scratch: bool = False) -> torch.Tensor:
    """The weight w_i = q[code_i] * m_b in `dtype` (default: the original dtype), original shape.

    With `scratch`, the result and its temporaries live in per-thread buffers that the next scratch
    call on the same thread overwrites: for a weight used in one matmul and dropped (the 4-bit layer's
    forward and backward). Training then allocates nothing per dequantization (measured: four
    1536 x 576 layers, forward + backward, 24.5 -> 22.2 ms on CPU). On CUDA the reuse is ordered by
    the stream, like any other write after a read on it.
    """
    byte_to_pair, _, _, _ = _tables(state.codes.device)
    dtype = dtype or state.dtype
    device = state.codes.device
    with torch.no_grad():
        # Each byte's two float32 values are looked up as one 8-byte word: a 1-D index_select over the
        # (256,) int64 view of the table is ~10x faster on CPU than byte_to_pair[codes] (measured on a
        # 1536 x 576 weight: 0.26 ms vs 2.6 ms), and this runs twice per layer per training step.
        table = byte_to_pair.view(torch.int64).view(-1)
        if scratch:
            index = _scratch.get("index", state.codes.numel(), torch.int32, device).copy_(state.codes)
            words = torch.index_select(table, 0, index, out=_scratch.get("words", index.numel(), torch.int64, device))
        else:
            words = torch.index_select(table, 0, state.codes.int())
        values = words.view(torch.float32)[: state.numel]  # q[code_i], float32
        out = _scratch.get("weight", state.numel, dtype, device) if scratch else None
        weight = _scale_blocks(values, state.block_absmax(), state.blocksize, dtype, out)
    return weight.view(state.shape)
