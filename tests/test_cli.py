"""The `slimtune` command: help, user errors (exit 2, one 'error:' line with the fix, no traceback), and one
real train -> generate -> merge -> chat run on the tiny model.

Most cases call `slimtune.cli.main` in-process (a subprocess costs seconds of imports); the end-to-end run
uses real subprocesses so the module entry point and exit codes are exercised as a user sees them.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import yaml

from slimtune.cli import main

ANSI = re.compile(r"\x1b\[[0-9;]*m")
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Run `slimtune ARGS` in-process; returns (exit code, stdout, stderr). An exception that escapes
    `main` is what a user would see as a traceback, so it is returned as one in stderr."""
    monkeypatch.setattr(sys, "argv", ["slimtune", *map(str, args)])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # typer installs its own; restore it afterwards
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported as the traceback the user would see
        code = 1
        print(traceback.format_exc(), file=sys.stderr)
    out, err = capsys.readouterr()
    return code, ANSI.sub("", out), ANSI.sub("", err)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


TRAIN_ROWS = [
    {"instruction": "Reverse the word.", "input": "abc", "output": "cba"},
    {"instruction": "Reverse the word.", "input": "dog", "output": "god"},
    {"instruction": "Upper-case it.", "input": "hi", "output": "HI"},
    {"instruction": "Upper-case it.", "input": "ok", "output": "OK"},
]
EVAL_ROWS = [
    {"instruction": "Reverse the word.", "input": "cat", "output": "tac"},
    {"instruction": "Upper-case it.", "input": "yes", "output": "YES"},
]


def write_config(tmp_path: Path, model_dir: Path, **sections: str) -> Path:
    """A minimal fast config on the tiny model; `sections` replace whole YAML blocks by name."""
    blocks = {
        "model": f"model: {model_dir}\n",
        "output": f"output: {tmp_path / 'run'}\n",
        "lora": "lora:\n  r: 4\n  alpha: 8\n  targets: [q_proj, v_proj]\n",
        "data": f"data:\n  train: {write_jsonl(tmp_path / 'train.jsonl', TRAIN_ROWS)}\n  max_length: 64\n",
        "train": "train:\n  max_steps: 1\n  batch_size: 2\n",
    }
    blocks.update(sections)
    path = tmp_path / "cfg.yaml"
    path.write_text("".join(blocks.values()), encoding="utf-8")
    return path


def assert_user_error(code: int, err: str, *fragments: str) -> None:
    assert "Traceback" not in err, f"a user error must not print a traceback:\n{err}"
    assert code == 2, f"a user error must exit with status 2, got {code}:\n{err}"
    assert "error:" in err, f"stderr must carry an 'error:' line:\n{err}"
    for fragment in fragments:
        assert fragment in err, f"stderr must contain {fragment!r} verbatim (on one line):\n{err}"


# --- help --------------------------------------------------------------------------------------------


def test_top_level_help_lists_commands(monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "--help")
    assert code == 0, f"--help must exit 0:\n{err}"
    for command in ("train", "merge", "generate", "chat"):
        assert command in out, f"--help must list the '{command}' command:\n{out}"


@pytest.mark.parametrize(("command", "mentions"), [
    ("train", "KEY=VALUE"), ("merge", "out_dir"), ("generate", "--max-new-tokens"), ("chat", "--system"),
])
def test_subcommand_help(monkeypatch, capsys, command, mentions):
    code, out, err = run_cli(monkeypatch, capsys, command, "--help")
    assert code == 0, f"'{command} --help' must exit 0:\n{err}"
    assert mentions in out, f"'{command} --help' must document {mentions}:\n{out}"


def test_unknown_command_is_a_usage_error(monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "trian")
    assert code == 2 and "Traceback" not in err, f"an unknown command is a usage error (exit 2):\n{err}"
    assert "trian" in err, f"the usage error must name the bad command:\n{err}"


# --- user errors -------------------------------------------------------------------------------------


def test_missing_config_file(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "train", tmp_path / "nope.yaml")
    assert_user_error(code, err, f"config file '{tmp_path / 'nope.yaml'}' does not exist", "pass the path of a YAML file")


def test_unknown_config_key(monkeypatch, capsys, tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path, tiny_model_dir, lora="lora:\n  rr: 4\n")
    code, _, err = run_cli(monkeypatch, capsys, "train", cfg)
    assert_user_error(code, err, "unknown key 'lora.rr'", "did you mean 'lora.r'?")


def test_bad_override_type(monkeypatch, capsys, tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path, tiny_model_dir)
    code, _, err = run_cli(monkeypatch, capsys, "train", cfg, "train.lr=fast")
    assert_user_error(code, err, "train.lr:", "'fast'")


