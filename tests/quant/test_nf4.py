"""NF4 quantization against bitsandbytes (the reference) and the QLoRA paper.

bitsandbytes runs here on its CPU backend: 4-bit quantization in its torch code, the 8-bit double
quantization and the dequantization in its C++ kernels.
"""

from __future__ import annotations

import copy

import pytest
import torch

from slimtune.quant.nf4 import (
    DYNAMIC_MAP,
    NF4_CODEBOOK,
    dequantize_nf4,
    quantize_dynamic_8bit,
    quantize_nf4,
)

bnb_functional = pytest.importorskip("bitsandbytes.functional")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """bitsandbytes' kernels use the system OpenMP runtime, torch its own; on a few busy cores each
    waits for the other's spinning threads (these tests ran 6x slower). One torch thread avoids it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# QLoRA paper (Dettmers et al. 2023, arXiv:2305.14314), Appendix E: the exact NF4 values.
PAPER_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]


def bnb_quantize(weight: torch.Tensor, blocksize: int, double_quant: bool):
    return bnb_functional.quantize_4bit(weight, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")


def bnb_dequantize(packed: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' dequantization of the flattened weight, reshaped.

    Flattened because bitsandbytes' AVX-512 CPU kernel (0.50) reads the wrong absmax when a row is
    not a whole number of blocks (e.g. rows of 96 with blocksize 64); blocks run over the flat
    tensor, so one long row is the layout every bitsandbytes kernel handles. Eager, because its
    odd-length fallback is otherwise torch.compile'd (seconds per call).
    """
    flat_state = copy.copy(state)
    flat_state.shape, flat_state.dtype = torch.Size([state.shape.numel()]), dtype
    with torch.compiler.set_stance("force_eager"):
        return bnb_functional.dequantize_4bit(packed, flat_state).reshape(state.shape)


def assert_same_as_bnb(ours, packed: torch.Tensor, theirs) -> None:
    assert torch.equal(ours.codes, packed.view(-1)), "packed 4-bit codes differ from bitsandbytes"
    if theirs.nested:
        assert ours.absmax is None
        assert torch.equal(ours.absmax_codes, theirs.absmax), "8-bit absmax codes differ"
        assert torch.equal(ours.nested_absmax, theirs.state2.absmax), "nested absmax differs"
        assert torch.equal(ours.offset, theirs.offset), "offset (mean absmax) differs"
    else:
        assert ours.absmax_codes is None
        assert torch.equal(ours.absmax, theirs.absmax), "block absmax differs"


def test_codebook_is_the_papers_table_and_bitsandbytes():
    assert NF4_CODEBOOK.dtype == torch.float32
    assert torch.equal(NF4_CODEBOOK, torch.tensor(PAPER_NF4, dtype=torch.float32))
    assert torch.equal(NF4_CODEBOOK, bnb_functional.get_4bit_type("nf4", device="cpu"))
    # asymmetric: 7 negative, exact 0, 8 positive values; both -1 and 1 representable
    assert (NF4_CODEBOOK < 0).sum() == 7 and (NF4_CODEBOOK > 0).sum() == 8 and NF4_CODEBOOK[7] == 0
    assert NF4_CODEBOOK[0] == -1 and NF4_CODEBOOK[-1] == 1


def test_codebook_follows_the_quantile_construction():
    # Appendix E: quantiles of N(0, 1) at 8 (positive) / 7 (negative) evenly spaced probabilities
    # between offset = 0.9677083 and 1/2, plus 0, normalised by the largest; float32 as in the paper's code.
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float().sort().values
    assert torch.equal(values / values.max(), NF4_CODEBOOK)


