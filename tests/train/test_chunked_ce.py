"""Chunked LM-head cross-entropy equals the plain (materialised logits) computation, values and grads."""

import pytest
import torch
import torch.nn.functional as F

from slimtune.train.chunked_ce import chunked_cross_entropy_sum


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_matches_plain_cross_entropy(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,))

    reference = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    ref_grads = torch.autograd.grad(reference * 1.7, (hidden, weight))
    value = chunked_cross_entropy_sum(hidden, weight, targets, chunk=chunk)
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
