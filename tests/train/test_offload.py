"""The offloaded AdamW against torch's own AdamW: the same numbers, the moments kept on the host."""

import json

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from slimtune.config import build_config
from slimtune.stages import finetune
from slimtune.train.offload import OffloadedAdamW
from slimtune.train.optim8bit import AdamW8bit, build_optimizer


def _run(make_optimizer, steps=25, resume_at=None, scale_dtype=torch.bfloat16):
    """Regression with a weight matrix (fp32), a bias and a scale (bf16); returns the parameters, the
    optimizer and, with `resume_at`, continues from a state_dict round trip into a fresh optimizer."""
    torch.manual_seed(0)
    target = torch.randn(16, 24)
    inputs = torch.randn(64, 24)
    weight = torch.nn.Parameter(torch.randn(16, 24) * 0.1)
    bias = torch.nn.Parameter(torch.zeros(16))
    scale = torch.nn.Parameter(torch.ones(16, dtype=scale_dtype))
    params = [weight, bias, scale]
    optimizer = make_optimizer(params)
    for step in range(steps):
        if step == resume_at:
            saved = optimizer.state_dict()
            optimizer = make_optimizer(params)
            optimizer.load_state_dict(saved)
        out = (inputs @ weight.T + bias) * scale.float()
        ((out - inputs @ target.T) ** 2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return params, optimizer


@pytest.mark.parametrize("resume_at", [None, 11])
def test_offloaded_adamw_equals_torch_adamw_bit_for_bit(resume_at):
    settings = {"lr": 3e-2, "weight_decay": 0.1, "betas": (0.9, 0.99), "eps": 1e-7}
    reference, ref_opt = _run(lambda p: torch.optim.AdamW(p, fused=True, **settings))
    offloaded, opt = _run(lambda p: OffloadedAdamW(p, **settings), resume_at=resume_at)
    for ref, ours in zip(reference, offloaded):
        assert torch.equal(ref, ours), f"parameter {tuple(ref.shape)} differs from AdamW(fused=True)"
    for ref_p, p in zip(reference, offloaded):
        ref_state, state = ref_opt.state[ref_p], opt.state[p]
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(ref_state[name], state[name]), f"{name} differs from AdamW's"
            assert state[name].device.type == "cpu", f"{name} must live on the host"
        assert float(state["step"]) == float(ref_state["step"]) == 25


def test_offloaded_adamw_also_matches_the_unfused_reference():
    # A second, independent reference: torch's single-tensor (for-loop) AdamW, up to rounding (fp32
    # parameters: that path does bf16 arithmetic in bf16, the fused kernel in fp32).
    settings = {"lr": 1e-2, "weight_decay": 0.01}
    reference, _ = _run(lambda p: torch.optim.AdamW(p, foreach=False, **settings), scale_dtype=torch.float32)
    offloaded, _ = _run(lambda p: OffloadedAdamW(p, **settings), scale_dtype=torch.float32)
    for ref, ours in zip(reference, offloaded):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_build_optimizer_offloads_both_adamw_kinds():
    param = torch.nn.Parameter(torch.zeros(4))
    assert isinstance(build_optimizer([param], "adamw", 1e-3, 0.0, offload=True), OffloadedAdamW)
    eight_bit = build_optimizer([param], "adamw8bit", 1e-3, 0.0, offload=True)
    assert isinstance(eight_bit, AdamW8bit) and eight_bit.offload


def test_offload_optimizer_run_equals_the_plain_run(tiny_model_dir, data_file, tmp_path):
    """train.offload_optimizer with the default optimizer: the same per-step losses and adapter as without."""
    results = {}
    for offload in (False, True):
        out = tmp_path / f"offload-{offload}"
        cfg = build_config({"model": str(tiny_model_dir), "output": str(out), "data": {"train": str(data_file)},
                            "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "precision": "fp32",
                                      "save_every": None, "offload_optimizer": offload}})
        finetune(cfg, Console(quiet=True))
        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        results[offload] = losses, load_file(str(out / "adapter_model.safetensors"))
    (plain_losses, plain), (offloaded_losses, offloaded) = results[False], results[True]
    assert offloaded_losses == plain_losses, "offloading the moments must not change the training"
    assert plain.keys() == offloaded.keys()
    for key in plain:
        assert torch.equal(plain[key], offloaded[key]), f"{key} differs with the optimizer offloaded"
