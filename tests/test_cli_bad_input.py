"""Every command, not only `train`: bad input is one `error:` line naming the value and the fix, exit
status 2, no traceback, and nothing is loaded or written first."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from test_cli import run_cli, write_config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir) -> Path:
    tmp = tmp_path_factory.mktemp("cli-run")
    with pytest.MonkeyPatch.context() as monkeypatch:
        from slimtune.api import finetune
        from slimtune.config import load_config

        finetune(load_config(write_config(tmp, tiny_model_dir)))
    return tmp / "run"


def _one_error_line(code: int, err: str, *fragments: str) -> None:
    assert code == 2 and "Traceback" not in err, f"exit 2 without a traceback, got {code}: {err[-1500:]}"
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, f"one error line: {err[-1500:]}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} must be on the error line: {lines[0]}"


def test_merge_into_an_existing_file(monkeypatch, capsys, tmp_path, finished_run):
    target = tmp_path / "taken"
    target.write_text("keep me")
    _one_error_line(*run_cli(monkeypatch, capsys, "merge", finished_run, target)[::2],
                    f"merge output '{target}' exists and is not a directory")
    assert target.read_text() == "keep me"


def test_merge_into_a_non_empty_directory(monkeypatch, capsys, tmp_path, finished_run):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    _one_error_line(*run_cli(monkeypatch, capsys, "merge", finished_run, tmp_path / "full")[::2], "is not empty")


@pytest.mark.parametrize("command", [("generate", "hi"), ("eval",), ("chat",), ("merge", "out")],
                         ids=["generate", "eval", "chat", "merge"])
def test_commands_on_a_missing_run(monkeypatch, capsys, tmp_path, command):
    missing = tmp_path / "no-run"
    args = [command[0], missing, *(tmp_path / a if a == "out" else a for a in command[1:])]
    _one_error_line(*run_cli(monkeypatch, capsys, *args)[::2], f"run directory '{missing}' does not exist")


@pytest.mark.parametrize("options,fragment", [
    (["--seed", str(2**70)], f"--seed {2**70} is out of range"),
    (["--temperature", "inf"], "--temperature inf is not a finite number"),  # typer's min=0 lets inf through
], ids=["huge-seed", "inf-temperature"])
def test_generate_options_out_of_range(monkeypatch, capsys, finished_run, options, fragment):
    _one_error_line(*run_cli(monkeypatch, capsys, "generate", finished_run, "hi", *options)[::2], fragment)


def test_largest_seed_is_accepted(monkeypatch, capsys, finished_run):
    code, out, err = run_cli(monkeypatch, capsys, "generate", finished_run, "hi", "--max-new-tokens", "1",
                             "--seed", str(2**64 - 1))
    assert code == 0, err[-1500:]


def test_non_utf8_prompt(monkeypatch, capsys, finished_run):
    # A prompt holding bytes that were not UTF-8 reaches Python as lone surrogates (surrogateescape).
    prompt = b"caf\xe9".decode("utf-8", "surrogateescape")
    _one_error_line(*run_cli(monkeypatch, capsys, "generate", finished_run, prompt)[::2], "the prompt is not UTF-8 text")


def test_non_utf8_chat_input(monkeypatch, capsys, finished_run):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9 au lait\n"), encoding="utf-8"))
    _one_error_line(*run_cli(monkeypatch, capsys, "chat", finished_run)[::2],
                    "the input line is not UTF-8 text (byte 0xe9)")


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu:0"])
def test_serve_unknown_device(monkeypatch, capsys, device):
    _one_error_line(*run_cli(monkeypatch, capsys, "serve", "--device", device)[::2],
                    f"--device '{device}' is not a device", "cuda:N")


def test_config_errors_are_a_summary_and_one_line_each(monkeypatch, capsys, tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir)
    code, _, err = run_cli(monkeypatch, capsys, "train", config, "train.seed=-1", "lora.alpha=.inf", "output=")
    assert code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines[0] == f"error: {config} has 3 problem(s):", lines
    assert [line.split(":")[0] for line in lines[1:]] == ["  - output", "  - lora.alpha", "  - train.seed"], lines


def test_override_with_an_empty_key_part(monkeypatch, capsys, tmp_path, tiny_model_dir):
    _one_error_line(*run_cli(monkeypatch, capsys, "train", write_config(tmp_path, tiny_model_dir), "train..lr=1")[::2],
                    "override 'train..lr=1' has an empty part")
