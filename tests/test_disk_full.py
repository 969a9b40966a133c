"""A full disk never loses a run: every write failure is one line with the fix and the resume hint,
and the newest complete checkpoint stays usable.

The file system is really full for the process: `RLIMIT_FSIZE` makes the kernel refuse any write past
the limit (EFBIG, with SIGXFSZ ignored), in a child process, at a chosen moment (see subprocess_run.py).
safetensors then raises its own `SafetensorError`, matplotlib an `OSError`, `Path.write_text` an
`OSError`: the paths a mocked `OSError` cannot cover.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from subprocess_run import run_slimtune
from test_cli import EVAL_ROWS, TRAIN_ROWS, run_cli, write_jsonl


def _config(tmp_path: Path, model_dir: Path, steps: int = 3, eval_data: bool = False) -> Path:
    data = {"train": str(write_jsonl(tmp_path / "train.jsonl", TRAIN_ROWS)), "max_length": 64}
    if eval_data:
        data["eval"] = str(write_jsonl(tmp_path / "eval.jsonl", EVAL_ROWS))
    config = {"model": str(model_dir), "output": str(tmp_path / "run"), "data": data,
              "lora": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
              "eval": {"generations": 1, "max_new_tokens": 2},
              "train": {"max_steps": steps, "batch_size": 2, "precision": "fp32", "save_every": 1,
                        "keep_checkpoints": 5}}
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def _assert_one_line_error(result, *fragments: str) -> str:
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, f"exit status must be 2, got {result.returncode}: {err[-2000:]}"
    assert "Traceback" not in err, f"no traceback on a full disk: {err[-2000:]}"
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, f"exactly one error line: {err[-2000:]}"
    for fragment in fragments:
        assert fragment in lines[0], f"the error must contain {fragment!r}: {lines[0]}"
    return lines[0]


def _checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def _resume_finishes(tmp_path: Path, config: Path, monkeypatch, capsys) -> None:
    # In-process: with space again nothing needs a child process (each costs seconds of imports).
    code, _, err = run_cli(monkeypatch, capsys, "train", config, "resume=true")
    assert code == 0, err[-2000:]
    run = tmp_path / "run"
    adapter = load_file(str(run / "adapter_model.safetensors"))
    final = load_file(str(run / "checkpoints" / "step-000003" / "trainable.safetensors"))
    assert {k.removeprefix("base_model.model.") for k in adapter} == set(final)
    assert all((adapter["base_model.model." + k] == v).all() for k, v in final.items())


def test_checkpoint_on_a_full_disk_keeps_the_previous_one(tmp_path, tiny_model_dir, monkeypatch, capsys):
    config = _config(tmp_path, tiny_model_dir)
    # After the step-1 checkpoint no file may exceed 2 KiB: the step-2 checkpoint's tensors cannot be written.
    result = run_slimtune("train", config, hook=("slimtune.train.loop", "save_checkpoint", "after#1", "limit", 2048))
    _assert_one_line_error(result, "could not write a checkpoint", "at step 2", "File too large", "resume=true")
    run = tmp_path / "run"
    assert _checkpoints(run) == ["step-000001"], "the failed checkpoint leaves nothing behind, the old one stays"
    assert (run / "checkpoints" / "step-000001" / "COMPLETE").is_file()
    assert not (run / "adapter_model.safetensors").exists()
    _resume_finishes(tmp_path, config, monkeypatch, capsys)


def test_metrics_on_a_full_disk(tmp_path, tiny_model_dir):
    config = _config(tmp_path, tiny_model_dir)
    metrics = str(tmp_path / "run" / "metrics.jsonl")
    result = run_slimtune("train", config,
                          hook=("slimtune.train.loop", "save_checkpoint", "after#1", "limit-to-size-of", metrics))
    _assert_one_line_error(result, "could not write the metrics of step 2", "File too large", "resume=true")
    assert _checkpoints(tmp_path / "run") == ["step-000001"], "the checkpoint before the failure is kept"


@pytest.mark.parametrize("moment", [
    # after the final checkpoint: eval.json is small enough, loss.png (matplotlib, OSError) is not
    ("slimtune.train.loop", "save_checkpoint", "after#3", "limit", 200),
    # after the picture: the adapter's safetensors file fails (SafetensorError, not an OSError)
    ("slimtune.stages", "plot_loss", "after", "limit", 1024),
], ids=["loss-plot", "adapter-safetensors"])
def test_final_save_on_a_full_disk(tmp_path, tiny_model_dir, moment, monkeypatch, capsys):
    config = _config(tmp_path, tiny_model_dir)
    result = run_slimtune("train", config, hook=moment)
    _assert_one_line_error(result, "could not write the result", "File too large", "resume=true",
                           "final checkpoint")
    run = tmp_path / "run"
    assert not (run / "adapter_model.safetensors").exists(), "a failed save must not look like a finished run"
    assert not list(run.glob(".*partial")), "no partial file is left"
    assert (run / "checkpoints" / "step-000003" / "COMPLETE").is_file(), "the final checkpoint survives"
    if moment[1] == "plot_loss":  # resuming works the same after either failure; once is enough
        _resume_finishes(tmp_path, config, monkeypatch, capsys)


@pytest.fixture
def finished_run(tmp_path, tiny_model_dir, monkeypatch, capsys) -> Path:
    code, _, err = run_cli(monkeypatch, capsys, "train", _config(tmp_path, tiny_model_dir, steps=1, eval_data=True))
    assert code == 0, err[-2000:]
    return tmp_path / "run"


def test_merge_and_eval_on_a_full_disk(tmp_path, finished_run):
    merged = tmp_path / "merged"
    result = run_slimtune("merge", finished_run, merged, file_limit=4096)
    _assert_one_line_error(result, "could not write the merged model", "File too large", "merge again")
    assert not merged.exists() and not list(tmp_path.glob(".tmp-merged*")), "a failed merge leaves nothing behind"

    result = run_slimtune("eval", finished_run, "--generations", "1", "--max-new-tokens", "2", file_limit=256)
    _assert_one_line_error(result, "could not write the evaluation report", "File too large")
