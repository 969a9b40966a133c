"""Bad input never costs a run: one clear message naming the value and the fix, exit status 2, no
traceback, and nothing left in `output` that could pass for a finished run.

Each case builds a small valid setup on the tiny model, breaks one thing, and runs `slimtune train`
in-process through `slimtune.cli.main` (see `run_cli` in test_cli.py).
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from test_cli import TRAIN_ROWS, run_cli, write_jsonl


def _setup(tmp_path: Path, model_dir: Path) -> dict:
    data = write_jsonl(tmp_path / "train.jsonl", TRAIN_ROWS)
    return {"model": str(model_dir), "output": str(tmp_path / "run"), "data": {"train": str(data)},
            "train": {"max_steps": 1, "batch_size": 2, "precision": "fp32", "save_every": None}}


def _yaml(tmp_path: Path, config: dict | str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(config if isinstance(config, str) else json.dumps(config), encoding="utf-8")  # JSON is YAML
    return path


def _nested(config: dict, dotted: str, value) -> dict:
    node = config
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return config


def _write(tmp_path: Path, name: str, content: bytes | str) -> str:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(path)


# (id, how to break the setup, expected message fragments). A breaker gets (config dict, tmp_path) and
# returns the config (dict or raw YAML text) plus extra CLI overrides.
CASES = [
    ("malformed-yaml", lambda c, t: ("model: [unclosed\n", []), ["config.yaml:", "not valid YAML"]),
    ("yaml-not-a-mapping", lambda c, t: ("- a\n- b\n", []), ["top level must be a mapping"]),
    ("unknown-top-key", lambda c, t: ({**c, "trian": {}}, []), ["unknown key 'trian'", "did you mean 'train'?"]),
    ("unknown-nested-key", lambda c, t: (c, ["lora.rr=8"]), ["unknown key 'lora.rr'", "did you mean 'lora.r'?"]),
    ("wrong-type", lambda c, t: (c, ["train.lr=fast"]), ["train.lr:", "'fast'"]),
    ("zero-batch", lambda c, t: (c, ["train.batch_size=0"]), ["train.batch_size:", "greater than 0"]),
    ("dropout-out-of-range", lambda c, t: (c, ["lora.dropout=1.5"]), ["lora.dropout:", "1.5"]),
    ("bad-choice", lambda c, t: (c, ["train.schedule=exponential"]), ["train.schedule:", "'exponential'"]),
    ("missing-data-train", lambda c, t: ({k: v for k, v in c.items() if k != "data"}, []), ["missing key 'data.train'"]),
    ("override-without-equals", lambda c, t: (c, ["train.lr"]), ["override 'train.lr' is not KEY=VALUE"]),
    ("missing-data-file", lambda c, t: (_nested(c, "data.train", str(t / "nope.jsonl")), []),
     ["data file", "nope.jsonl' does not exist", "data.train"]),
    ("missing-eval-file", lambda c, t: (_nested(c, "data.eval", str(t / "gone.jsonl")), []),
     ["gone.jsonl' does not exist"]),
    ("empty-dataset", lambda c, t: (_nested(c, "data.train", _write(t, "empty.jsonl", "\n")), []),
     ["empty.jsonl' is empty"]),
    ("broken-json-line", lambda c, t: (_nested(c, "data.train", _write(t, "bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": \n')), []),
     ["bad.jsonl:2: invalid JSON"]),
    ("unknown-row-format", lambda c, t: (_nested(c, "data.train", _write(t, "odd.jsonl", '{"question": "a", "answer": "b"}\n')), []),
     ["odd.jsonl:1:", "cannot tell the format", "data.format"]),
    ("format-mismatch", lambda c, t: (c, ["data.format=sharegpt"]), ["train.jsonl:1:", "'conversations'"]),
    ("wrong-value-type-in-row", lambda c, t: (_nested(c, "data.train", _write(t, "num.jsonl", '{"instruction": "a", "output": 5}\n')), []),
     ["num.jsonl:1:", "'output' must be a string"]),
    ("not-utf8", lambda c, t: (_nested(c, "data.train", _write(t, "latin.jsonl", b'{"instruction": "caf\xe9", "output": "x"}\n')), []),
     ["latin.jsonl", "not UTF-8", "save the file as UTF-8"]),
    ("prompt-longer-than-max-length", lambda c, t: (c, ["data.max_length=8"]), ["data.max_length=8", "raise data.max_length"]),
    ("rank-larger-than-layer", lambda c, t: (c, ["lora.r=4096"]), ["r=4096 exceeds the layer size", "use r <="]),
    ("unknown-target", lambda c, t: (c, ["lora.targets=[q_prj]"]), ["unknown target module 'q_prj'", "q_proj, up_proj, v_proj"]),
    ("target-not-linear", lambda c, t: (c, ["lora.targets=[input_layernorm]"]), ["'input_layernorm' (is not a linear layer)"]),
    ("regex-matches-nothing", lambda c, t: (c, ["lora.targets=zzz.*"]), ["target regex 'zzz.*' matches no linear layer"]),
    ("missing-model", lambda c, t: (_nested(c, "model", str(t / "no-model")), []), ["is not a HF model directory", "smollm2-135m"]),
    ("model-dir-without-config", lambda c, t: (_nested(c, "model", str(t)), []), ["is a directory without config.json"]),
    ("output-is-a-file", lambda c, t: (_nested(c, "output", _write(t, "taken", "x")), []), ["exists and is not a directory"]),
    ("output-under-a-file", lambda c, t: (_nested(c, "output", str(Path(_write(t, "blocker", "x")) / "run")), []),
     ["cannot write to output", "choose a writable directory"]),
    ("resume-without-checkpoint", lambda c, t: (c, ["resume=true"]), ["holds no complete checkpoint", "without resume=true"]),
]


@pytest.mark.parametrize("name,breaker,fragments", CASES, ids=[case[0] for case in CASES])
def test_bad_input(name, breaker, fragments, monkeypatch, capsys, tmp_path, tiny_model_dir):
    config, overrides = breaker(_setup(tmp_path, tiny_model_dir), tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, "train", _yaml(tmp_path, config), *overrides)
    assert code == 2, f"{name}: exit status must be 2, got {code}; stderr: {err[-1500:]}"
    assert "Traceback" not in err, f"{name}: no traceback for user errors: {err[-1500:]}"
    assert "error:" in err
    flat = " ".join(err.split())
    for fragment in fragments:
        assert fragment in flat, f"{name}: message must contain {fragment!r}; got: {flat[-800:]}"
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists(), f"{name}: no finished-looking output"


def test_finished_run_is_not_overwritten_by_default(monkeypatch, capsys, tmp_path, tiny_model_dir):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "adapter_model.safetensors").write_bytes(b"finished")
    code, _, err = run_cli(monkeypatch, capsys, "train", _yaml(tmp_path, _setup(tmp_path, tiny_model_dir)))
    assert code == 2 and "already holds a finished run" in err and "overwrite=true" in err
    assert (tmp_path / "run" / "adapter_model.safetensors").read_bytes() == b"finished"


def test_disk_full_on_save(monkeypatch, capsys, tmp_path, tiny_model_dir):
    """ENOSPC while writing the adapter: clear error, no half-written adapter, checkpoint kept for resume."""
    import safetensors.torch

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")  # what a real partial write leaves behind
        raise OSError(errno.ENOSPC, "No space left on device")

    # The adapter goes through slimtune.atomic, which looks save_file up at call time; checkpoints were
    # written before the patch matters (they import it at module load), so only the final save fails.
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    code, _, err = run_cli(monkeypatch, capsys, "train", _yaml(tmp_path, _setup(tmp_path, tiny_model_dir)))
    flat = " ".join(err.split())
    assert code == 2 and "Traceback" not in err, err[-1500:]
    assert "No space left on device" in flat and "resume=true" in flat, flat[-800:]
    run = tmp_path / "run"
    assert not (run / "adapter_model.safetensors").exists(), "a failed save must not look like a finished run"
    assert not list(run.glob("*.partial")), "the partial file is removed"
    assert (run / "checkpoints" / "step-000001" / "COMPLETE").is_file(), "the final checkpoint survives"

    # Once there is space again, resume=true finishes the run from the final checkpoint.
    monkeypatch.undo()
    code, _, err = run_cli(monkeypatch, capsys, "train", tmp_path / "config.yaml", "resume=true")
    assert code == 0, err[-1500:]
    from safetensors.torch import load_file

    saved = load_file(str(run / "adapter_model.safetensors"))
    trained = load_file(str(run / "checkpoints" / "step-000001" / "trainable.safetensors"))
    assert set(saved) == {"base_model." + "model." + k for k in trained}, "the adapter holds the checkpoint's tensors"
    assert all((saved["base_model.model." + k] == v).all() for k, v in trained.items()), \
        "the adapter written on resume equals the trained weights in the checkpoint"
