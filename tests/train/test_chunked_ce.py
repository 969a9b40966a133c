"""Chunked LM-head cross-entropy equals the plain (materialised logits) computation, values and grads."""

import pytest
import torch
import torch.nn.functional as F

from slimtune.train.chunked_ce import chunked_cross_entropy_sum


@pytest.mark.parametrize("keep_grad_bytes", [0, 2**30], ids=["recomputed", "kept"])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_matches_plain_cross_entropy(chunk, keep_grad_bytes):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,))

    reference = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    ref_grads = torch.autograd.grad(reference * 1.7, (hidden, weight))
    value = chunked_cross_entropy_sum(hidden, weight, targets, chunk=chunk, keep_grad_bytes=keep_grad_bytes)
    grads = torch.autograd.grad(value * 1.7, (hidden, weight))

    # fp64 in, but the log-softmax runs in fp32 by design: tolerances are fp32-sized.
    assert torch.allclose(value.double(), reference, rtol=1e-6, atol=1e-5), f"loss {value} != {reference}"
    for name, got, want in zip(("hidden", "weight"), grads, ref_grads):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), f"grad of {name} differs by {(got - want).abs().max()}"


def test_frozen_weight_gets_no_gradient():
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(11, 8)  # frozen head, as in LoRA
    loss = chunked_cross_entropy_sum(hidden, weight, torch.tensor([0, 3, 10, 2, 2]), chunk=2)
    loss.backward()
    assert weight.grad is None, "a frozen head must not receive a gradient"
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()


@pytest.mark.parametrize("keep_grad_bytes", [0, 2**30], ids=["recomputed", "kept"])
def test_bf16_compute_close_to_fp32(keep_grad_bytes):
    """bf16 matmuls (the training setting) stay within bf16 rounding of the fp32 loss and gradients."""
    torch.manual_seed(1)
    hidden = torch.randn(40, 32, requires_grad=True)
    weight = torch.randn(300, 32) * 0.3
    targets = torch.randint(0, 300, (40,))
    reference = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    (want,) = torch.autograd.grad(reference * 0.5, (hidden,))
    value = chunked_cross_entropy_sum(hidden, weight, targets, chunk=16, compute_dtype=torch.bfloat16,
                                      keep_grad_bytes=keep_grad_bytes)
    (got,) = torch.autograd.grad(value * 0.5, (hidden,))
    assert abs(value.item() - reference.item()) < 2e-2 * abs(reference.item())
    assert ((got - want).norm() / want.norm()).item() < 2e-2
