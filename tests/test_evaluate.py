"""Evaluation metrics and `slimtune eval`, each checked against an independent reference.

ROUGE-L against Google's `rouge-score` package (with a whitespace tokenizer) and a hand computation;
BLEU against a direct sacrebleu call and hand-computed n-gram precisions; exact match by hand. The
end-to-end `eval` run compares its losses and replies with plain transformers (base) and PEFT loading
the adapter (tuned), never with slimtune's own evaluation code.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import sacrebleu
import torch
import yaml
from peft import PeftModel
from rouge_score import rouge_scorer
from transformers import AutoModelForCausalLM, AutoTokenizer

from slimtune.adapters import save_lora_adapter
from slimtune.api import evaluate_run
from slimtune.evaluate import bleu, exact_match, rouge_l
from slimtune.methods.lora import attach_lora, lora_layers
from slimtune.models import load_model
from test_cli import assert_user_error, run_cli, write_jsonl


class WhitespaceTokenizer:
    """rouge-score's tokenizer interface; its default one lower-cases and drops punctuation."""

    def tokenize(self, text: str) -> list[str]:
        return text.split()


ROUGE = rouge_scorer.RougeScorer(["rougeL"], tokenizer=WhitespaceTokenizer())


# --- ROUGE-L -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("prediction", "reference"), [
    ("the cat sat on the mat", "the cat sat on the mat"),
    ("the cat sat on the mat", "the cat on a mat"),
    ("a b c d", "d c b a"),
    ("a a a", "a"),
    ("a", "a a a"),
    ("a b a b a", "b a b"),
    ("x y z", "a b c"),
    ("The Cat", "the cat"),
    ("  spaced\tout \n words ", "spaced words"),
    ('{"name": "Ana", "age": 31}', '{"name": "Ana", "age": 30}'),
    ("", "something"),
    ("something", ""),
    ("", ""),
])
def test_rouge_l_matches_rouge_score(prediction, reference):
    want = ROUGE.score(reference, prediction)["rougeL"].fmeasure  # rouge-score takes (target, prediction)
    got = rouge_l(prediction, reference)
    assert got == pytest.approx(want, abs=1e-12), \
        f"ROUGE-L F1 of {prediction!r} vs {reference!r}: rouge-score gives {want}, slimtune {got}"


def test_rouge_l_by_hand():
    # LCS of "the cat sat on the mat" and "the cat on a mat" is "the cat on mat" (4 tokens):
    # P = 4/6, R = 4/5, F1 = 2 P R / (P + R) = (16/15) / (22/15) = 8/11.
    got = rouge_l("the cat sat on the mat", "the cat on a mat")
    assert got == pytest.approx(8 / 11, abs=1e-12), f"ROUGE-L F1 must be 8/11 by hand, got {got}"


# --- BLEU and exact match ------------------------------------------------------------------------------

CORPUS = (
    ["the cat sat on the mat", "a quick brown fox jumps over the dog", "hello", '{"name": "Ana", "age": 31}'],
    ["the cat sat on a mat", "the quick brown fox jumped over the lazy dog", "hello there", '{"name": "Ana", "age": 30}'],
)


def test_bleu_matches_sacrebleu():
    predictions, references = CORPUS
    want = sacrebleu.corpus_bleu(predictions, [references], use_effective_order=True).score
    got = bleu(predictions, references)
    assert 0 < want < 100, f"the corpus must give a BLEU strictly between 0 and 100 to mean something, got {want}"
    assert got == pytest.approx(want, abs=1e-9), f"corpus BLEU: sacrebleu gives {want}, slimtune {got}"