def test_malformed_data_line(monkeypatch, capsys, tmp_path, tiny_model_dir):
    # A long directory name: the file:line in the message must not be broken across lines.
    data_dir = tmp_path / ("a-rather-long-directory-name-for-the-dataset-files-" * 2)
    data_dir.mkdir()
    train = data_dir / "train.jsonl"
    train.write_text('{"instruction": "q", "output": "a"}\n{"instruction": "q", "output": "a"\n', encoding="utf-8")
    cfg = write_config(tmp_path, tiny_model_dir, data=f"data:\n  train: {train}\n")
    code, _, err = run_cli(monkeypatch, capsys, "train", cfg)
    assert_user_error(code, err, f"{train}:2: invalid JSON")


def test_bracketed_hint_survives_terminal_markup(monkeypatch, capsys, tmp_path, tiny_model_dir):
    train = write_jsonl(tmp_path / "hist.jsonl", [{"instruction": "q", "output": "a", "history": ["x"]}])
    cfg = write_config(tmp_path, tiny_model_dir, data=f"data:\n  train: {train}\n")
    code, _, err = run_cli(monkeypatch, capsys, "train", cfg)
    assert_user_error(code, err, f"{train}:1:", "must be a [user, assistant] pair, got 'x'")


def test_missing_data_file(monkeypatch, capsys, tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path, tiny_model_dir, data=f"data:\n  train: {tmp_path / 'missing.jsonl'}\n")
    code, _, err = run_cli(monkeypatch, capsys, "train", cfg)
    assert_user_error(code, err, f"data file '{tmp_path / 'missing.jsonl'}' does not exist", "data.train")


def test_unknown_target_module_lists_real_names(monkeypatch, capsys, tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path, tiny_model_dir)
    code, _, err = run_cli(monkeypatch, capsys, "train", cfg, "lora.targets=[q_prj]")
    assert_user_error(code, err, "unknown target module 'q_prj'")
    listed = err.split("the model has", 1)[-1]
    for name in LLAMA_LINEAR:
        assert name in listed, f"the error must list the Llama linear layer {name}:\n{err}"
    assert "lm_head" not in listed, f"the output head is not a target and must not be offered:\n{err}"


def test_nonexistent_model_path(monkeypatch, capsys, tmp_path):
    missing = tmp_path / "no-such-model"
    cfg = write_config(tmp_path, missing)
    code, _, err = run_cli(monkeypatch, capsys, "train", cfg)
    assert_user_error(code, err, f"model '{missing}' is not a HF model directory", "smollm2-135m")


def test_finished_output_without_overwrite(monkeypatch, capsys, tmp_path, tiny_model_dir):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "adapter_model.safetensors").write_bytes(b"finished")
    cfg = write_config(tmp_path, tiny_model_dir)
    code, _, err = run_cli(monkeypatch, capsys, "train", cfg)
    assert_user_error(code, err, f"output '{tmp_path / 'run'}' already holds a finished run", "overwrite=true")
    assert (tmp_path / "run" / "adapter_model.safetensors").read_bytes() == b"finished", \
        "a refused run must leave the finished run's files alone"


def test_overwrite_keeps_the_old_run_when_the_new_config_is_invalid(monkeypatch, capsys, tmp_path, tiny_model_dir):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "adapter_model.safetensors").write_bytes(b"finished")
    cfg = write_config(tmp_path, tiny_model_dir)
    code, _, err = run_cli(monkeypatch, capsys, "train", cfg, "overwrite=true", "lora.targets=[q_prj]")
    assert_user_error(code, err, "unknown target module 'q_prj'")
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file(), \
        "a run that fails its checks must not delete the finished run it was going to replace"


def test_generate_without_run_directory(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "generate", tmp_path / "no-run", "hi")
    assert_user_error(code, err, f"run directory '{tmp_path / 'no-run'}' does not exist")


# --- one real run, as a user would do it -------------------------------------------------------------


def slimtune(*args, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-m", "slimtune.cli", *map(str, args)], input=stdin, capture_output=True,
                          text=True, encoding="utf-8", env=env, cwd=cwd, timeout=300)


OVERRIDES = ["train.max_steps=3", "train.lr=1e-2", "eval.generations=2", "eval.max_new_tokens=4"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir):
    tmp_path = tmp_path_factory.mktemp("cli-run")
    evals = write_jsonl(tmp_path / "eval.jsonl", EVAL_ROWS)
    cfg = write_config(tmp_path, tiny_model_dir,
                       data=f"data:\n  train: {write_jsonl(tmp_path / 'train.jsonl', TRAIN_ROWS)}\n"
                            f"  eval: {evals}\n  max_length: 64\n",
                       train="train:\n  batch_size: 2\n  warmup_ratio: 0.0\n",
                       eval="eval:\n  batch_size: 2\n")
    result = slimtune("train", cfg, *OVERRIDES, cwd=tmp_path)
    return tmp_path / "run", cfg, result


