"""Linear4bit, quantize_model and the bnb-4bit checkpoint loader, against bitsandbytes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from slimtune.errors import ModelLoadError
from slimtune.quant import Linear4bit, load_bnb_4bit_state, quantize_model, quantize_nf4

bnb = pytest.importorskip("bitsandbytes")
bnb_functional = bnb.functional


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """bitsandbytes' kernels use the system OpenMP runtime, torch its own; on a few busy cores each
    waits for the other's spinning threads. One torch thread avoids it (see tests/quant/test_nf4.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bnb_dequantized(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> torch.Tensor:
    """bitsandbytes' quantize + dequantize of `weight` (flattened: its AVX-512 CPU kernel mis-scales
    rows that are not a whole number of blocks, see test_nf4.bnb_dequantize)."""
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    return bnb_state_dequantized(packed, state)


def bnb_state_dequantized(packed: torch.Tensor, state) -> torch.Tensor:
    flat_state = copy.copy(state)
    flat_state.shape = torch.Size([state.shape.numel()])
    return bnb_functional.dequantize_4bit(packed, flat_state).reshape(state.shape)


def make_linear(d_in: int = 96, d_out: int = 40, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    linear = nn.Linear(d_in, d_out, bias=bias)
    if bias:
        nn.init.normal_(linear.bias)  # non-zero, so a dropped bias shows
    return linear


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_forward_equals_linear_with_bnb_weight(compute_dtype, double_quant):
    linear = make_linear()
    layer = Linear4bit.from_linear(linear, double_quant=double_quant, compute_dtype=compute_dtype)
    weight = bnb_dequantized(linear.weight.detach(), double_quant=double_quant)
    x = torch.randn(3, 5, 96)
    expected = F.linear(x.to(compute_dtype), weight.to(compute_dtype), linear.bias.detach().to(compute_dtype))
    out = layer(x)
    assert out.dtype == x.dtype, "output comes back in the input dtype"
    assert torch.equal(out, expected.to(x.dtype))
    assert torch.equal(layer.dequantized_weight(torch.float32), weight)
    assert layer.dequantized_weight().dtype == compute_dtype


def test_backward_reaches_input_without_saving_the_weight():
    linear = make_linear(bias=False)
    layer = Linear4bit.from_linear(linear, compute_dtype=torch.float32)
    weight = bnb_dequantized(linear.weight.detach())
    x = torch.randn(4, 96, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    torch.testing.assert_close(x.grad, grad_out @ weight, rtol=0, atol=1e-6)
    # a plain F.linear would save W (40 x 96 floats) for the backward pass; the 4-bit layer saves no weight
    assert not any(t.numel() >= 40 * 96 and t.is_floating_point() for t in saved), [tuple(t.shape) for t in saved]
    assert all(not p.requires_grad for p in layer.parameters()), "the 4-bit layer is frozen"


def test_weight_bytes_per_parameter():
    linear = nn.Linear(4096, 1024, bias=False)
    n = linear.weight.numel()
    for double_quant in (True, False):
        layer = Linear4bit.from_linear(linear, double_quant=double_quant)
        packed, state = bnb_functional.quantize_4bit(linear.weight.detach(), blocksize=64, compress_statistics=double_quant, quant_type="nf4")
        bnb_bytes = packed.numel() + state.absmax.numel() * state.absmax.element_size()
        if double_quant:
            bnb_bytes += state.state2.absmax.numel() * 4 + 4  # nested absmax and the float32 offset
        assert layer.weight_bytes() == bnb_bytes
    # by hand: n/2 bytes of codes + n/64 8-bit absmax + 4 bytes per 256 blocks + 4 for the offset
    layer = Linear4bit.from_linear(linear, double_quant=True)
    assert layer.weight_bytes() == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4
    assert layer.weight_bytes() / n <= 0.56
    assert Linear4bit.from_linear(linear, double_quant=False).weight_bytes() / n == 0.5 + 4 / 64


def test_to_dtype_moves_but_never_rounds_the_constants():
    for double_quant in (True, False):
        layer = Linear4bit.from_linear(make_linear(), double_quant=double_quant, compute_dtype=torch.float32)
        before = layer.dequantized_weight()
        layer.to(torch.bfloat16)
        assert all(t.dtype in (torch.uint8, torch.float32) for t in layer.state.tensors().values())
        assert torch.equal(layer.dequantized_weight(), before)
        assert layer.bias.dtype == torch.bfloat16, "the bias follows .to(dtype) like any parameter"
        assert set(layer.state_dict()) == {"weight", "bias"} | set(layer.state.tensors()) - {"codes"}


def test_quantize_model_swaps_every_linear_but_the_head(tiny_model):
    reference = copy.deepcopy(tiny_model)
    expected = [name for name, m in tiny_model.named_modules() if isinstance(m, nn.Linear) and name != "lm_head"]
    replaced = quantize_model(tiny_model, compute_dtype=torch.float32)
    assert replaced == expected and len(replaced) == 14
    assert all(isinstance(tiny_model.get_submodule(name), Linear4bit) for name in replaced)
    assert type(tiny_model.lm_head) is nn.Linear
    # the reference model with bitsandbytes' dequantized weights computes the same logits
    with torch.no_grad():
        for name in expected:
            module = reference.get_submodule(name)
            module.weight.copy_(bnb_dequantized(module.weight))
        ids = torch.randint(0, 200, (2, 12))
        assert torch.equal(tiny_model(ids).logits, reference(ids).logits)


def test_quantize_model_refuses_a_model_with_lora():
    model = nn.Sequential(nn.Linear(8, 8))
    model[0].lora_A = nn.Linear(8, 2)
    with pytest.raises(ValueError, match="LoRA"):
        quantize_model(model)


def test_loads_a_transformers_bnb_4bit_checkpoint(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    quantized = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=config, device_map="cpu")
    quantized.save_pretrained(tmp_path, safe_serialization=True)
    tensors = load_file(tmp_path / "model.safetensors")
    original = load_file(tiny_model_dir / "model.safetensors")

    suffix = ".weight.quant_state.bitsandbytes__nf4"
    prefixes = [key[: -len(suffix)] for key in tensors if key.endswith(suffix)]
    assert len(prefixes) == 14
    for prefix in prefixes:
        layer = load_bnb_4bit_state(tensors, prefix, compute_dtype=torch.float32)
        bnb_weight = quantized.get_submodule(prefix).weight
        expected = bnb_state_dequantized(bnb_weight.data, bnb_weight.quant_state)
        assert torch.equal(layer.dequantized_weight(), expected), prefix
        # and bitsandbytes (through transformers) quantized exactly as quantize_nf4 does
        ours = quantize_nf4(original[f"{prefix}.weight"])
        assert torch.equal(layer.weight, ours.codes) and torch.equal(layer.absmax_codes, ours.absmax_codes)
        assert torch.equal(layer.nested_absmax, ours.nested_absmax) and torch.equal(layer.offset, ours.offset)


@pytest.mark.parametrize(
    "double_quant, storage", [(False, torch.uint8), (True, torch.uint8), (True, torch.bfloat16)],
    ids=["plain", "double-quant", "bf16-storage"],
)
def test_loads_a_bnb_linear4bit_state_dict_with_bias(tmp_path, double_quant, storage):
    linear = make_linear()
    reference = bnb.nn.Linear4bit(
        96, 40, compute_dtype=torch.float32, compress_statistics=double_quant, quant_type="nf4", quant_storage=storage
    )
    reference.load_state_dict(linear.state_dict())
    reference = reference.to("cpu")  # bitsandbytes quantizes here
    assert reference.weight.dtype == storage
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "layer.safetensors")
    layer = load_bnb_4bit_state(load_file(tmp_path / "layer.safetensors"), "", compute_dtype=torch.float32)
    expected = bnb_state_dequantized(reference.weight.data, reference.weight.quant_state)
    assert torch.equal(layer.dequantized_weight(), expected)
    assert torch.equal(layer.bias, linear.bias.detach())
    x = torch.randn(2, 96)
    assert torch.equal(layer(x), F.linear(x, expected, linear.bias.detach()))


def test_loader_names_what_is_wrong():
    packed, state = bnb_functional.quantize_4bit(torch.randn(8, 64), blocksize=64, quant_type="fp4")
    tensors = {"layer.weight": packed, **{f"layer.weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    with pytest.raises(ModelLoadError, match="bitsandbytes__fp4; only nf4"):
        load_bnb_4bit_state(tensors, "layer")
    with pytest.raises(ModelLoadError, match="'other.weight'"):
        load_bnb_4bit_state(tensors, "other")
    packed, state = bnb_functional.quantize_4bit(torch.randn(8, 64), blocksize=64, quant_type="nf4")
    tensors = {"layer.weight": packed[:-1], **{f"layer.weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    with pytest.raises(ModelLoadError, match="holds 255 bytes, expected 256"):
        load_bnb_4bit_state(tensors, "layer")


def test_dequantize_model_restores_plain_linears_with_bnb_weights():
    """dequantize_model is the inverse view of quantize_model: nn.Linear layers whose weights are the
    bitsandbytes-dequantized NF4 weights (bnb is the oracle)."""
    from conftest import make_tiny_model
    from test_nf4 import bnb_dequantize, bnb_quantize  # flattened: works around bnb's AVX-512 row bug
    from slimtune.quant import Linear4bit, dequantize_model, quantize_model

    model = make_tiny_model(300)
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    quantize_model(model)
    replaced = dequantize_model(model)
    assert sorted(replaced) == sorted(originals), "every quantized layer comes back"
    assert not any(isinstance(m, Linear4bit) for m in model.modules())
    for name, weight in originals.items():
        packed, state = bnb_quantize(weight, 64, True)
        expected = bnb_dequantize(packed, state, torch.float32).view(weight.shape)
        got = model.get_submodule(name).weight
        assert torch.equal(got, expected), f"{name}: dequantized weight differs from bitsandbytes'"
