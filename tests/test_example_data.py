"""Checks for the procedurally generated extraction dataset in examples/data.

These tests verify the committed JSONL files by independent means (not by
re-parsing sentences): schema, literal presence of every label value in the
input, train/eval disjointness, generator determinism, and that the committed
files are exactly what the generator produces with default arguments.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "make_extract_data.py"
DATA = REPO / "examples" / "data"
FILES = {"train": DATA / "extract_train.jsonl", "eval": DATA / "extract_eval.jsonl"}
EXPECTED_ROWS = {"train": 600, "eval": 60}
KEYS = ["name", "age", "city", "job"]


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def run_generator(out_dir: Path, *extra: str) -> None:
    subprocess.run(
        [sys.executable, str(SCRIPT), "--out-dir", str(out_dir), *extra],
        check=True,
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize("split", ["train", "eval"])
def test_rows_well_formed(split: str) -> None:
    rows = load(FILES[split])
    assert len(rows) == EXPECTED_ROWS[split]
    for row in rows:
        assert set(row) == {"instruction", "input", "output"}
        assert all(isinstance(row[k], str) and row[k] for k in row)
        record = json.loads(row["output"])
        assert list(record) == KEYS
        assert isinstance(record["age"], int) and not isinstance(record["age"], bool)
        assert all(isinstance(record[k], str) for k in ("name", "city", "job"))
        # Exact serialization: key order and default separators.
        assert row["output"] == json.dumps(record)
        for value in (record["name"], str(record["age"]), record["city"], record["job"]):
            assert value in row["input"], (value, row["input"])


def test_instruction_constant() -> None:
    instructions = {r["instruction"] for split in FILES for r in load(FILES[split])}
    assert len(instructions) == 1


@pytest.mark.parametrize("split", ["train", "eval"])
def test_inputs_unique_within_split(split: str) -> None:
    inputs = [r["input"] for r in load(FILES[split])]
    assert len(inputs) == len(set(inputs))


def test_train_eval_disjoint() -> None:
    train = {r["input"] for r in load(FILES["train"])}
    evals = {r["input"] for r in load(FILES["eval"])}
    assert not train & evals
    # Eval people are held out entirely, not just their sentences.
    train_names = {json.loads(r["output"])["name"] for r in load(FILES["train"])}
    eval_names = {json.loads(r["output"])["name"] for r in load(FILES["eval"])}
    assert not train_names & eval_names


def test_generator_deterministic(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    run_generator(a, "--train", "50", "--eval", "10", "--seed", "3")
    run_generator(b, "--train", "50", "--eval", "10", "--seed", "3")
    for name in ("extract_train.jsonl", "extract_eval.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert len(load(a / "extract_train.jsonl")) == 50
    assert len(load(a / "extract_eval.jsonl")) == 10


def test_committed_files_match_generator(tmp_path: Path) -> None:
    run_generator(tmp_path)
    for path in FILES.values():
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name
