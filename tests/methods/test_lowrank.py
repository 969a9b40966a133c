"""The memory-lean dropout low-rank path equals plain autograd through B(A(dropout(x))) with the same mask."""

import os
import shutil

import pytest
import torch

from slimtune.methods.lowrank import draw_mask_seed, dropped_low_rank, keep_mask, masked

P, SCALE = 0.25, 2.0


def _reference(x, a, b):
    """Autograd through the unfused maths, with the mask drawn the same way from the same RNG state."""
    return (torch.where(keep_mask(x.shape, P, x.device, draw_mask_seed()) != 0, x, 0) @ a.t() @ b.t()) * (SCALE / (1 - P))


@pytest.fixture(params=["redrawn", "kept"])
def mask_mode(request, monkeypatch):
    """Both ways backward gets the mask: redrawn from its seed, or kept from forward (small masks)."""
    import slimtune.methods.lowrank as lowrank

    monkeypatch.setattr(lowrank, "KEEP_MASK_ELEMENTS", 0 if request.param == "redrawn" else 2**30)
    return request.param


@pytest.mark.parametrize("autocast", [False, True])
def test_matches_autograd_with_the_same_mask(autocast, mask_mode):
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


def test_keeps_x_itself_not_a_dropped_copy_and_a_mask_only_when_small(mask_mode):
    x = torch.randn(5, 64, requires_grad=True)
    a, b = torch.randn(4, 64, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        dropped_low_rank(x, a, b, P, SCALE)
    full = [t for t in saved if t.shape == x.shape]
    assert full[0].data_ptr() == x.data_ptr(), "x itself is kept, so adapters sharing x share it"
    if mask_mode == "redrawn":
        assert len(full) == 1, f"only x is kept at full size, got {[t.dtype for t in full]}"
    else:
        assert [t.dtype for t in full[1:]] == [torch.int8], "besides x, one byte-per-element mask"


def test_mask_depends_on_the_seed_alone():
    """Backward redraws the forward's mask from the seed, whatever ran on the global RNG in between."""
    shape = torch.Size([64, 1000])
    first = keep_mask(shape, P, torch.device("cpu"), 3)
    torch.rand(10)
    assert torch.equal(first, keep_mask(shape, P, torch.device("cpu"), 3))
    assert not torch.equal(first, keep_mask(shape, P, torch.device("cpu"), 4))


@pytest.mark.parametrize("p", [0.05, 0.25, 0.9])
def test_mask_keeps_one_minus_p_and_is_all_or_no_bits(p):
    mask = keep_mask(torch.Size([1000, 1000]), p, torch.device("cpu"), 0)
    assert mask.dtype == torch.int16 and set(mask.unique().tolist()) == {-1, 0}
    kept = (mask != 0).float().mean().item()
    # Binomial(1e6, p) has sd <= 5e-4: 3e-3 is 6 of them.
    assert abs(kept - (1 - p)) < 3e-3, f"kept fraction {kept:.4f}, expected {1 - p}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_masked_equals_where_bit_for_bit(dtype):
    torch.manual_seed(0)
    t = torch.randn(64, 33, dtype=dtype)
    t[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0], dtype=dtype)
    mask = keep_mask(t.shape, 0.5, t.device, 1)
    want = torch.where(mask != 0, t, torch.zeros((), dtype=dtype))
    got = masked(t, mask)
    assert got.dtype == dtype
    int_dtype = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    assert torch.equal(got.view(int_dtype), want.view(int_dtype))


@pytest.mark.skipif(shutil.which(os.environ.get("CXX") or "g++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
@pytest.mark.parametrize("checkpointed", [False, True])
def test_compiled_path_draws_a_mask_per_call_and_differentiates_through_it(checkpointed):
    """Inside torch.compile (train.compile) the masks come from an operator opaque to the compiler.
    With A = B = I the output is c (m * x), so each call's mask can be read back from its output; the
    gradients must then equal autograd through the plain formula with those masks (also when activation
    checkpointing recomputes the forward in backward), and three calls on one x (q, k and v's adapters)
    must draw three different masks."""
    torch.manual_seed(0)
    d, n_calls = 16, 3
    x0 = torch.randn(8, 40, d) + 3.0  # no zeros: a zero output means a dropped element
    eye = torch.eye(d)
    weights = torch.randn(n_calls)

    def adapters(x, a_list, b_list):
        return [dropped_low_rank(x, a, b, P, SCALE) for a, b in zip(a_list, b_list)]

    def run(x, a_list, b_list):
        if checkpointed:
            return torch.utils.checkpoint.checkpoint(adapters, x, a_list, b_list, use_reentrant=False)
        return adapters(x, a_list, b_list)

    compiled = torch.compile(run, dynamic=True)
    x = x0.clone().requires_grad_()
    a_list = [eye.clone().requires_grad_() for _ in range(n_calls)]
    b_list = [eye.clone().requires_grad_() for _ in range(n_calls)]
    outs = compiled(x, a_list, b_list)
    sum(w * (o * torch.arange(o.numel()).view(o.shape)).sum() for w, o in zip(weights, outs)).backward()

    c = SCALE / (1 - P)
    masks = [(o.detach() != 0).float() for o in outs]
    for mask, out in zip(masks, outs):
        kept = mask.mean().item()
        assert abs(kept - (1 - P)) < 0.05, f"kept fraction {kept:.3f}, expected {1 - P}"
        assert torch.allclose(out.detach(), c * mask * x0, rtol=1e-5, atol=1e-5)
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2]), "one mask per call"

    xr = x0.clone().requires_grad_()
    ar = [eye.clone().requires_grad_() for _ in range(n_calls)]
    br = [eye.clone().requires_grad_() for _ in range(n_calls)]
    refs = [((m * xr) @ a.t() @ b.t()) * c for m, a, b in zip(masks, ar, br)]
    sum(w * (o * torch.arange(o.numel()).view(o.shape)).sum() for w, o in zip(weights, refs)).backward()
    for name, got, want in [("dx", x.grad, xr.grad), *[(f"dA{i}", a.grad, r.grad) for i, (a, r) in enumerate(zip(a_list, ar))],
                            *[(f"dB{i}", b.grad, r.grad) for i, (b, r) in enumerate(zip(b_list, br))]]:
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-3), f"{name} does not follow the masks of the forward"


@pytest.mark.parametrize("p", [0.0, 0.05, 0.5, 0.97])
def test_bool_mask_is_the_same_draw(p):
    """The compiled path's bool mask keeps exactly what the eager path's int16 mask keeps."""
    from slimtune.methods.lowrank import keep_mask_bool

    shape = torch.Size([37, 129])
    assert torch.equal(keep_mask_bool(shape, p, torch.device("cpu"), 5), keep_mask(shape, p, torch.device("cpu"), 5) != 0)
