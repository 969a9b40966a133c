"""The four stages: every check before anything is loaded or destroyed; base views; trackers; the registry."""

from __future__ import annotations

import json
import time

import pytest
import torch
from rich.console import Console

import slimtune.stages
from slimtune.api import evaluate_run, finetune
from slimtune.config import build_config
from slimtune.errors import ConfigError
from slimtune.evaluate import evaluate_model
from slimtune.methods.registry import METHODS, get_method
from slimtune.models import load_model
from slimtune.data import load_dataset


def config(tiny_model_dir, data_file, out, method="lora", **extra):
    train = {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "precision": "fp32", "save_every": None,
             **extra.pop("train", {})}
    return build_config({"model": str(tiny_model_dir), "method": method, "output": str(out),
                         "data": {"train": str(data_file)}, "train": train, **extra})


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if the build stage starts loading weights."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded although a check should have failed first")

    monkeypatch.setattr(slimtune.stages, "load_model", refuse)
    monkeypatch.setattr(slimtune.stages, "load_quantized_model", refuse)


def snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_bad_adalora_schedule_keeps_the_previous_run(tiny_model_dir, data_file, tmp_path, no_weights):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json", "metrics.jsonl", "config.yaml"):
        (out / name).write_text(f"previous {name}")
    (out / "checkpoints" / "step-000002").mkdir(parents=True)
    (out / "checkpoints" / "step-000002" / "COMPLETE").write_text("2")
    before = snapshot(out)
    cfg = config(tiny_model_dir, data_file, out, method="adalora", overwrite=True,
                 adalora={"tinit": 3, "tfinal": 2}, train={"max_steps": 4})
    with pytest.raises(ConfigError, match="leave no budget phase in a run of 4 steps"):
        finetune(cfg, Console(quiet=True))
    assert snapshot(out) == before, "a config that fails its checks must leave the previous run's files alone"


def test_a_rerun_without_resume_keeps_an_unfinished_runs_checkpoints(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "run"
    cfg = config(tiny_model_dir, data_file, out, train={"max_steps": 4, "save_every": 2})
    finetune(cfg, Console(quiet=True))
    (out / "adapter_model.safetensors").unlink()  # as if killed after the checkpoint at step 4
    before = snapshot(out / "checkpoints")
    with pytest.raises(ConfigError) as info:
        finetune(cfg, Console(quiet=True))
    message = str(info.value)
    assert "unfinished run's checkpoints" in message and "resume=true" in message and "overwrite=true" in message, message
    assert snapshot(out / "checkpoints") == before, "checkpoints must survive a re-run without resume"
    cfg.overwrite = True
    finetune(cfg, Console(quiet=True))
    assert (out / "adapter_model.safetensors").is_file(), "overwrite=true must start again"


def test_an_unknown_target_is_found_before_any_weights_load(tiny_model_dir, data_file, tmp_path, no_weights, capsys):
    cfg = config(tiny_model_dir, data_file, tmp_path / "run", lora={"targets": ["q_prj"]},
                 train={"report_to": []})
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="unknown target module 'q_prj'.*the model has .*q_proj"):
        finetune(cfg, Console(quiet=True))
    with capsys.disabled():
        print(f"\n[timing] unknown target reported after {time.perf_counter() - started:.2f} s")
    assert not (tmp_path / "run").exists(), "a failed check must not create the output directory"


def test_every_problem_is_reported_at_once(tiny_model_dir, tmp_path, no_weights):
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text('{"instruction": "x", "output": "y"}\n{"instruction": 3}\n', encoding="utf-8")
    finished = tmp_path / "run"
    finished.mkdir()
    (finished / "adapter_model.safetensors").write_text("x")
    cfg = config(tiny_model_dir, bad_data, finished, method="freeze", freeze={"layers": "7"})
    with pytest.raises(ConfigError) as info:
        finetune(cfg, Console(quiet=True))
    message = str(info.value)
    assert "bad.jsonl:2" in message, message
    assert "freeze.layers '7' is outside the model's layers 0-1" in message, message
    assert "already holds a finished run" in message, message


