"""`slimtune compare`: two methods on the tiny model, the reports, and a finished entry not run again."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from test_cli import run_cli


def _spec(tmp_path: Path, model_dir: Path, data_file: Path, methods: list[dict]) -> Path:
    spec = {
        "output": str(tmp_path / "cmp"), "memory": "8GB",
        "base": {"model": str(model_dir), "lora": {"r": 4, "targets": "all-linear"},
                 "data": {"train": str(data_file), "eval": str(data_file), "max_length": 64},
                 "train": {"max_steps": 2, "batch_size": 4, "save_every": None, "precision": "fp32"},
                 "eval": {"generations": 2, "max_new_tokens": 4}},
        "methods": methods,
    }
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


def test_compare_two_methods_then_resume(monkeypatch, capsys, tmp_path, tiny_model_dir, data_file):
    methods = [{"name": "lora", "method": "lora"},
               {"name": "freeze", "method": "freeze", "overrides": ["freeze.last_layers=1", "train.lr=1e-3"]}]
    spec = _spec(tmp_path, tiny_model_dir, data_file, methods)
    code, out, err = run_cli(monkeypatch, capsys, "compare", spec)
    assert code == 0, err
    report = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    rows = {row["name"]: row for row in report["entries"]}
    assert list(rows) == ["lora", "freeze"]
    for name, row in rows.items():
        assert row["measured_peak_bytes"] > 0 and row["predicted_peak_bytes"] > 0 and row["tokens_per_s"] > 0
        assert "loss" in row["tuned"] and "exact_match" in row["tuned"] and len(row["loss_curve"]) == 2
        # the adapter size is the run's weights file on disk
        weights = {"lora": "adapter_model.safetensors", "freeze": "freeze_model.safetensors"}[name]
        assert row["adapter_bytes"] == (tmp_path / "cmp" / name / weights).stat().st_size
    assert rows["lora"]["trainable_pct"] < rows["freeze"]["trainable_pct"]
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert table.count("\n| lora |") == 1 and "| freeze |" in table and "exact match" in table and table in out
    for picture in ("compare_loss.png", "compare_quality.png"):
        assert (tmp_path / "cmp" / picture).read_bytes()[:4] == b"\x89PNG"

    # Run again: both entries finished, so neither trains again; the reports are rewritten from their results.
    finished = {name: (tmp_path / "cmp" / name / "compare_entry.json").stat().st_mtime_ns for name in rows}
    (tmp_path / "cmp" / "compare.md").unlink()
    code, out, err = run_cli(monkeypatch, capsys, "compare", spec)
    assert code == 0, err
    assert err.count("finished earlier, not run again") == 2
    assert {name: (tmp_path / "cmp" / name / "compare_entry.json").stat().st_mtime_ns for name in rows} == finished
    assert (tmp_path / "cmp" / "compare.md").read_text() == table


def test_compare_bad_file_lists_every_problem(monkeypatch, capsys, tmp_path, tiny_model_dir, data_file):
    methods = [{"name": "a", "method": "lora"}, {"name": "a", "method": "lora", "overrides": ["lora.rr=4"]}]
    spec = _spec(tmp_path, tiny_model_dir, data_file, methods)
    data = yaml.safe_load(spec.read_text())
    data["memory"] = "24XB"
    spec.write_text(yaml.safe_dump(data))
    code, _, err = run_cli(monkeypatch, capsys, "compare", spec)
    assert code == 2 and "Traceback" not in err
    assert "'a' is used twice" in err and "24XB" in err and "lora.rr" in err
    assert not (tmp_path / "cmp").exists(), "nothing runs or is written when the file has a problem"
