"""train.compile: compiled decoder layers train to the same losses as eager ones (within bf16 rounding),
for LoRA and DoRA, with and without gradient checkpointing; bad settings are config
problems found before anything loads."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from safetensors.torch import load_file
import torch
from rich.console import Console

import slimtune
from slimtune.config import build_config
from slimtune.errors import ConfigError
from slimtune.train import compile as compile_module

from conftest import bytes_kept_for_backward, make_wide_tiny_llama


def _losses(tiny_model_dir, data_file, tmp_path, name, method, compiled, **train):
    cfg = build_config({
        "model": str(tiny_model_dir), "output": str(tmp_path / name), "method": method,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "data": {"train": str(data_file)},
        "train": {"max_steps": 4, "batch_size": 3, "lr": 1e-2, "warmup_ratio": 0.0, "precision": "bf16",
                  "save_every": None, "compile": "true" if compiled else "false", **train},
        "eval": {"generations": 0},
    })
    slimtune.finetune(cfg, Console(quiet=True))
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row], load_file(tmp_path / name / "adapter_model.safetensors")


# Each case compiles for ~10-20 s on 2 cores, so two: LoRA, and DoRA with gradient checkpointing.
@pytest.mark.skipif(shutil.which(os.environ.get("CXX") or "g++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler (the missing-compiler path is tested below)")
@pytest.mark.parametrize("method, train", [("lora", {}), ("dora", {"grad_checkpointing": True})])
def test_compiled_losses_equal_eager(tiny_model_dir, data_file, tmp_path, method, train):
    eager, eager_weights = _losses(tiny_model_dir, data_file, tmp_path, "eager", method, False, **train)
    compiled, compiled_weights = _losses(tiny_model_dir, data_file, tmp_path, "compiled", method, True, **train)
    assert len(eager) == len(compiled) == 4
    for step, (a, b) in enumerate(zip(eager, compiled), 1):
        assert abs(a - b) <= 1e-2 * abs(a), f"step {step}: eager {a:.5f}, compiled {b:.5f}"
    # The trained matrices (B starts at zero, so it is all update) agree too: a compiled layer whose
    # gradients were wrong or missing would train different ones. Layer 1 is the compiled one.
    trained = [name for name in eager_weights if "lora_B" in name and "layers.1." in name]
    assert trained
    for name in trained:
        want, got = eager_weights[name].float(), compiled_weights[name].float()
        assert want.norm() > 0
        assert (got - want).norm() <= 5e-2 * want.norm(), name


def test_compiled_forward_replaced_only_during_training(tiny_model_dir):
    from slimtune.models.loader import load_model

    model = load_model(str(tiny_model_dir))[0]
    model.requires_grad_(False)
    layers = compile_module.decoder_layers(model)
    with compile_module.compiled_layers(model, "true", torch.device("cpu"), 10, "single", Console(quiet=True)) as on:
        assert on
        # The frozen embedding's output needs no gradient: the first layer stays eager.
        assert "forward" not in vars(layers[0]) and all("forward" in vars(layer) for layer in layers[1:])
    assert all("forward" not in vars(layer) for layer in layers)


def test_missing_compiler_is_a_config_problem(tiny_model_dir, data_file, tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    cfg = build_config({"model": str(tiny_model_dir), "output": str(tmp_path / "run"), "data": {"train": str(data_file)},
                        "train": {"compile": "true", "device": "cpu"}})
    with pytest.raises(ConfigError, match="train.compile: .*no-such-compiler-xyz"):
        slimtune.finetune(cfg, Console(quiet=True))
    assert not (tmp_path / "run").exists()
    # auto falls back to eager with a note instead.
    console = Console(record=True, width=200)
    model = torch.nn.Module()
    with compile_module.compiled_layers(model, "auto", torch.device("cuda"), 10_000, "single", console) as on:
        assert not on
    monkeypatch.setattr(compile_module, "auto_decision", lambda *a, **k: (True, "test"))
    with compile_module.compiled_layers(model, "auto", torch.device("cpu"), 10_000, "single", console) as on:
        assert not on
    assert "train.compile=auto runs eagerly" in console.export_text()


def test_auto_decision():
    enough = compile_module.AUTO_MIN_TOKENS_CPU
    assert not compile_module.auto_decision(torch.device("cpu"), 10_000, "single")[0], "tokens unknown: eager"
    assert not compile_module.auto_decision(torch.device("cpu"), 10_000, "single", enough - 1)[0]
    assert compile_module.auto_decision(torch.device("cpu"), 10, "single", enough)[0]
    assert not compile_module.auto_decision(torch.device("cpu"), 10, "fsdp", enough)[0]
    assert not compile_module.auto_decision(torch.device("cuda"), 10, "single")[0]
    assert compile_module.auto_decision(torch.device("cuda"), 10_000, "ddp")[0]
    assert not compile_module.auto_decision(torch.device("cuda"), 10_000, "fsdp")[0]
    warm = compile_module.AUTO_MIN_TOKENS_CPU_WARM
    assert warm < enough
    assert compile_module.auto_decision(torch.device("cpu"), 10, "single", warm, warm=True)[0]
    assert not compile_module.auto_decision(torch.device("cpu"), 10, "single", warm - 1, warm=True)[0]
    assert not compile_module.auto_decision(torch.device("cpu"), 10, "single", warm, warm=False)[0]


def test_layer_signature_follows_what_the_graphs_depend_on(tiny_model_dir):
    from slimtune.models.loader import load_model

    def signature(**lora) -> str:
        model = load_model(str(tiny_model_dir))[0]
        cfg = build_config({"model": "-", "method": "lora", "data": {"train": "-"}, "lora": {"r": 4, **lora}})
        cfg.plugin.attach(model, cfg, Console(quiet=True))
        return compile_module.layer_signature(compile_module.decoder_layers(model)[-1])

    assert signature(dropout=0.05) == signature(dropout=0.05)
    assert signature(dropout=0.05) != signature(dropout=0.0), "dropout traces another graph"
    assert signature(r=4) != signature(r=8), "another rank, other shapes"


@pytest.mark.skipif(shutil.which(os.environ.get("CXX") or "g++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler (the missing-compiler path is tested below)")
def test_a_compiled_block_makes_the_next_auto_decision_warm(tiny_model_dir, tmp_path, monkeypatch):
    """Only a block that ran compiled graphs is recorded (in tuning.json under $SLIMTUNE_HOME), and then
    `auto` counts the next compile of the same layers as a warm one."""
    from slimtune.models.loader import load_model

    monkeypatch.setenv("SLIMTUNE_HOME", str(tmp_path / "home"))
    model = load_model(str(tiny_model_dir))[0]
    cfg = build_config({"model": "-", "method": "lora", "data": {"train": "-"}, "lora": {"r": 4}})
    cfg.plugin.attach(model, cfg, Console(quiet=True))
    model.train()
    signature = compile_module.layer_signature(compile_module.decoder_layers(model)[-1])
    with compile_module.compiled_layers(model, "true", torch.device("cpu"), 10, "single", Console(quiet=True),
                                        precision="fp32"):
        pass  # nothing ran: nothing compiled
    assert not compile_module.was_compiled_here(signature, "fp32")
    console = Console(record=True, width=300)
    tokens = compile_module.AUTO_MIN_TOKENS_CPU_WARM
    with compile_module.compiled_layers(model, "true", torch.device("cpu"), 10, "single", console, precision="fp32"):
        model(input_ids=torch.randint(0, 50, (2, 8)), labels=torch.randint(0, 50, (2, 8))).loss.backward()
    assert compile_module.was_compiled_here(signature, "fp32")
    assert not compile_module.was_compiled_here(signature, "bf16"), "another precision traces other graphs"
    with compile_module.compiled_layers(model, "auto", torch.device("cpu"), 10, "single", console, tokens=tokens,
                                        precision="fp32") as on:
        assert on
    assert "compiled here before, kernels cached" in console.export_text()


@pytest.mark.parametrize("value, expected", [(True, "true"), (False, "false"), ("auto", "auto")])
def test_yaml_booleans_are_accepted(value, expected):
    cfg = build_config({"data": {"train": "unused.jsonl"}, "train": {"compile": value}})
    assert cfg.train.compile == expected


@pytest.mark.skipif(shutil.which(os.environ.get("CXX") or "g++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler (the missing-compiler path is tested below)")
def test_compiled_lora_dropout_keeps_no_more_for_backward_than_eager():
    """Bytes autograd keeps for backward (saved_tensors_hooks) in a LoRA forward with dropout, compiled
    layers against eager ones. The compiled graph used to keep every adapter's masked input (m * x, 2 B
    per element) next to its mask: 35.0 MiB against eager's 29.5 here. Now it keeps x and the mask and
    forms m * x again in backward (methods/lowrank.py, `_MaskedDown`)."""
    from slimtune.train.fused import fuse_modules
    from slimtune.train.prepare import slimtune_attention

    kept = {}
    for compiled in (False, True):
        model = make_wide_tiny_llama()
        cfg = build_config({"model": "-", "method": "lora", "data": {"train": "-"},
                            "lora": {"r": 8, "targets": "all-linear", "dropout": 0.1}})
        with slimtune_attention(model, cfg.train, Console(quiet=True)):
            fuse_modules(model)
            cfg.plugin.attach(model, cfg, Console(quiet=True))
            model.train()
            layers = compile_module.decoder_layers(model)[1:]  # as training does: the first stays eager
            if compiled:
                compile_module.compile_layers(layers)
            # down_proj's masks: 8 x 128 x 768 elements > KEEP_MASK_ELEMENTS
            kept[compiled] = bytes_kept_for_backward(model, 8, 128, backward=True)
            compile_module.uncompile_layers(layers)
    assert kept[True] <= kept[False], f"compiled layers keep {kept[True]:,} B for backward, eager ones {kept[False]:,} B"
