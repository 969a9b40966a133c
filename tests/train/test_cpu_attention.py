"""fp32-maths attention with bf16 memory equals fp32 SDPA, per example, up to bf16 rounding."""

import pytest
import torch
import torch.nn.functional as F

from slimtune.train.cpu_attention import fp32_attention

HEADS, KV_HEADS, DIM = 6, 2, 16


def _reference(q, k, v, mask, bounds, scale):
    """torch's SDPA in fp32 on the upcast inputs, each packed example on its own; (batch, T, heads, dim)."""
    qf, kf, vf = (t.float() for t in (q, k, v))
    if bounds is None:
        out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, is_causal=mask is None, scale=scale,
                                             enable_gqa=True)
    else:
        out = torch.cat([F.scaled_dot_product_attention(qf[:, :, a:b], kf[:, :, a:b], vf[:, :, a:b], is_causal=True,
                                                         scale=scale, enable_gqa=True)
                         for a, b in zip(bounds[:-1], bounds[1:])], dim=2)
    return out.transpose(1, 2)


def _run(fn, q, k, v, mask, bounds, grad):
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v, mask, bounds, 0.25)
    (out.float() * grad).sum().backward()
    return out.float(), [t.grad.float() for t in (q, k, v)]


@pytest.mark.parametrize("case", ["packed", "padded", "causal"])
def test_matches_fp32_sdpa(case):
    torch.manual_seed(0)
    batch, length = (1, 37) if case == "packed" else (3, 37)
    q, k, v = (torch.randn(batch, h, length, DIM, dtype=torch.bfloat16, requires_grad=True)
               for h in (HEADS, KV_HEADS, KV_HEADS))
    bounds = [0, 11, 12, 30, 37] if case == "packed" else None  # includes a one-token example
    mask = None
    if case == "padded":  # right padding, as training batches are padded
        keep = torch.arange(length)[None, :] < torch.tensor([37, 25, 9])[:, None]
        mask = (torch.ones(length, length, dtype=torch.bool).tril()[None] & keep[:, None, :])[:, None]
    grad = torch.randn(batch, length, HEADS, DIM)
    out, grads = _run(lambda *a: fp32_attention(*a[:5], scale=a[5], is_causal=mask is None), q, k, v, mask, bounds,
                      grad)
    ref_out, ref_grads = _run(_reference, q, k, v, mask, bounds, grad)
    assert out.shape == ref_out.shape == (batch, length, HEADS, DIM)
    # The output is rounded to bf16 once (relative 2^-9); gradients carry that rounding of O (through
    # rowsum(dO * O)) plus their own bf16 rounding.
    assert ((out - ref_out).norm() / ref_out.norm()) < 3e-3
    for name, got, want in zip("qkv", grads, ref_grads):
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < 6e-3, f"d{name} differs from fp32 SDPA's by {rel:.2e} (relative)"


def test_keeps_no_fp32_copies_for_backward():
    """What autograd keeps is bf16 q, k, v and output plus the fp32 log-sum-exp (heads x T)."""
    length = 64
    q, k, v = (torch.randn(1, h, length, DIM, dtype=torch.bfloat16, requires_grad=True)
               for h in (HEADS, KV_HEADS, KV_HEADS))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fp32_attention(q, k, v, None, [0, 30, length])
    fp32_bytes = sum(t.numel() * 4 for t in saved if t.dtype == torch.float32)
    assert fp32_bytes <= HEADS * length * 4, f"{fp32_bytes} bytes of fp32 tensors kept for backward"
    assert {t.dtype for t in saved} == {torch.bfloat16, torch.float32}


def test_layers_given_one_mask_keep_one_converted_copy():
    """A padded batch's boolean mask reaches every layer as one object: it is converted to the kernels'
    additive fp32 form once and shared by all layers' saved tensors, not kept once per layer. A mask
    changed in place, or a new mask, is converted again."""
    torch.manual_seed(0)
    length = 16
    mask = torch.ones(length, length, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
    mask[1, :, :, 10:] = False
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        for _ in range(3):  # three "layers"
            fp32_attention(*(torch.randn(2, h, length, DIM, dtype=torch.bfloat16, requires_grad=True)
                             for h in (HEADS, KV_HEADS, KV_HEADS)), mask, is_causal=False)
    masks = [t for t in saved if t.shape == mask.shape]
    assert len(masks) == 3 and len({t.data_ptr() for t in masks}) == 1, "one converted mask for all layers"
    assert torch.equal(masks[0] == 0, mask), "True (attend) -> 0, False -> -inf"

    mask[0, :, :, 5:] = False  # in place: a new version of the mask
    q, k, v = (torch.randn(2, h, length, DIM, dtype=torch.bfloat16) for h in (HEADS, KV_HEADS, KV_HEADS))
    got = fp32_attention(q, k, v, mask, is_causal=False).float()
    want = _reference(q, k, v, mask, None, None)
    assert ((got - want).norm() / want.norm()) < 3e-3, "a mask changed in place must be converted again"


def test_arguments_that_change_the_maths_go_to_transformers(monkeypatch):
    """A logit soft-cap (Gemma 2) or any other unknown argument must not be dropped silently: such calls
    take transformers' own SDPA function, and plain ones take the fp32 path."""
    import slimtune.train.packing as packing

    used = []
    monkeypatch.setattr(packing, "fp32_attention", lambda *a, **k: used.append("fp32") or (a[0].transpose(1, 2)))
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups, module.training = True, HEADS // KV_HEADS, False
    q, k, v = (torch.randn(1, h, 8, DIM, dtype=torch.bfloat16) for h in (HEADS, KV_HEADS, KV_HEADS))
    packing.packed_attention(module, q, k, v, None, position_ids=torch.arange(8)[None], use_cache=False)
    assert used == ["fp32"]
    try:
        packing.packed_attention(module, q, k, v, None, softcap=30.0)
    except Exception:  # transformers' SDPA function may refuse a soft-cap: also not a silent wrong result
        pass
    assert used == ["fp32"], "a call with softcap must not take the fp32 path"