def test_dynamic_map_matches_bitsandbytes():
    assert torch.equal(DYNAMIC_MAP, bnb_functional.create_dynamic_map())
    assert DYNAMIC_MAP.unique().numel() == 256 and DYNAMIC_MAP[-1] == 1.0 and (DYNAMIC_MAP == 0).sum() == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize(
    "shape",
    [(256, 512), (40, 96), (3, 1000), (33, 65)],
    ids=["divisible", "rows-shorter-than-blocks", "ragged-last-block", "odd-numel"],
)
def test_quantize_and_dequantize_match_bitsandbytes(shape, blocksize, dtype):
    weight = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    for double_quant in (False, True):
        packed, theirs = bnb_quantize(weight, blocksize, double_quant)
        ours = quantize_nf4(weight, blocksize=blocksize, double_quant=double_quant)
        assert_same_as_bnb(ours, packed, theirs)
        for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
            dequantized = dequantize_nf4(ours, out_dtype)
            assert dequantized.shape == weight.shape and dequantized.dtype == out_dtype
            assert torch.equal(dequantized, bnb_dequantize(packed, theirs, out_dtype)), (shape, double_quant, out_dtype)
            # the scratch-buffer path, reused across every shape of this parametrisation
            assert torch.equal(dequantize_nf4(ours, out_dtype, scratch=True), dequantized), (shape, double_quant)
        assert dequantize_nf4(ours).dtype == dtype, "default dequantization dtype is the input's"


def test_scratch_buffers_are_per_thread():
    """A scratch result stays valid until the next scratch call on the same thread, whatever other
    threads (the server's engine thread, say) dequantize meanwhile."""
    import threading

    first = quantize_nf4(torch.randn(64, 128) * 0.02)
    other = quantize_nf4(torch.randn(64, 128) * 0.02)
    expected = dequantize_nf4(first, torch.bfloat16)
    mine = dequantize_nf4(first, torch.bfloat16, scratch=True)
    thread = threading.Thread(target=lambda: [dequantize_nf4(other, torch.bfloat16, scratch=True) for _ in range(3)])
    thread.start()
    thread.join()
    assert torch.equal(mine, expected)
    dequantize_nf4(other, torch.bfloat16, scratch=True)
    assert not torch.equal(mine, expected), "the same thread's next scratch call reuses the buffer"


def test_nibble_order_and_odd_length():
    # codes: 1.0 -> 15, -1.0 -> 0, 0.0 -> 7; the first value of each pair in the high nibble,
    # an odd tail padded with code 7 in the low nibble
    state = quantize_nf4(torch.tensor([1.0, -1.0, 0.0]), blocksize=64, double_quant=False)
    assert state.codes.tolist() == [0xF0, 0x77]
    assert torch.equal(dequantize_nf4(state), torch.tensor([1.0, -1.0, 0.0]))


def test_midpoint_ties_take_the_lower_code():
    midpoints = (NF4_CODEBOOK[:-1] + NF4_CODEBOOK[1:]) / 2  # 15 values exactly between neighbours
    weight = torch.cat([torch.ones(1), midpoints])  # absmax 1 keeps the values unscaled
    state = quantize_nf4(weight, blocksize=64, double_quant=False)
    codes = torch.stack([state.codes >> 4, state.codes & 0xF], dim=1).view(-1)[: weight.numel()]
    assert codes.tolist() == [15] + list(range(15)), "a value on a midpoint must take the lower code"
    packed, theirs = bnb_quantize(weight, 64, False)
    assert_same_as_bnb(state, packed, theirs)


def test_scaling_multiplies_by_the_float32_reciprocal():
    # values next to midpoint * absmax, found by search, whose code differs between x * (1 / m) and x / m
    m = 1.914515495300293
    near_midpoints = [-0.880668044090271, -0.44915950298309326, -0.2640341520309448, -0.08715835213661194,
                      0.07617886364459991, 0.3896446228027344, 0.5590649247169495, 0.7453449368476868,
                      0.9604425430297852, 1.2306256294250488, 1.6493139266967773]
    weight = torch.nn.functional.pad(torch.tensor([m, *near_midpoints]), (0, 64 - 12))  # one full block
    midpoints = (NF4_CODEBOOK[:-1] + NF4_CODEBOOK[1:]) / 2
    assert not torch.equal(torch.bucketize(weight / m, midpoints), torch.bucketize(weight * (1 / weight[0]), midpoints))
    packed, theirs = bnb_quantize(weight, 64, False)
    assert_same_as_bnb(quantize_nf4(weight, blocksize=64, double_quant=False), packed, theirs)