def test_bleu_by_hand():
    # One pair, equal lengths (BP = 1). Clipped n-gram precisions of "the cat sat on the mat" against
    # "the cat sat on a mat": 5/6, 3/5, 2/4, 1/3; BLEU = 100 * (5/6 * 3/5 * 2/4 * 1/3) ** (1/4).
    got = bleu(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert got == pytest.approx(100 * (1 / 12) ** 0.25, abs=1e-9), f"BLEU must be 100 * (1/12)^(1/4), got {got}"


@pytest.mark.parametrize("texts", [
    ["the cat sat on the mat", "a quick brown fox jumps over the dog"],
    ["tac", "YES"],  # no 2-grams anywhere: a perfect match still scores 100
])
def test_bleu_of_identical_text_is_100(texts):
    got = bleu(texts, texts)
    assert got == pytest.approx(100.0, abs=1e-9), f"identical predictions and references must score 100, got {got}"


def test_bleu_of_nothing_is_0_and_lengths_must_match():
    assert bleu([], []) == 0.0, "an empty corpus scores 0"
    with pytest.raises(ValueError, match="one reference per prediction, got 2 and 1"):
        bleu(["a", "b"], ["a"])


def test_exact_match_by_hand():
    # Equal after stripping: 'tac' and ' YES\n'; not equal: 'No' vs 'no' (case counts).
    got = exact_match(["tac", " YES\n", "No"], ["tac", "YES", "no"])
    assert got == pytest.approx(2 / 3), f"2 of 3 replies match their reference, got {got}"
    assert exact_match([], []) == 0.0, "no references: exact match 0"


# --- slimtune eval, end to end -------------------------------------------------------------------------


@pytest.fixture
def tiny_run(tmp_path, tiny_model_dir) -> Path:
    """A run directory holding a LoRA adapter with random non-zero B for the tiny model (no config.yaml)."""
    model, _, _ = load_model(str(tiny_model_dir))
    attach_lora(model, ["q_proj", "v_proj", "down_proj"], r=4, alpha=8)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.3)
    run_dir = tmp_path / "run"
    save_lora_adapter(model, run_dir, base_model=str(tiny_model_dir))
    return run_dir


def write_run_config(run_dir: Path, model_dir: Path, eval_file: Path | None = None, **eval_settings) -> None:
    data = {"train": str(run_dir.parent / "train.jsonl"), "max_length": 128}
    if eval_file is not None:
        data["eval"] = str(eval_file)
    config = {"model": str(model_dir), "data": data, "eval": eval_settings}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")


