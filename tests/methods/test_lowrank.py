"""The memory-lean dropout low-rank path equals plain autograd through B(A(dropout(x))) with the same mask."""

import pytest
import torch

from slimtune.methods.lowrank import dropped_low_rank, keep_mask

P, SCALE = 0.25, 2.0


def _reference(x, a, b):
    """Autograd through the unfused maths; keep_mask draws the same mask from the same RNG state."""
    return (torch.where(keep_mask(x.shape, P, x.device), x, 0) @ a.t() @ b.t()) * (SCALE / (1 - P))


@pytest.mark.parametrize("autocast", [False, True])
def test_matches_autograd_with_the_same_mask(autocast):
    torch.manual_seed(0)
    x0 = torch.randn(3, 10, 32, dtype=torch.bfloat16 if autocast else torch.float32)
    a0, b0, g = torch.randn(4, 32), torch.randn(24, 4), torch.randn(3, 10, 24)
    results = []
    for fn in (dropped_low_rank, None):
        x, a, b = (t.clone().requires_grad_() for t in (x0, a0, b0))
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = fn(x, a, b, P, SCALE) if fn else _reference(x, a.to(x.dtype), b.to(x.dtype))
        (y.float() * g).sum().backward()
        results.append([y.float(), x.grad.float(), a.grad, b.grad])
    tolerance = 2e-2 if autocast else 1e-5
    for name, got, want in zip(("output", "dx", "dA", "dB"), *results):
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < tolerance, f"{name} differs from autograd's by {rel:.2e} (relative)"
    assert results[1][2].dtype == torch.float32, "A's gradient comes back in A's dtype"


def test_keeps_x_itself_not_a_dropped_copy():
    x = torch.randn(5, 64, requires_grad=True)
    a, b = torch.randn(4, 64, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        dropped_low_rank(x, a, b, P, SCALE)
    full = [t for t in saved if t.shape == x.shape]
    assert len(full) == 2 and {t.dtype for t in full} == {torch.float32, torch.bool}
    assert any(t.data_ptr() == x.data_ptr() for t in full), "x itself is kept, so adapters sharing x share it"