def test_train_writes_a_complete_run(trained_run, tiny_model_dir):
    run_dir, cfg_path, result = trained_run
    assert result.returncode == 0, f"training must succeed:\n{result.stderr[-4000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    for name in ("adapter_config.json", "adapter_model.safetensors", "config.yaml", "metrics.jsonl", "loss.png",
                 "eval.json"):
        assert (run_dir / name).is_file(), f"the run directory must hold {name}"

    from slimtune.config import load_config

    saved = load_config(run_dir / "config.yaml")
    assert saved == load_config(cfg_path, OVERRIDES), "config.yaml must be the resolved config, overrides included"
    assert (saved.train.max_steps, saved.train.lr, saved.eval.generations, saved.eval.max_new_tokens) == (3, 1e-2, 2, 4), \
        "the saved config must hold the command-line overrides"
    assert saved.model == str(tiny_model_dir), "the saved config names the base model"

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3], "max_steps=3 with log_every=1 gives one row per step"
    for row in rows:
        for key in ("loss", "lr", "tokens_per_s", "elapsed_s"):
            assert isinstance(row.get(key), (int, float)) and math.isfinite(row[key]), f"row {row} needs a finite {key}"
        assert row["loss"] > 0 and row["tokens_per_s"] > 0, f"loss and throughput must be positive: {row}"
    assert rows[0]["lr"] == pytest.approx(1e-2), "without warmup the first step runs at the peak lr"
    assert [row["elapsed_s"] for row in rows] == sorted(row["elapsed_s"] for row in rows), "elapsed time never decreases"

    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "loss.png must be a PNG file"

    report = json.loads((run_dir / "eval.json").read_text(encoding="utf-8"))
    vocab = 259  # 256 byte tokens + <|im_start|>, <|im_end|>, <|pad|>
    assert report["base"]["loss"] == pytest.approx(math.log(vocab), abs=0.1), \
        "a freshly initialised model (logits near 0) must score about ln(vocab) on the eval answers"
    assert math.isfinite(report["tuned"]["loss"]), "the tuned model's eval loss must be recorded"
    assert [(g["prompt"], g["reference"]) for g in report["generations"]] == \
        [("Reverse the word.\ncat", "tac"), ("Upper-case it.\nyes", "YES")], \
        "eval.generations=2 shows both eval prompts (instruction + newline + input) with their references"


def test_generate_from_the_run(trained_run):
    run_dir, _, result = trained_run
    assert result.returncode == 0, "needs the training run"
    reply = slimtune("generate", run_dir, "hi", "--max-new-tokens", "3")
    assert reply.returncode == 0, f"generate must succeed:\n{reply.stderr[-4000:]}"
    # One token per byte: 3 tokens decode to at most 3 characters (a broken UTF-8 byte becomes one U+FFFD).
    assert reply.stdout.endswith("\n") and len(reply.stdout[:-1]) <= 3, \
        f"the reply must be printed with at most 3 new tokens: {reply.stdout!r}"


def test_merge_gives_a_plain_model_equal_to_base_plus_adapter(trained_run, tiny_model_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir, _, result = trained_run
    assert result.returncode == 0, "needs the training run"
    out = tmp_path / "merged"
    merged_run = slimtune("merge", run_dir, out)
    assert merged_run.returncode == 0, f"merge must succeed:\n{merged_run.stderr[-4000:]}"

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run_dir).eval()
    ids = torch.tensor([[5, 70, 80, 90, 100, 110, 120, 130]])
    with torch.no_grad():
        got, want, before = merged(ids).logits, reference(ids).logits, base(ids).logits
    assert not torch.allclose(want, before, atol=1e-6), "the trained adapter must change the model, or the check is empty"
    assert torch.allclose(got, want, atol=1e-5), \
        f"merged logits must equal PEFT's base + adapter; max diff {(got - want).abs().max():.2e}"


def test_chat_reads_stdin(trained_run):
    run_dir, _, result = trained_run
    assert result.returncode == 0, "needs the training run"
    chat = slimtune("chat", run_dir, "--max-new-tokens", "2", stdin="hello\n/exit\n")
    assert chat.returncode == 0, f"chat must end cleanly on /exit:\n{chat.stderr[-4000:]}"
    assert chat.stdout.count("model>") == 1, f"one user line must get exactly one 'model>' reply:\n{chat.stdout!r}"
