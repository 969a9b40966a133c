"""Nothing lost: interrupted runs resume bit-identically; kills never leave a checkpoint unusable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

from slimtune.config import build_config
from slimtune.data import load_dataset
from slimtune.methods.lora import LoRAMethod, attach_lora, lora_state_dict
from slimtune.train.checkpoint import latest_checkpoint, list_checkpoints, restore_checkpoint, save_checkpoint
from slimtune.train.loop import NonFiniteLossError, TrainingInterrupted, run_training, seed_everything
from slimtune.train.packing import use_packed_attention


@pytest.fixture
def one_thread():
    """Bit-identity holds for a fixed thread count; restore the caller's afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def dataset_file(tmp_path) -> Path:
    rows = [{"instruction": f"repeat {i}", "output": ("word%d " % i) * (1 + i % 4)} for i in range(24)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


class SignalAt(LoRAMethod):
    """LoRA whose step hook sends this process a real SIGTERM after a chosen step."""

    stop_after: int | None = None

    def on_step_end(self, step: int, total_steps: int) -> dict[str, float]:
        if step == self.stop_after:
            os.kill(os.getpid(), signal.SIGTERM)
        return {}


def _train(tiny_model_dir, dataset_file, out: Path, resume=False, stop_after=None, packing=True, **train):
    from slimtune.models import load_model

    settings = {"max_steps": 7, "batch_size": 2, "grad_accum": 2, "save_every": 2, "seed": 3, "lr": 1e-2,
                "precision": "fp32", "packing": packing, **train}
    cfg = build_config({"model": str(tiny_model_dir), "data": {"train": str(dataset_file)}, "train": settings,
                        "lora": {"r": 4, "alpha": 8, "dropout": 0.1}, "output": str(out)})
    seed_everything(cfg.train.seed)
    model, tokenizer, _ = load_model(cfg.model)
    if packing:
        use_packed_attention(model)
    data = load_dataset(cfg.data.train, tokenizer, max_length=256)
    attach_lora(model, cfg.lora.targets, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout)
    method = SignalAt("lora", model)
    method.stop_after = stop_after
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = latest_checkpoint(out / "checkpoints") if resume else None
    summary = run_training(model, method, data, cfg.train, tokenizer.pad_token_id, out / "metrics.jsonl",
                           Console(quiet=True), packing=packing, checkpoint_dir=out / "checkpoints",
                           resume_from=checkpoint, config_snapshot=cfg.to_yaml_dict())
    return summary, {k: v.clone() for k, v in lora_state_dict(model).items()}


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("packing", [True, False])
def test_interrupted_and_resumed_equals_uninterrupted(tiny_model_dir, dataset_file, tmp_path, packing, one_thread):
    _, reference = _train(tiny_model_dir, dataset_file, tmp_path / "straight", packing=packing)

    with pytest.raises(TrainingInterrupted) as stopped:
        _train(tiny_model_dir, dataset_file, tmp_path / "split", stop_after=3, packing=packing)
    assert stopped.value.step == 3, "SIGTERM must let the current step finish and stop after it"
    assert (stopped.value.checkpoint / "COMPLETE").is_file(), "the stop must leave a complete checkpoint"
    _, resumed = _train(tiny_model_dir, dataset_file, tmp_path / "split", resume=True, packing=packing)

    assert _losses(tmp_path / "split") == _losses(tmp_path / "straight"), \
        "per-step losses of the resumed run must equal the uninterrupted run's (mid-epoch, grad_accum=2, dropout)"
    for key, value in reference.items():
        assert torch.equal(resumed[key], value), f"final weight {key} differs after resume"


def test_planted_nan_stops_with_a_diagnostic(tiny_model_dir, dataset_file, tmp_path):
    class NaNAtStep2(LoRAMethod):
        calls = 0

        def extra_loss(self):
            self.calls += 1
            if self.calls == 3:  # micro-batch 1 of step 2 (grad_accum=2)
                return float("nan") * self.trainable_parameters()[0].sum()
            return None

    from slimtune.models import load_model

    for on_nan in ("stop", "skip"):
        cfg = build_config({"model": str(tiny_model_dir), "data": {"train": str(dataset_file)},
                            "train": {"max_steps": 3, "batch_size": 2, "grad_accum": 2, "precision": "fp32",
                                      "on_nan": on_nan}})
        model, tokenizer, _ = load_model(cfg.model)
        data = load_dataset(cfg.data.train, tokenizer, max_length=256)
        attach_lora(model, "all-linear", r=4, alpha=8)
        method = NaNAtStep2("lora", model)
        metrics = tmp_path / f"{on_nan}.jsonl"
        if on_nan == "stop":
            with pytest.raises(NonFiniteLossError) as error:
                run_training(model, method, data, cfg.train, tokenizer.pad_token_id, metrics, Console(quiet=True))
            message = str(error.value)
            assert "step 2" in message and "train.jsonl:" in message and "lora_A" in message, \
                f"the diagnostic must name the step, the batch's examples and the parameters: {message}"
        else:
            run_training(model, method, data, cfg.train, tokenizer.pad_token_id, metrics, Console(quiet=True))
            rows = [json.loads(line) for line in metrics.read_text().splitlines()]
            assert [r.get("skipped", False) for r in rows] == [False, True, False], "only step 2 is skipped"
            finite = all(torch.isfinite(p).all() for p in method.trainable_parameters())
            assert finite, "a skipped step must not write NaN into the weights"


def test_incomplete_checkpoints_are_never_picked(tmp_path):
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([param])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 2, {"p": param}, optimizer, scheduler, {"n": 2}, {}, keep=5)
    (root / "step-000004").mkdir()  # a directory a kill left without its COMPLETE marker
    (root / "step-000004" / "trainable.safetensors").write_bytes(b"torn")
    (root / ".tmp-step-000006-x").mkdir()
    assert latest_checkpoint(root).step == 2, "only complete checkpoints may be resumed from"
    save_checkpoint(root, 8, {"p": param}, optimizer, scheduler, {"n": 8}, {}, keep=5)
    assert not (root / ".tmp-step-000006-x").exists(), "a new save clears the leftovers of a killed one"


