"""Choices made for the CPU stay on the CPU: on any other device attention is transformers' SDPA in the
input's dtype (flash / memory-efficient kernels in bf16 on CUDA), not the CPU's fp32 attention.

No GPU here: tensors on the meta device stand for a non-CPU device (SDPA infers shapes there)."""

import pytest
import torch

import slimtune.train.packing as packing


class _Attention(torch.nn.Module):
    is_causal = True


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_fp32_attention_is_chosen_only_for_bf16_on_cpu(device, monkeypatch):
    calls = []

    def spy(query, *args, **kwargs):
        calls.append(query.device.type)
        return torch.zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3], dtype=query.dtype,
                           device=query.device)

    monkeypatch.setattr(packing, "fp32_attention", spy)
    query = torch.randn(2, 4, 8, 16, dtype=torch.bfloat16, device=device)
    key = value = torch.randn(2, 4, 8, 16, dtype=torch.bfloat16, device=device)
    out, _ = packing.packed_attention(_Attention(), query, key, value, None, scaling=0.25)
    assert out.shape == (2, 8, 4, 16) and out.dtype == torch.bfloat16 and out.device.type == device
    assert calls == (["cpu"] if device == "cpu" else []), f"on {device}: fp32 attention calls {calls}"
