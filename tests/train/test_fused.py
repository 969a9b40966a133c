"""Fused RMSNorm / SwiGLU equal the transformers modules they replace, in values and gradients."""

import copy

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from slimtune.train.fused import FusedRMSNorm, FusedSwiGLU, fuse_modules


# Llama normalises in fp32 whatever the input dtype, so even fp64 agrees only to fp32 precision.
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_rmsnorm_matches_llama(dtype, tol):
    torch.manual_seed(0)
    reference = LlamaRMSNorm(24, eps=1e-5).to(dtype)
    torch.nn.init.normal_(reference.weight, mean=1.0, std=0.3)
    fused = FusedRMSNorm(copy.deepcopy(reference.weight), 1e-5)
    x = torch.randn(3, 7, 24, dtype=dtype)
    x_ref, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    upstream = torch.randn(3, 7, 24, dtype=dtype)
    y_ref, y_fused = reference(x_ref), fused(x_fused)
    (y_ref * upstream).sum().backward()
    (y_fused * upstream).sum().backward()
    assert y_fused.dtype == y_ref.dtype
    assert torch.allclose(y_fused.float(), y_ref.float(), atol=tol, rtol=tol), "RMSNorm outputs differ"
    assert torch.allclose(x_fused.grad.float(), x_ref.grad.float(), atol=tol * 10, rtol=tol * 10), \
        f"input gradients differ by {(x_fused.grad.float() - x_ref.grad.float()).abs().max()}"
    assert torch.allclose(fused.weight.grad.float(), reference.weight.grad.float(), atol=tol * 10, rtol=tol * 10), \
        "weight gradients differ"


def test_swiglu_matches_llama_mlp():
    from transformers import LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=16, intermediate_size=40, hidden_act="silu", num_attention_heads=4, num_key_value_heads=2)
    reference = LlamaMLP(config).double()
    fused = FusedSwiGLU(reference.gate_proj, reference.up_proj, reference.down_proj)
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    (reference(x) ** 2).sum().backward()
    grads_ref = {n: p.grad.clone() for n, p in reference.named_parameters()}
    reference.zero_grad()
    (fused(x2) ** 2).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-10), "input gradients differ"
    for name, param in reference.named_parameters():
        assert torch.allclose(param.grad, grads_ref[name], atol=1e-10), f"gradient of {name} differs"


def test_swiglu_gradients_equal_the_stock_mlp_bit_for_bit_in_bf16():
    """In bf16 the fused backward runs the kernels autograd runs through the stock MLP, so the
    gradients are identical, not merely close (the forward is the same expression)."""
    from transformers import LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=80, hidden_act="silu", num_attention_heads=4, num_key_value_heads=2)
    reference = LlamaMLP(config).to(torch.bfloat16)
    fused = FusedSwiGLU(reference.gate_proj, reference.up_proj, reference.down_proj)
    x = torch.randn(3, 9, 32, dtype=torch.bfloat16)
    upstream = torch.randn(3, 9, 32, dtype=torch.bfloat16)
    grads = []
    for module in (reference, fused):
        inputs = x.clone().requires_grad_()
        reference.zero_grad()
        out = module(inputs)
        (out.float() * upstream.float()).sum().backward()
        grads.append([out, inputs.grad] + [p.grad.clone() for p in reference.parameters()])
    for name, got, want in zip(["output", "input grad", "gate", "up", "down"], grads[1], grads[0]):
        assert torch.equal(got, want), f"{name} differs from the stock module's"


def test_fuse_modules_keeps_model_outputs(tiny_model):
    torch.manual_seed(0)
    ids = torch.randint(0, 250, (2, 12))
    before = tiny_model(input_ids=ids).logits
    counts = fuse_modules(tiny_model)
    layers = tiny_model.config.num_hidden_layers
    assert counts == {"rmsnorm": 2 * layers + 1, "swiglu": layers}, f"unexpected swaps {counts}"
    after = tiny_model(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-5), f"fusing changed logits by {(before - after).abs().max()}"
