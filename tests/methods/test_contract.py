"""Contract tests over every method (PEFT's `_test_merge_layers` idea): one table, shared checks.

For each method the trained tensors are set to seeded random non-zero values (so a dropped tensor or a
wrong merge changes the logits), then:
- save -> `load_run` gives identical outputs;
- `merge_run` (a plain HF directory) gives the unmerged outputs;
- for adapter methods, in-place merge == unmerged == merged-then-unloaded, and merging twice is a no-op;
- a NaN in the trained tensors makes merging raise and write nothing.
"""

from __future__ import annotations

import pytest
import torch
from rich.console import Console

from slimtune.api import load_run, merge_run
from slimtune.methods.base import AttachedMethod
from slimtune.config import build_config
from slimtune.errors import AdapterError
from slimtune.methods.lora import lora_layers, merge_and_unload, merge_lora
from slimtune.models import load_model

METHODS = {
    "lora": {"method": "lora", "lora": {"r": 4, "alpha": 12, "targets": ["q_proj", "v_proj", "down_proj"]}},
    "rslora": {"method": "lora", "lora": {"r": 4, "alpha": 6, "rslora": True, "targets": "all-linear"}},
    "dora": {"method": "dora", "lora": {"r": 4, "alpha": 8, "targets": ["q_proj", "o_proj", "up_proj"]}},
    "lora-patterns": {"method": "lora", "lora": {"r": 4, "alpha": 8, "targets": "all-linear",
                                                 "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"down_proj": 3}}},
    "adalora": {"method": "adalora", "lora": {"alpha": 8, "targets": ["q_proj", "k_proj", "gate_proj"]},
                "adalora": {"init_r": 4, "target_r": 2}},
    "freeze": {"method": "freeze", "freeze": {"last_layers": 1, "train_norms": True}},
    "full": {"method": "full"},
    "longlora": {"method": "longlora", "longlora": {"context": 1024}, "lora": {"r": 4, "alpha": 8}},
}



def attach_method(model, cfg, console):
    """The config's method plugin attached to `model`."""
    return cfg.plugin.attach(model, cfg, console)


def save_method(model, tokenizer, cfg, out, base_model, steps=1):
    """The config's method plugin saving `model` (attached earlier) into `out`."""
    return cfg.plugin.save(AttachedMethod(cfg.method_name, model), tokenizer, cfg, out, base_model, steps)

def config_for(name: str, model_dir, out):
    return build_config({"model": str(model_dir), "data": {"train": "unused.jsonl"}, "output": str(out), **METHODS[name]})


def perturb_trained(model, seed: int = 4) -> None:
    """Seeded non-zero values in every trained tensor (LoRA B included, DoRA m scaled)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=gen)
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * noise)
            elif "lora_" in name:
                param.copy_(0.2 * noise)
            else:
                param.add_(0.05 * noise)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def ids():
    return torch.randint(0, 200, (2, 11), generator=torch.Generator().manual_seed(9))


def trained_run(name, tiny_model_dir, tmp_path):
    cfg = config_for(name, tiny_model_dir, tmp_path / "run")
    model, tokenizer, resolved = load_model(cfg.model)
    attach_method(model, cfg, Console(quiet=True))
    perturb_trained(model)
    model.eval()
    return cfg, model, tokenizer, resolved


@pytest.mark.parametrize("name", sorted(METHODS))
def test_save_load_and_merge_give_the_same_outputs(name, tiny_model_dir, tmp_path, ids):
    cfg, model, tokenizer, resolved = trained_run(name, tiny_model_dir, tmp_path)
    base, _, _ = load_model(str(tiny_model_dir))
    ours = logits(model, ids)
    assert (ours - logits(base.eval(), ids)).abs().max().item() > 1e-3, f"{name}: the trained tensors must matter"

    cfg.output.mkdir(parents=True)
    save_method(model, tokenizer, cfg, cfg.output, str(tiny_model_dir))
    loaded, _ = load_run(cfg.output)
    diff = (logits(loaded, ids) - ours).abs().max().item()
    assert diff <= 1e-6, f"{name}: save -> load_run must reproduce the outputs; max abs diff {diff}"

    merge_run(cfg.output, tmp_path / "merged")
    merged, _, _ = load_model(str(tmp_path / "merged"))
    assert not lora_layers(merged), f"{name}: the merged directory must be a plain model"
    diff = (logits(merged.eval(), ids) - ours).abs().max().item()
    assert diff <= 1e-5, f"{name}: merge_run output must equal the unmerged model; max abs diff {diff}"


@pytest.mark.parametrize("name", ["lora", "rslora", "dora", "lora-patterns", "adalora"])
def test_in_place_merge_twice_and_unload(name, tiny_model_dir, tmp_path, ids):
    _, model, _, _ = trained_run(name, tiny_model_dir, tmp_path)
    unmerged = logits(model, ids)
    assert merge_lora(model) == len(lora_layers(model)), f"{name}: the first merge must merge every layer"
    diff = (logits(model, ids) - unmerged).abs().max().item()
    assert diff <= 1e-5, f"{name}: merged must equal unmerged; max abs diff {diff}"
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert merge_lora(model) == 0, f"{name}: a second merge must merge nothing"
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), f"{name}: a second merge must not change '{key}'"
    unloaded = merge_and_unload(model)
    assert not lora_layers(unloaded), f"{name}: merge_and_unload must leave no adapter layers"
    diff = (logits(unloaded, ids) - unmerged).abs().max().item()
    assert diff <= 1e-5, f"{name}: merged-then-unloaded must equal unmerged; max abs diff {diff}"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_merge_with_nan_raises_and_writes_nothing(name, tiny_model_dir, tmp_path):
    cfg, model, tokenizer, _ = trained_run(name, tiny_model_dir, tmp_path)
    trained = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        trained[-1].view(-1)[0] = float("nan")
    cfg.output.mkdir(parents=True)
    save_method(model, tokenizer, cfg, cfg.output, str(tiny_model_dir))
    with pytest.raises(AdapterError, match="NaN"):
        merge_run(cfg.output, tmp_path / "merged")
    assert not (tmp_path / "merged").exists(), f"{name}: a refused merge must not leave an output directory"
