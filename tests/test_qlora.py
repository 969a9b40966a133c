"""QLoRA end to end on the tiny model: NF4 base + LoRA through `finetune`, PEFT-loadable adapter,
reload, and merge through dequantization."""

from __future__ import annotations

import json

import pytest
import torch

from slimtune.config import build_config
from slimtune.errors import ConfigError


def _config(tmp_path, tiny_model_dir, **extra):
    rows = [{"instruction": f"count to {i}", "output": " ".join(str(k) for k in range(i))} for i in range(2, 10)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return build_config({"model": str(tiny_model_dir), "method": "qlora", "output": str(tmp_path / "run"),
                         "data": {"train": str(data)}, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                         "train": {"max_steps": 4, "batch_size": 2, "lr": 5e-2, "precision": "fp32"}, **extra})


@pytest.fixture
def qlora_run(tmp_path, tiny_model_dir):
    from rich.console import Console

    from slimtune.api import finetune

    cfg = _config(tmp_path, tiny_model_dir)
    finetune(cfg, Console(quiet=True))
    return cfg.output


def _probe():
    torch.manual_seed(1)
    return torch.randint(0, 250, (2, 14))


def test_adapter_loads_in_peft_on_the_dequantized_base(qlora_run, tiny_model_dir):
    """PEFT reads our QLoRA adapter; on a base holding the NF4-dequantized weights (bitsandbytes-exact,
    see tests/quant) it reproduces the logits of our 4-bit model + adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from slimtune.api import load_run
    from slimtune.quant import Linear4bit, dequantize_model, quantize_model

    ours, _ = load_run(qlora_run)
    assert any(isinstance(m, Linear4bit) for m in ours.modules()), "a QLoRA run reloads on the 4-bit base"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    quantize_model(base, compute_dtype=torch.float32)
    dequantize_model(base, torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(qlora_run)).eval()
    lora_B = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_B and any(p.abs().sum() > 0 for p in lora_B), "PEFT must have loaded the trained (non-zero) B"
    ids = _probe()
    with torch.no_grad():
        diff = (peft_model(input_ids=ids).logits - ours(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-4, f"PEFT on the dequantized base differs from slimtune's 4-bit model by {diff}"


def test_merge_dequantizes_and_matches_the_unmerged_4bit_model(qlora_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from slimtune.api import MERGE_REPORT, load_run, merge_run

    out = merge_run(qlora_run, tmp_path / "merged")
    report = json.loads((out / MERGE_REPORT).read_text())
    # Stated tolerance: fp32 compute on both sides, so merged and unmerged agree to float rounding.
    assert report["max_abs_prob_diff_vs_unmerged_nf4"] < 1e-5, report
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    unmerged, _ = load_run(qlora_run)
    ids = _probe()
    with torch.no_grad():
        diff = (merged(input_ids=ids).logits.softmax(-1) - unmerged(input_ids=ids).logits.softmax(-1)).abs().max()
    assert diff < 1e-5, f"the merged HF model must reproduce the 4-bit model + adapter (softmax diff {diff})"


def test_merging_lora_into_a_4bit_layer_is_refused(tiny_model):
    from slimtune.errors import AdapterError
    from slimtune.methods.lora import attach_lora, merge_lora
    from slimtune.quant import quantize_model

    quantize_model(tiny_model, compute_dtype=torch.float32)
    attach_lora(tiny_model, "all-linear", r=2, alpha=4)
    with pytest.raises(AdapterError, match="dequantize_model"):
        merge_lora(tiny_model)


@pytest.mark.parametrize("extra,fragment", [({"method": "full", "quantize": "nf4"}, "method: full trains base"),
                                            ({"lora": {"use_dora": True}}, "DoRA on a 4-bit base")])
def test_config_refuses_combinations_that_cannot_work(tmp_path, tiny_model_dir, extra, fragment):
    with pytest.raises(ConfigError, match=fragment):
        _config(tmp_path, tiny_model_dir, **extra)


def test_parameter_counts_include_the_4bit_weights(tiny_model):
    from slimtune.methods.lora import LoRAMethod, attach_lora
    from slimtune.quant import quantize_model

    total_before = sum(p.numel() for p in tiny_model.parameters())
    quantize_model(tiny_model, compute_dtype=torch.float32)
    attach_lora(tiny_model, "all-linear", r=2, alpha=4)
    trainable, total = LoRAMethod("qlora", tiny_model).parameter_counts()
    lora = sum(p.numel() for n, p in tiny_model.named_parameters() if "lora_" in n)
    assert (trainable, total) == (lora, total_before + lora), "the 4-bit base still counts as parameters"
