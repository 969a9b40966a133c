"""`finetune` / `load_run` / `evaluate_run` with every method on the tiny model (a few steps each)."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console

from slimtune.api import evaluate_run, finetune, load_run
from slimtune.config import build_config
from slimtune.errors import SlimtuneError
from slimtune.models import load_model

EXPECTED_FILES = {
    "dora": {"adapter_config.json", "adapter_model.safetensors"},
    "freeze": {"freeze_config.json", "freeze_model.safetensors"},
    "full": {"config.json", "model.safetensors", "tokenizer.json"},
}


def run(method, tiny_model_dir, data_file, out, **extra):
    cfg = build_config({
        "model": str(tiny_model_dir), "method": method, "output": str(out),
        "data": {"train": str(data_file), "eval": str(data_file)},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "precision": "fp32", "save_every": None},
        "eval": {"generations": 1, "max_new_tokens": 2}, **extra,
    })
    return finetune(cfg, Console(quiet=True))


@pytest.mark.parametrize("method, extra", [
    ("dora", {"lora": {"r": 2, "alpha": 4, "targets": ["q_proj", "v_proj"]}}),
    ("freeze", {"freeze": {"layers": "1", "train_norms": True}}),
    ("full", {}),
])
def test_each_method_trains_saves_and_loads(method, extra, tiny_model_dir, data_file, tmp_path):
    result = run(method, tiny_model_dir, data_file, tmp_path / method, **extra)
    files = {p.name for p in result.output.iterdir()}
    assert EXPECTED_FILES[method] <= files, f"{method}: missing {EXPECTED_FILES[method] - files}"
    assert result.tuned["loss"] < result.base["loss"], f"{method}: 2 steps at lr 1e-2 must lower the eval loss"

    tuned, _ = load_run(result.output)
    base, _, _ = load_model(str(tiny_model_dir))
    changed = {n for n, p in tuned.named_parameters() if not n.endswith(("lora_A.weight", "lora_B.weight",
               "lora_magnitude_vector")) and not torch.equal(p, base.state_dict()[n.replace(".base_layer", "")])}
    if method == "freeze":
        assert "model.layers.0.input_layernorm.weight" in changed, "train_norms must train layer 0's norms too"
        assert changed and all(n.startswith("model.layers.1.") or "norm" in n for n in changed), (
            f"freeze: only layer 1 and the norms may change, changed {sorted(changed)}"
        )
    elif method == "full":
        assert len(changed) == len(list(base.parameters())), "full: every tensor must change"
    else:
        assert not changed, f"dora: base weights must stay frozen, changed {sorted(changed)}"


def test_evaluate_run_of_a_freeze_run_compares_with_the_real_base(tiny_model_dir, data_file, tmp_path):
    result = run("freeze", tiny_model_dir, data_file, tmp_path / "freeze", freeze={"last_layers": 1})
    report = evaluate_run(result.output, generations=0, console=Console(quiet=True))
    assert report["base"]["loss"] == pytest.approx(result.base["loss"], abs=1e-4), (
        "evaluate_run's base loss must be the untouched base model's"
    )
    assert report["tuned"]["loss"] < report["base"]["loss"], "the tuned freeze run must beat the base"


def test_finished_full_run_is_not_overwritten_without_overwrite(tiny_model_dir, data_file, tmp_path):
    run("full", tiny_model_dir, data_file, tmp_path / "full")
    with pytest.raises(SlimtuneError, match="already holds a finished run"):
        run("full", tiny_model_dir, data_file, tmp_path / "full")