def test_zero_block():
    weight = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    weight[1] = 0.0  # one whole block of zeros
    for double_quant in (False, True):
        packed, theirs = bnb_quantize(weight, 64, double_quant)
        ours = quantize_nf4(weight, blocksize=64, double_quant=double_quant)
        assert_same_as_bnb(ours, packed, theirs)
        assert torch.equal(ours.codes[32:64], torch.full((32,), 0x77, dtype=torch.uint8)), "zeros take code 7"
        assert torch.equal(dequantize_nf4(ours)[1], torch.zeros(64))


def test_nested_8bit_codes_match_bitsandbytes_at_grid_edges():
    # bitsandbytes' CPU 8-bit quantizer snaps v to i = floor((v + 1) * 0.5 * 65535 + 0.5) first; probe
    # +-40 float32 steps around every grid edge i - 1/2 (v = (2i - 1) / 65535 - 1) and all-zero blocks.
    edges = torch.arange(1, 65536, 7, dtype=torch.float64) * 2 / 65535 - 1 - 1 / 65535
    steps = torch.arange(-40, 41, dtype=torch.float32)
    values = (edges.float().view(-1, 1) + steps * torch.finfo(torch.float32).eps / 2 * edges.float().abs().view(-1, 1))
    values = values.clamp(-1, 1).view(-1)
    values = torch.nn.functional.pad(values, (0, -values.numel() % 255)).view(-1, 255)
    values = torch.cat([torch.ones(values.shape[0], 1), values], dim=1).view(-1)  # absmax 1 per block
    values = torch.cat([values, torch.zeros(256), torch.randn(1000, generator=torch.Generator().manual_seed(2))])
    theirs_codes, theirs = bnb_functional.quantize_blockwise(values, blocksize=256)
    codes, absmax = quantize_dynamic_8bit(values)
    assert torch.equal(absmax, theirs.absmax)
    assert torch.equal(codes, theirs_codes), f"{(codes != theirs_codes).sum()} of {values.numel()} 8-bit codes differ"


def test_round_trip_error_matches_published_figure():
    # bitsandbytes' test suite expects a mean absolute error of 0.072798 for NF4, blocksize 64, on randn data
    weight = torch.randn(1024, 4096, generator=torch.Generator().manual_seed(3))
    error = (dequantize_nf4(quantize_nf4(weight)) - weight).abs().mean().item()
    packed, theirs = bnb_quantize(weight, 64, True)
    assert error == (bnb_dequantize(packed, theirs, torch.float32) - weight).abs().mean().item()
    assert abs(error - 0.072798) / 0.072798 < 0.01, error


def test_state_bytes_and_device_move():
    state = quantize_nf4(torch.randn(64, 4096), blocksize=64)
    n = 64 * 4096
    assert state.nbytes() == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4
    moved = state.to("cpu")
    assert torch.equal(dequantize_nf4(moved), dequantize_nf4(state))


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="blocksize 100 "):
        quantize_nf4(torch.randn(8, 8), blocksize=100)
    with pytest.raises(ValueError, match="torch.float64"):
        quantize_nf4(torch.randn(8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.randn(0, 8))


@pytest.mark.integration
@pytest.mark.parametrize("blocksize", [64, 128])
def test_real_weight_bit_exact(bundled_model_dir, blocksize):
    from safetensors import safe_open

    with safe_open(str(bundled_model_dir / "model.safetensors"), framework="pt") as f:
        weight = f.get_tensor("model.layers.0.self_attn.q_proj.weight")  # (576, 576)
    for w in (weight, weight.to(torch.bfloat16)):
        packed, theirs = bnb_quantize(w, blocksize, True)
        ours = quantize_nf4(w, blocksize=blocksize)
        assert_same_as_bnb(ours, packed, theirs)
        assert torch.equal(dequantize_nf4(ours), bnb_dequantize(packed, theirs, w.dtype))
