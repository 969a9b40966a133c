"""Row formats -> chat messages, format detection, and the errors for malformed rows.

Expected message lists are written out by hand from the format rules: Alpaca as LLaMA-Factory builds it
(system, then history pairs, then `instruction + "\\n" + input` as the user turn, `output` as the reply),
ShareGPT's `from` names mapped to roles, OpenAI messages passed through.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimtune.data import Row, detect_format, load_dataset, to_messages
from slimtune.errors import DataError


def row(data: dict) -> Row:
    return Row(data, "rows.jsonl:7")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --- conversion rules -------------------------------------------------------------------------------


def test_alpaca_with_system_history_and_input():
    data = {
        "system": "You are terse.",
        "history": [["first question", "first answer"], ["second question", "second answer"]],
        "instruction": "Summarise the text.",
        "input": "The cat sat.",
        "output": "A cat sat.",
    }
    expected = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second question"},
        {"role": "assistant", "content": "second answer"},
        {"role": "user", "content": "Summarise the text.\nThe cat sat."},
        {"role": "assistant", "content": "A cat sat."},
    ]
    assert to_messages(row(data), "alpaca") == expected, \
        "Alpaca: system, history pairs, then instruction + '\\n' + input as the user turn, output as the reply"


@pytest.mark.parametrize("extra", [{}, {"input": ""}, {"input": None}], ids=["absent", "empty", "null"])
def test_alpaca_without_input_uses_the_instruction_alone(extra):
    messages = to_messages(row({"instruction": "Say hi.", "output": "hi", **extra}), "alpaca")
    assert messages == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}], \
        "without an input the user turn is the instruction, with no trailing newline"


def test_alpaca_empty_system_and_history_add_no_turns():
    messages = to_messages(row({"system": "", "history": [], "instruction": "q", "output": "a"}), "alpaca")
    assert [m["role"] for m in messages] == ["user", "assistant"], "empty system / history must not add turns"


def test_sharegpt_roles_are_mapped():
    data = {"conversations": [
        {"from": "system", "value": "sys"},
        {"from": "human", "value": "h1"},
        {"from": "gpt", "value": "g1"},
        {"from": "user", "value": "h2"},
        {"from": "assistant", "value": "g2"},
    ]}
    assert to_messages(row(data), "sharegpt") == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "h1"},
        {"role": "assistant", "content": "g1"},
        {"role": "user", "content": "h2"},
        {"role": "assistant", "content": "g2"},
    ], "ShareGPT: system->system, human/user->user, gpt/assistant->assistant, values kept verbatim"


def test_messages_pass_through_and_extra_fields_are_dropped():
    data = {"messages": [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u", "name": "alice"},
        {"role": "assistant", "content": "a"},
    ]}
    assert to_messages(row(data), "messages") == [
        {"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
    ], "OpenAI messages keep role and content only"


# --- detection --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "expected"), [
    ({"instruction": "q", "output": "a"}, "alpaca"),
    ({"instruction": "q", "input": "x", "output": "a", "system": "s"}, "alpaca"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "sharegpt"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "messages"),
])
def test_detect_format(data, expected):
    assert detect_format(row(data)) == expected, f"keys {sorted(data)} identify the {expected} format"


@pytest.mark.parametrize(("fmt", "data"), [
    ("alpaca", {"instruction": "Add.", "input": "2 2", "output": "4"}),
    ("sharegpt", {"conversations": [{"from": "human", "value": "Add.\n2 2"}, {"from": "gpt", "value": "4"}]}),
    ("messages", {"messages": [{"role": "user", "content": "Add.\n2 2"}, {"role": "assistant", "content": "4"}]}),
])
def test_load_dataset_auto_detects_each_format(tmp_path, tiny_tokenizer, fmt, data):
    path = write_jsonl(tmp_path / "train.jsonl", [data, data])
    dataset = load_dataset(path, tiny_tokenizer)
    assert dataset.format == fmt, f"auto detection must pick {fmt}"
    assert dataset.conversations[0] == [
        {"role": "user", "content": "Add.\n2 2"}, {"role": "assistant", "content": "4"},
    ], "the three spellings of this row are the same conversation"


def test_unknown_keys_list_the_expected_keys(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "q", "completion": "a"}])
    with pytest.raises(DataError) as info:
        load_dataset(path, tiny_tokenizer)
    message = str(info.value)
    assert f"{path}:1:" in message, f"must name the file and line: {message}"
    assert "['completion', 'prompt']" in message, f"must show the row's keys: {message}"
    for expected in ("'instruction'", "'output'", "'conversations'", "'messages'", "data.format"):
        assert expected in message, f"must list {expected} among the accepted keys / fixes: {message}"


# --- malformed rows (through load_dataset, so the error carries file:line) ---------------------------


def load_error(tmp_path, tokenizer, rows: list, fmt: str = "auto") -> tuple[str, Path]:
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_dataset(path, tokenizer, fmt)
    return str(info.value), path


def test_missing_output(tmp_path, tiny_tokenizer):
    message, path = load_error(tmp_path, tiny_tokenizer, [{"instruction": "q", "output": "a"}, {"instruction": "q2"}],
                               fmt="alpaca")
    assert f"{path}:2:" in message, f"the second row (line 2) lacks 'output': {message}"
    assert "'output'" in message and "['instruction']" in message, f"must name the missing key and the row's keys: {message}"


def test_output_that_is_a_number(tmp_path, tiny_tokenizer):
    message, path = load_error(tmp_path, tiny_tokenizer, [{"instruction": "q", "output": 42}])
    assert f"{path}:1:" in message, f"must name file:line: {message}"
    assert "'output' must be a string" in message and "int 42" in message, f"must name the key, type and value: {message}"


def test_history_entry_that_is_not_a_pair(tmp_path, tiny_tokenizer):
    message, path = load_error(tmp_path, tiny_tokenizer, [{"instruction": "q", "output": "a", "history": [["only one"]]}])
    assert f"{path}:1:" in message, f"must name file:line: {message}"
    assert "[user, assistant] pair" in message and "['only one']" in message, f"must show the bad entry: {message}"


def test_unknown_sharegpt_from(tmp_path, tiny_tokenizer):
    rows = [{"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}]
    message, path = load_error(tmp_path, tiny_tokenizer, rows)
    assert f"{path}:1:" in message, f"must name file:line: {message}"
    assert "conversations[1]" in message and "'bot'" in message, f"must name the turn and the bad 'from': {message}"
    assert "human" in message and "gpt" in message, f"must list accepted 'from' values: {message}"


def test_sharegpt_turn_missing_value(tmp_path, tiny_tokenizer):
    rows = [{"conversations": [{"from": "human", "text": "q"}, {"from": "gpt", "value": "a"}]}]
    message, _ = load_error(tmp_path, tiny_tokenizer, rows)
    assert "conversations[0]" in message and "'value'" in message, f"must name the turn and the missing key: {message}"


def test_unknown_messages_role(tmp_path, tiny_tokenizer):
    rows = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "x"},
                      {"role": "assistant", "content": "a"}]},
    ]
    message, path = load_error(tmp_path, tiny_tokenizer, rows)
    assert f"{path}:2:" in message, f"the bad row is on line 2: {message}"
    assert "messages[1]" in message and "'tool'" in message, f"must name the turn and the bad role: {message}"
    assert "system, user or assistant" in message, f"must list the accepted roles: {message}"


def test_message_content_that_is_not_a_string(tmp_path, tiny_tokenizer):
    rows = [{"messages": [{"role": "user", "content": ["q"]}, {"role": "assistant", "content": "a"}]}]
    message, _ = load_error(tmp_path, tiny_tokenizer, rows)
    assert "messages[0].content must be a string" in message and "list" in message, f"must name key and type: {message}"


def test_conversation_not_ending_with_assistant(tmp_path, tiny_tokenizer):
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                          {"role": "user", "content": "q2"}]}]
    message, path = load_error(tmp_path, tiny_tokenizer, rows)
    assert f"{path}:1:" in message, f"must name file:line: {message}"
    assert "must end with an assistant turn" in message and "'user'" in message, f"must say how it ends: {message}"


def test_conversation_without_assistant(tmp_path, tiny_tokenizer):
    rows = [{"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}]}]
    message, _ = load_error(tmp_path, tiny_tokenizer, rows)
    assert "no assistant turn" in message, f"must say there is nothing to learn: {message}"


@pytest.mark.parametrize("value", [[], "text", None])
def test_messages_that_are_not_a_nonempty_list(tmp_path, tiny_tokenizer, value):
    message, path = load_error(tmp_path, tiny_tokenizer, [{"messages": value}])
    assert f"{path}:1:" in message and "'messages' must be a non-empty list" in message, f"got: {message}"


def test_later_row_in_another_format(tmp_path, tiny_tokenizer):
    # Detection looks at row 1 (Alpaca); row 3 is ShareGPT and must fail with its own line.
    rows = [{"instruction": "q", "output": "a"}, {"instruction": "q", "output": "a"},
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]
    message, path = load_error(tmp_path, tiny_tokenizer, rows)
    assert f"{path}:3:" in message and "'instruction'" in message, f"row 3 lacks Alpaca's keys: {message}"
