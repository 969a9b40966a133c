"""SIGTERM / SIGINT from the first check to the last file: stop at the next safe point, save what can be
saved, exit 0 with the command that continues (resume=true) or restarts the run.

The signals are real (the process sends them to itself at a chosen moment, by wrapping one slimtune
function); the model-load case runs `slimtune train` in a child process so that its exit status is the
one a shell would see (143 = killed by SIGTERM before this was handled).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

import slimtune.stages
from subprocess_run import run_slimtune
from test_cli import EVAL_ROWS, TRAIN_ROWS, run_cli, write_jsonl


def _config(tmp_path: Path, model_dir: Path) -> Path:
    config = {"model": str(model_dir), "output": str(tmp_path / "run"),
              "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", TRAIN_ROWS)),
                       "eval": str(write_jsonl(tmp_path / "eval.jsonl", EVAL_ROWS)), "max_length": 64},
              "lora": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
              "eval": {"generations": 1, "max_new_tokens": 2},
              "train": {"max_steps": 2, "batch_size": 2, "precision": "fp32", "save_every": None}}
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


class _Killed(Exception):
    """What the default SIGTERM action would have done to the process (raised, so pytest survives)."""


@pytest.fixture
def sigterm_guard():
    """Outside slimtune's own handling a SIGTERM raises `_Killed` instead of killing pytest."""

    def die(signum, frame):
        raise _Killed(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, die)
    yield
    signal.signal(signal.SIGTERM, previous)


def _signal_before(monkeypatch, module, name: str, sig=signal.SIGTERM) -> None:
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        os.kill(os.getpid(), sig)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


def test_sigterm_during_model_load_exits_0(tmp_path, tiny_model_dir, monkeypatch, capsys):
    config = _config(tmp_path, tiny_model_dir)
    result = run_slimtune("train", config, hook=("slimtune.stages", "load_model", "before", "SIGTERM", None))
    err = result.stderr.decode()
    assert result.returncode == 0, f"a SIGTERM during model load must exit 0, got {result.returncode}: {err[-1500:]}"
    assert "SIGTERM: stopped after loading the model, before training" in err and "Traceback" not in err
    assert f"start again with: slimtune train {config}" in " ".join(err.split()), err[-800:]
    run = tmp_path / "run"
    assert not (run / "checkpoints").exists() and not (run / "adapter_model.safetensors").exists()
    assert run_cli(monkeypatch, capsys, "train", config)[0] == 0, "the same command then runs to the end"


def test_sigint_during_evaluation_keeps_the_final_checkpoint(tmp_path, tiny_model_dir, monkeypatch, capsys,
                                                              sigterm_guard):
    config = _config(tmp_path, tiny_model_dir)
    _signal_before(monkeypatch, slimtune.stages, "evaluate_model", signal.SIGINT)
    code, _, err = run_cli(monkeypatch, capsys, "train", config)
    flat = " ".join(err.split())
    assert code == 0 and "Traceback" not in err, err[-1500:]
    assert "SIGINT: stopped during evaluation" in flat and f"resume with: slimtune train {config} resume=true" in flat
    run = tmp_path / "run"
    assert (run / "checkpoints" / "step-000002" / "COMPLETE").is_file(), "the final checkpoint is complete"
    assert not (run / "adapter_model.safetensors").exists(), "an unfinished run does not look finished"

    monkeypatch.undo()
    # Re-running the same command without resume=true refuses and leaves the checkpoints as they were.
    before = {p: p.read_bytes() for p in sorted((run / "checkpoints").rglob("*")) if p.is_file()}
    code, _, err = run_cli(monkeypatch, capsys, "train", config)
    assert code == 2 and "unfinished run's checkpoints" in err and "resume=true" in err, err[-1500:]
    assert {p: p.read_bytes() for p in sorted((run / "checkpoints").rglob("*")) if p.is_file()} == before
    code, _, err = run_cli(monkeypatch, capsys, "train", config, "resume=true")
    assert code == 0 and (run / "adapter_model.safetensors").is_file(), err[-1500:]
    assert json.loads((run / "eval.json").read_text())["tuned"]["loss"] > 0, "resuming ran the evaluation"


def test_sigterm_during_final_save_completes_it(tmp_path, tiny_model_dir, monkeypatch, capsys, sigterm_guard):
    config = _config(tmp_path, tiny_model_dir)
    _signal_before(monkeypatch, slimtune.stages, "plot_loss")  # the first of the final writes
    code, _, err = run_cli(monkeypatch, capsys, "train", config)
    assert code == 0 and "Traceback" not in err, err[-1500:]
    assert "SIGTERM arrived while the result was being written; the run is complete" in " ".join(err.split())
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file() and (tmp_path / "run" / "loss.png").is_file()