def test_the_registry_names_what_it_knows():
    with pytest.raises(ConfigError, match="unknown method 'ia3': choose one of " + ", ".join(METHODS)):
        get_method("ia3")
    assert {"lora", "qlora", "dora", "adalora", "freeze", "full"} <= set(METHODS)


@pytest.mark.parametrize("method, key, hint", [
    ("adalora", {"lora": {"r": 8}}, "lora.r does not apply to method: adalora (use adalora.init_r / adalora.target_r)"),
    ("lora", {"adalora": {"init_r": 8}}, "adalora.init_r does not apply to method: lora; it reads lora.*"),
    ("full", {"freeze": {"last_layers": 1}}, "freeze.last_layers does not apply to method: full"),
])
def test_a_key_the_method_ignores_is_an_error(method, key, hint, tiny_model_dir, data_file, tmp_path):
    with pytest.raises(ConfigError, match=hint.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.").replace("*", r"\*")):
        config(tiny_model_dir, data_file, tmp_path / "run", method=method, **key)


def test_peft_style_aliases_resolve_to_one_method(tiny_model_dir, data_file, tmp_path):
    assert config(tiny_model_dir, data_file, tmp_path, lora={"use_dora": True}).method_name == "dora"
    assert config(tiny_model_dir, data_file, tmp_path, quantize="nf4").method_name == "qlora"
    assert config(tiny_model_dir, data_file, tmp_path, method="adalora", quantize="nf4").quantized


def test_freeze_without_a_selection_trains_the_last_two_layers(tiny_model_dir, data_file, tmp_path):
    console = Console(record=True, width=200)
    cfg = config(tiny_model_dir, data_file, tmp_path / "run", method="freeze")
    finetune(cfg, console)
    assert "the last 2 decoder layers train" in console.export_text()
    saved = json.loads((tmp_path / "run" / "freeze_config.json").read_text())["tensors"]
    layers = {name.split(".")[2] for name in saved}
    assert layers == {"0", "1"} and all(name.startswith("model.layers.") for name in saved), saved


def test_the_base_row_restores_trained_norms(tiny_model_dir, data_file, tmp_path):
    """A freeze run that trains norms: evaluate_run's base row must be the untouched base model."""
    cfg = config(tiny_model_dir, data_file, tmp_path / "run", method="freeze",
                 freeze={"train_norms": True, "train_embeddings": True}, eval={"generations": 0})
    finetune(cfg, Console(quiet=True))
    result = evaluate_run(tmp_path / "run", data=data_file, generations=0, console=Console(quiet=True))
    base, tokenizer, _ = load_model(str(tiny_model_dir))
    reference, _ = evaluate_model(base.eval(), tokenizer, load_dataset(data_file, tokenizer, "auto", 1024), 0, 8, 8)
    assert result["base"]["loss"] == pytest.approx(reference["loss"], abs=1e-6), (result["base"], reference)
    assert abs(result["tuned"]["loss"] - reference["loss"]) > 1e-4, "the tuned row must differ from the base"


def test_tensorboard_gets_the_metrics_rows(tiny_model_dir, data_file, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = config(tiny_model_dir, data_file, tmp_path / "run", train={"report_to": ["tensorboard"], "max_steps": 3})
    finetune(cfg, Console(quiet=True))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [step for step, _ in logged] == [row["step"] for row in rows]
    assert all(value == pytest.approx(row["loss"], rel=1e-6) for (_, value), row in zip(logged, rows))


def test_a_tracker_that_is_not_installed_is_a_check_problem(tiny_model_dir, data_file, tmp_path, no_weights, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = config(tiny_model_dir, data_file, tmp_path / "run", train={"report_to": ["wandb"]})
    with pytest.raises(ConfigError, match="train.report_to: wandb needs the package 'wandb': pip install wandb"):
        finetune(cfg, Console(quiet=True))
