"""Rendering conversations to tokens with a loss mask: only the assistant's words are learned.

The tiny tokenizer is byte-level (one token per byte, plus ChatML specials), so the expected texts are
written by hand from the ChatML rule `<|im_start|>{role}\\n{content}<|im_end|>\\n`; decoding the labelled
tokens must give back exactly each assistant reply and its end-of-turn marker. With the bundled real
tokenizer, `apply_chat_template(tokenize=True)` is the independent reference for the ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import slimtune.data.render as render
from slimtune.data import IGNORE_INDEX, ChatRenderer, load_dataset
from slimtune.errors import DataError

END = "<|im_end|>"


def chatml(messages: list[dict]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def labelled_runs(tokenizer, input_ids: list[int], labels: list[int]) -> list[str]:
    """Decoded text of each maximal run of consecutive labelled tokens."""
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(input_ids, labels):
        if label != IGNORE_INDEX:
            assert label == token, f"a labelled position must carry its own token id as label, got {label} for {token}"
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = label != IGNORE_INDEX
    return [tokenizer.decode(run) for run in runs]


def unlabelled_text(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    return tokenizer.decode([t for t, l in zip(input_ids, labels) if l == IGNORE_INDEX])


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# Each row's conversation, written out by hand (Alpaca: LLaMA-Factory's instruction + "\n" + input).
FORMAT_CASES = {
    "alpaca": (
        {"system": "SYS be brief", "history": [["USER-old question", "old answer one"]],
         "instruction": "USER-instr translate", "input": "USER-input chat", "output": "le chat, café"},
        [{"role": "system", "content": "SYS be brief"},
         {"role": "user", "content": "USER-old question"},
         {"role": "assistant", "content": "old answer one"},
         {"role": "user", "content": "USER-instr translate\nUSER-input chat"},
         {"role": "assistant", "content": "le chat, café"}],
    ),
    "sharegpt": (
        {"conversations": [{"from": "system", "value": "SYS you help"},
                           {"from": "human", "value": "USER-a hello"}, {"from": "gpt", "value": "hi there"},
                           {"from": "human", "value": "USER-b how are you"}, {"from": "gpt", "value": "fine, ü"}]},
        [{"role": "system", "content": "SYS you help"},
         {"role": "user", "content": "USER-a hello"}, {"role": "assistant", "content": "hi there"},
         {"role": "user", "content": "USER-b how are you"}, {"role": "assistant", "content": "fine, ü"}],
    ),
    "messages": (
        {"messages": [{"role": "user", "content": "USER-x 2+2?"}, {"role": "assistant", "content": "4"},
                      {"role": "user", "content": "USER-y and 3+3?"}, {"role": "assistant", "content": "6, I think"}]},
        [{"role": "user", "content": "USER-x 2+2?"}, {"role": "assistant", "content": "4"},
         {"role": "user", "content": "USER-y and 3+3?"}, {"role": "assistant", "content": "6, I think"}],
    ),
}


@pytest.mark.parametrize("fmt", list(FORMAT_CASES))
def test_only_assistant_replies_are_labelled(tmp_path, tiny_tokenizer, fmt):
    raw, conversation = FORMAT_CASES[fmt]
    path = write_jsonl(tmp_path / "train.jsonl", [raw])
    dataset = load_dataset(path, tiny_tokenizer)
    example = dataset.examples[0]

    assert tiny_tokenizer.decode(example.input_ids) == chatml(conversation), \
        "the tokens must spell the hand-built ChatML rendering of the conversation"
    expected_runs = [m["content"] + END + "\n" for m in conversation if m["role"] == "assistant"]
    assert labelled_runs(tiny_tokenizer, example.input_ids, example.labels) == expected_runs, \
        "labelled tokens must be exactly each assistant reply followed by '<|im_end|>\\n'"
    prompt_text = unlabelled_text(tiny_tokenizer, example.input_ids, example.labels)
    for message in conversation:
        if message["role"] != "assistant":
            assert message["content"] in prompt_text, f"{message['role']} text must stay unlabelled: {message['content']!r}"
    assert "assistant\n" in prompt_text, "the role header of an assistant turn is prompt, not answer"
    assert example.num_labelled == sum(len(run.replace(END, "#").encode()) for run in expected_runs), \
        "one label per byte of each reply plus one for <|im_end|> (byte-level tokenizer)"
    assert not example.truncated, "a short example must not be marked truncated"


@pytest.mark.integration
def test_bundled_tokenizer_masks_multi_turn_and_matches_apply_chat_template(bundled_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_dir)
    conversation = [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome, of course."},
    ]
    example = ChatRenderer(tokenizer).encode(conversation, "chat.jsonl:1", max_length=4096)

    reference = tokenizer.apply_chat_template(conversation, tokenize=True)
    reference_ids = list(reference["input_ids"] if hasattr(reference, "keys") else reference)
    assert example.input_ids == reference_ids, "ids must equal the tokenizer's own apply_chat_template(tokenize=True)"
    assert labelled_runs(tokenizer, example.input_ids, example.labels) == ["Paris.<|im_end|>\n", "Rome, of course.<|im_end|>\n"], \
        "labelled tokens must be exactly the two replies, each with '<|im_end|>\\n'"
    prompt_text = unlabelled_text(tokenizer, example.input_ids, example.labels)
    for text in ("You answer in one word.", "Capital of France?", "And of Italy?"):
        assert text in prompt_text, f"system/user text must stay unlabelled: {text!r}"


@pytest.mark.integration
def test_bundled_tokenizer_default_system_prompt_is_not_labelled(bundled_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_dir)
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    example = ChatRenderer(tokenizer).encode(conversation, "chat.jsonl:1", max_length=4096)
    reference = tokenizer.apply_chat_template(conversation, tokenize=True)
    assert example.input_ids == list(reference["input_ids"] if hasattr(reference, "keys") else reference), \
        "ids must equal apply_chat_template, including the template's default system prompt"
    assert labelled_runs(tokenizer, example.input_ids, example.labels) == ["Hello!<|im_end|>\n"], \
        "only the reply is labelled, not the system prompt the template inserts"


# --- no chat template: the plain format -------------------------------------------------------------


def test_plain_format_without_chat_template(tiny_tokenizer, capsys, monkeypatch):
    tiny_tokenizer.chat_template = None
    monkeypatch.setattr(render, "_warned_plain", False)
    conversation = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Ciao"},
    ]
    renderer = ChatRenderer(tiny_tokenizer)
    ChatRenderer(tiny_tokenizer)  # a second renderer must not repeat the notice
    example = renderer.encode(conversation, "x.jsonl:1", max_length=1000)

    # Hand-written from the format in render.py's docstring.
    expected = ("### System:\nBe kind.\n\n### User:\nHi\n\n### Assistant:\nHello<|im_end|>\n\n"
                "### User:\nBye\n\n### Assistant:\nCiao<|im_end|>\n\n")
    assert tiny_tokenizer.decode(example.input_ids) == expected, "the plain format must match the documented layout"
    # The reply span is what the full rendering adds after the generation prompt "### Assistant:\n":
    # the content, the EOS token and the turn separator.
    assert labelled_runs(tiny_tokenizer, example.input_ids, example.labels) == \
        ["Hello<|im_end|>\n\n", "Ciao<|im_end|>\n\n"], "labels must cover each reply and its EOS"
    assert renderer.render(conversation[:2], add_generation_prompt=True).endswith("### User:\nHi\n\n### Assistant:\n"), \
        "a generation prompt ends with the assistant header"

    err = capsys.readouterr().err
    assert err.count("no chat template") == 1, f"the plain-format notice must be printed exactly once, got: {err!r}"
    assert "### User:" in err, f"the notice must name the format used: {err!r}"


def test_chat_template_prints_no_plain_notice(tiny_tokenizer, capsys, monkeypatch):
    monkeypatch.setattr(render, "_warned_plain", False)
    ChatRenderer(tiny_tokenizer)
    assert "no chat template" not in capsys.readouterr().err, "a tokenizer with a template must not trigger the notice"


# --- truncation --------------------------------------------------------------------------------------

# <|im_start|> "user\n" "hi" <|im_end|> "\n" = 1+5+2+1+1 = 10 tokens; <|im_start|> "assistant\n" = 11;
# so the prompt is 21 tokens and "hello" <|im_end|> "\n" = 7 more: 28 in all.
SHORT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def test_truncation_keeps_max_length_tokens(tiny_tokenizer):
    renderer = ChatRenderer(tiny_tokenizer)
    full = renderer.encode(SHORT, "x:1", max_length=1000)
    assert len(full.input_ids) == 28 and not full.truncated, "hand count: 21 prompt + 7 answer tokens"

    cut = renderer.encode(SHORT, "x:1", max_length=24)
    assert cut.truncated, "an example longer than max_length must be marked truncated"
    assert cut.input_ids == full.input_ids[:24] and len(cut.labels) == 24, "truncation keeps the first max_length tokens"
    assert labelled_runs(tiny_tokenizer, cut.input_ids, cut.labels) == ["hel"], \
        "tokens 22-24 are the first three bytes of the answer"


def test_fully_truncated_answer_is_dropped(tmp_path, tiny_tokenizer, capsys):
    long_row = {"messages": [{"role": "user", "content": "hi there, a long question"}, {"role": "assistant", "content": "x"}]}
    short_row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = write_jsonl(tmp_path / "train.jsonl", [short_row, long_row])

    dataset = load_dataset(path, tiny_tokenizer, max_length=24)
    assert len(dataset) == 1 and dataset.conversations == [SHORT], "only the row whose answer survives is kept"
    assert dataset.dropped == [f"{path}:2"], "the dropped row is named by file:line"
    err = capsys.readouterr().err
    assert "dropped 1 example(s)" in err and f"{path}:2" in err and "data.max_length=24" in err, \
        f"dropping must be reported on stderr with the line and the limit: {err!r}"


def test_all_examples_truncated_raises(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "hi", "output": "hello"}] * 2)
    with pytest.raises(DataError) as info:
        load_dataset(path, tiny_tokenizer, max_length=21)  # exactly the 21 prompt tokens: no answer left
    message = str(info.value)
    assert str(path) in message and "data.max_length=21" in message, f"must name the file and the limit: {message}"
    assert "raise data.max_length" in message, f"must say how to fix it: {message}"
