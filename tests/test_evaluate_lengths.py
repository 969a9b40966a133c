"""`slimtune eval --lengths`: perplexity per context length against a hand computation, the passkey
prompt, and the command end to end on a tiny LoRA run (any method works through its base view)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

from conftest import make_tiny_tokenizer
from slimtune.api import finetune
from slimtune.config import build_config
from slimtune.errors import SlimtuneError
from slimtune.evaluate_lengths import parse_lengths, passkey_prompt, read_documents, window_perplexity
from test_cli import run_cli


def test_window_perplexity_is_the_mean_next_token_cross_entropy(tiny_model):
    stream = torch.randint(0, 200, (70,), generator=torch.Generator().manual_seed(3)).tolist()
    result = window_perplexity(tiny_model, stream, 30, windows=5)
    assert result["windows"] == 2 and result["tokens"] == 2 * 29, result  # two whole windows fit
    losses = []
    with torch.no_grad():
        for start in (0, 30):
            ids = torch.tensor([stream[start: start + 30]])
            logits = tiny_model(input_ids=ids).logits[0]
            losses.append(F.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum"))
    expected = float(sum(losses)) / 58
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(torch.tensor(expected).exp().item(), rel=1e-5)


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_prompt_hides_the_key_once_at_its_depth(depth):
    tokenizer = make_tiny_tokenizer()  # one token per byte
    ids = passkey_prompt(tokenizer, 2000, 48213, depth)
    text = tokenizer.decode(ids)
    assert 2000 - 100 <= len(ids) <= 2000, f"the prompt should fill about 2000 tokens, has {len(ids)}"
    assert text.count("48213") == 2 and text.count("The pass key is 48213.") == 1
    assert text.endswith("What is the pass key? The pass key is")
    where = text.index("The pass key is 48213.") / len(text)
    assert abs(where - depth) < 0.1, f"needle at {where:.2f} of the prompt, asked for {depth}"


def test_bad_lengths_and_documents_are_one_line_errors(tmp_path):
    with pytest.raises(SlimtuneError, match="comma-separated token counts"):
        parse_lengths("2k,4k")
    assert parse_lengths("4096, 2048,2048") == [2048, 4096]
    with pytest.raises(SlimtuneError, match="holds no"):
        read_documents(tmp_path)
    (tmp_path / "rows.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(SlimtuneError, match="rows.jsonl:2: each row needs a 'text' string"):
        read_documents(tmp_path / "rows.jsonl")


def test_eval_lengths_command_writes_the_table_json_and_plot(tiny_model_dir, data_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    cfg = build_config({"model": str(tiny_model_dir), "output": str(out), "data": {"train": str(data_file)},
                        "lora": {"r": 4}, "eval": {"generations": 0},
                        "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "precision": "fp32", "save_every": None}})
    finetune(cfg, Console(quiet=True))
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.py").write_text("def f(x):\n    return x * 2\n" * 20)
    (docs / "b.txt").write_text("long text " * 40)
    code, stdout, stderr = run_cli(monkeypatch, capsys, "eval", out, "--lengths", "32,64", "--data", docs,
                                   "--windows", "2", "--passkeys", "1")
    assert code == 0, stderr
    assert "base ppl" in stdout and "      64" in stdout, stdout
    result = json.loads((out / "length_eval.json").read_text())
    assert [p["length"] for p in result["tuned"]] == [32, 64] and result["base"][0]["windows"] == 2
    assert result["base"][0]["perplexity"] != result["tuned"][0]["perplexity"], "base view and tuned must differ"
    assert (out / "length_eval.png").stat().st_size > 1000
    code, _, stderr = run_cli(monkeypatch, capsys, "eval", out, "--lengths", "32,999999", "--data", docs)
    assert code == 2 and "fewer than the longest length 999,999" in stderr and "Traceback" not in stderr, stderr
    code, _, stderr = run_cli(monkeypatch, capsys, "eval", out, "--lengths", "32")
    assert code == 2 and "--lengths needs long held-out documents" in stderr, stderr