def reference_models(model_dir: Path, run_dir: Path):
    """(tokenizer, base, tuned) loaded with transformers and PEFT only."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(run_dir)).eval()
    return tokenizer, base, tuned


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


@torch.no_grad()
def reference_reply(model, tokenizer, messages: list[dict], max_new_tokens: int) -> str:
    """One greedy reply from HF `generate` on the unpadded prompt."""
    ids = torch.tensor([prompt_ids(tokenizer, messages)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


@torch.no_grad()
def reference_loss(model, tokenizer, conversations: list[list[dict]]) -> float:
    """Cross-entropy over every token after the generation prompt (the reply and its end-of-turn text),
    summed over all conversations and divided by the number of such tokens."""
    total, count = 0.0, 0
    for conversation in conversations:
        prompt = prompt_ids(tokenizer, conversation[:-1])
        full_text = tokenizer.apply_chat_template(conversation, tokenize=False)
        full = tokenizer(full_text, add_special_tokens=False).input_ids
        assert full[:len(prompt)] == prompt, "the test's template must render the prompt as a prefix"
        labels = torch.tensor([[-100] * len(prompt) + full[len(prompt):]])
        n = len(full) - len(prompt)
        total += float(model(input_ids=torch.tensor([full]), labels=labels).loss) * n
        count += n
    return total / count


def table_row(report: str, label: str) -> tuple[float, float]:
    match = re.search(rf"^\| {re.escape(label)} \| (\S+) \| (\S+) \|$", report, re.MULTILINE)
    assert match, f"the report's metrics table must have a '{label}' row:\n{report}"
    return float(match.group(1)), float(match.group(2))


def fenced(text: str) -> str:
    return f"```text\n{text}\n```" if text else "*(empty)*"


MAX_NEW = 6


def test_eval_command_end_to_end(monkeypatch, capsys, tmp_path, tiny_model_dir, tiny_run):
    tokenizer, base_ref, tuned_ref = reference_models(tiny_model_dir, tiny_run)
    prompts = [
        [{"role": "user", "content": "Reverse the word.\ncat"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Upper-case it.\nyes"}],
        [{"role": "user", "content": "Say hi."}],
    ]
    tuned_replies = [reference_reply(tuned_ref, tokenizer, p, MAX_NEW) for p in prompts]
    base_replies = [reference_reply(base_ref, tokenizer, p, MAX_NEW) for p in prompts]
    assert tuned_replies != base_replies, "the adapter must change the greedy replies, else base vs tuned is void"
    assert tuned_replies[0], "the tuned model must say something to the first prompt (the test builds on it)"
    # References built so the tuned model matches the first exactly and the second in part.
    references = [tuned_replies[0], tuned_replies[1] + " extra words", "hello there"]
    conversations = [p + [{"role": "assistant", "content": r}] for p, r in zip(prompts, references)]
    eval_file = write_jsonl(tmp_path / "eval.jsonl", [{"messages": c} for c in conversations])
    write_run_config(tiny_run, tiny_model_dir)  # no data.eval: --data is the only source

    code, out, err = run_cli(monkeypatch, capsys, "eval", tiny_run, "--data", eval_file, "--generations", 3,
                             "--max-new-tokens", MAX_NEW, "--batch-size", 2)
    assert code == 0, f"eval must succeed:\n{err}"
    assert "| metric | base | tuned |" in out, f"eval must print the metrics table on stdout:\n{out}"

    metrics = json.loads((tiny_run / "eval_metrics.json").read_text(encoding="utf-8"))
    want_loss = {"base": reference_loss(base_ref, tokenizer, conversations),
                 "tuned": reference_loss(tuned_ref, tokenizer, conversations)}
    assert abs(want_loss["base"] - want_loss["tuned"]) > 1e-3, "the adapter must change the loss, else the check is void"
    want_replies = {"base": base_replies, "tuned": tuned_replies}
    for side in ("base", "tuned"):
        got = metrics[side]
        assert got["loss"] == pytest.approx(want_loss[side], rel=1e-5), \
            f"{side} response-token loss must equal the HF/PEFT forward's {want_loss[side]}, got {got['loss']}"
        assert got["perplexity"] == pytest.approx(math.exp(want_loss[side]), rel=1e-5), f"{side} perplexity = exp(loss)"
        replies = [row[side] for row in metrics["outputs"]]
        assert replies == want_replies[side], f"{side} replies must equal HF greedy generate's {want_replies[side]}"
        hits = sum(r == ref for r, ref in zip(replies, references)) / 3
        rouge = sum(ROUGE.score(ref, r)["rougeL"].fmeasure for r, ref in zip(replies, references)) / 3
        corpus_bleu = sacrebleu.corpus_bleu(replies, [references], use_effective_order=True).score
        assert got["exact_match"] == pytest.approx(hits), f"{side} exact match must be {hits}, got {got['exact_match']}"
        assert got["rouge_l"] == pytest.approx(rouge, abs=1e-12), f"{side} mean ROUGE-L must be {rouge} (rouge-score)"
        assert got["bleu"] == pytest.approx(corpus_bleu, abs=1e-9), f"{side} BLEU must be sacrebleu's {corpus_bleu}"
    assert metrics["tuned"]["exact_match"] >= 1 / 3 and metrics["tuned"]["rouge_l"] > 1 / 3, \
        "by construction the tuned model matches the first reference exactly and the second in part"

    report = (tiny_run / "eval_report.md").read_text(encoding="utf-8")
    base_loss, tuned_loss = table_row(report, "response-token loss")
    assert (base_loss, tuned_loss) == (pytest.approx(want_loss["base"], abs=6e-5),
                                       pytest.approx(want_loss["tuned"], abs=6e-5)), \
        f"the report's loss row must show base {want_loss['base']:.4f} and tuned {want_loss['tuned']:.4f}"
    for label in ("perplexity", "exact match", "ROUGE-L F1 (mean)", "BLEU (0-100)"):
        table_row(report, label)
    sections = report.split("### Example ")[1:]
    assert len(sections) == 3, f"the report must show the 3 generated examples, got {len(sections)}:\n{report}"
    for number, (section, conversation) in enumerate(zip(sections, conversations), 1):
        assert section.startswith(f"{number}\n"), f"examples must be numbered in order:\n{section}"
        for message in conversation[:-1]:
            assert f"**Prompt ({message['role']})**\n\n{fenced(message['content'])}" in section, \
                f"example {number} must show its {message['role']} message {message['content']!r}:\n{section}"
        for label, text in (("Reference", references[number - 1]), ("Base output", base_replies[number - 1]),
                            ("Tuned output", tuned_replies[number - 1])):
            assert f"**{label}**\n\n{fenced(text)}" in section, f"example {number} must show {label} {text!r}:\n{section}"


def test_evaluate_run_defaults_come_from_the_run(tmp_path, tiny_model_dir, tiny_run):
    eval_file = write_jsonl(tmp_path / "held-out.jsonl", [
        {"instruction": "Reverse the word.", "input": "cat", "output": "tac"},
        {"instruction": "Upper-case it.", "input": "yes", "output": "YES"},
    ])
    write_run_config(tiny_run, tiny_model_dir, eval_file, generations=1, max_new_tokens=2, batch_size=1)
    result = evaluate_run(tiny_run)
    assert result["data"] == str(eval_file), f"without data the run's data.eval is used, got {result['data']}"
    assert (result["examples"], result["generations"], result["max_new_tokens"]) == (2, 1, 2), \
        "the run's eval.generations=1 and eval.max_new_tokens=2 apply when not given"
    assert [row["reference"] for row in result["outputs"]] == ["tac"], "one generation: the first example only"
    saved = json.loads((tiny_run / "eval_metrics.json").read_text(encoding="utf-8"))
    assert saved == json.loads(json.dumps(result)), "eval_metrics.json must hold what evaluate_run returns"


def test_eval_help(monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "eval", "--help")
    assert code == 0, f"'eval --help' must exit 0:\n{err}"
    for option in ("--data", "--generations", "--max-new-tokens", "--batch-size"):
        assert option in out, f"'eval --help' must document {option}:\n{out}"


# --- user errors ---------------------------------------------------------------------------------------


def test_eval_missing_run_directory(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "eval", tmp_path / "no-run")
    assert_user_error(code, err, f"run directory '{tmp_path / 'no-run'}' does not exist")


def test_eval_without_data_or_data_eval(monkeypatch, capsys, tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    code, _, err = run_cli(monkeypatch, capsys, "eval", run_dir)
    assert_user_error(code, err, f"no evaluation data for '{run_dir}': it has no config.yaml", "pass --data FILE")
    write_run_config(run_dir, tiny_model_dir)
    code, _, err = run_cli(monkeypatch, capsys, "eval", run_dir)
    assert_user_error(code, err, f"no evaluation data for '{run_dir}': its config.yaml sets no data.eval",
                      "pass --data FILE")


def test_eval_missing_data_file(monkeypatch, capsys, tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_run_config(run_dir, tiny_model_dir, tmp_path / "gone.jsonl")
    code, _, err = run_cli(monkeypatch, capsys, "eval", run_dir)
    assert_user_error(code, err, f"data file '{tmp_path / 'gone.jsonl'}' (data.eval in {run_dir / 'config.yaml'}) "
                      "does not exist", "--data")
    code, _, err = run_cli(monkeypatch, capsys, "eval", run_dir, "--data", tmp_path / "typo.jsonl")
    assert_user_error(code, err, f"data file '{tmp_path / 'typo.jsonl'}' (--data) does not exist")