_WRITER = r"""
import sys, torch
from slimtune.train.checkpoint import save_checkpoint
root = sys.argv[1]
param = torch.nn.Parameter(torch.zeros(4_000_000))
opt = torch.optim.AdamW([param]); sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
for step in range(1, 10_000):
    with torch.no_grad():
        param.fill_(step)
    save_checkpoint(__import__("pathlib").Path(root), step, {"p": param}, opt, sched, {"step": step}, {}, keep=2)
    print(step, flush=True)
"""


def test_sigkill_during_saves_leaves_a_usable_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    child = subprocess.Popen([sys.executable, "-c", _WRITER, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):  # let a few saves complete, then kill in the middle of the stream of saves
            child.stdout.readline()
        time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    checkpoint = latest_checkpoint(root)
    assert checkpoint is not None and checkpoint.step >= 3, "the saves that completed before the kill must survive"
    param = torch.nn.Parameter(torch.empty(4_000_000))
    optimizer = torch.optim.AdamW([param])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    progress = restore_checkpoint(checkpoint, {"p": param}, optimizer, scheduler)
    assert progress == {"step": checkpoint.step} and torch.all(param == checkpoint.step), \
        "the newest complete checkpoint must load whole and consistent"
    # Pruning runs after the new checkpoint is in place, so a kill between the two leaves one extra.
    assert len(list_checkpoints(root)) <= 3, "keep_checkpoints (2) bounds how many are kept, plus one at a kill"


def test_sigterm_through_the_cli_then_resume(tiny_model_dir, dataset_file, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {tiny_model_dir}\noutput: {tmp_path / 'run'}\ndata: {{train: {dataset_file}}}\n"
        "train: {max_steps: 400, batch_size: 2, save_every: 1000, precision: fp32}\n", encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen([sys.executable, "-m", "slimtune.cli", "train", str(config)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.is_file() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.1)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 0, f"SIGTERM must end the run cleanly with status 0: {err[-2000:]}"
    assert "resume with: slimtune train" in err and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists(), \
        "an interrupted run must not look finished"
    checkpoint = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert checkpoint is not None and checkpoint.step >= 3
    done = subprocess.run([sys.executable, "-m", "slimtune.cli", "train", str(config), "resume=true",
                           "train.max_steps=400"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 401)), "metrics continue without gaps or repeats"
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


def test_resume_refuses_a_config_that_changed_what_matters(tiny_model_dir, dataset_file, tmp_path, monkeypatch, capsys):
    from slimtune.cli import main

    out = tmp_path / "run"
    _train(tiny_model_dir, dataset_file, out)  # writes checkpoints (no adapter: run_training only)
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {tiny_model_dir}\noutput: {out}\ndata: {{train: {dataset_file}}}\n"
        "lora: {r: 4, alpha: 8, dropout: 0.1}\n"
        "train: {max_steps: 7, batch_size: 2, grad_accum: 2, save_every: 2, seed: 3, lr: 0.01, precision: fp32}\n",
        encoding="utf-8")
    monkeypatch.setattr(sys, "argv", ["slimtune", "train", str(config), "resume=true", "lora.r=8"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "lora.r: 4 -> 8" in err, f"the changed key must be named: {err}"


def test_overwrite_starts_with_no_checkpoints_of_the_old_run(tiny_model_dir, dataset_file, tmp_path, monkeypatch, capsys):
    from test_cli import run_cli

    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\noutput: {tmp_path / 'run'}\ndata: {{train: {dataset_file}}}\n"
                      "train: {batch_size: 2, save_every: 2, precision: fp32}\n", encoding="utf-8")
    code, _, err = run_cli(monkeypatch, capsys, "train", config, "train.max_steps=6")
    assert code == 0, err[-1500:]
    code, _, err = run_cli(monkeypatch, capsys, "train", config, "train.max_steps=3", "overwrite=true")
    assert code == 0, err[-1500:]
    steps = [c.step for c in list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert steps == [2, 3], f"only the new run's checkpoints may remain, got steps {steps}"
