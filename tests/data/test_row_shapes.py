"""Every wrong row shape in every field is `file:line: what is wrong`, and reading is linear in file size.

Each bad row sits on line 3 of a file after two good rows, so the line number in the message is
checked, not just the presence of one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from slimtune.data import load_dataset, read_rows
from slimtune.data.reader import _LineCounter
from slimtune.errors import DataError

GOOD = {"alpaca": {"instruction": "a", "output": "b"},
        "sharegpt": {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
        "messages": {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}}
LONE = "\ud800"  # json.dumps writes it as the escape "\ud800", which json.loads turns back into a lone surrogate


def _sharegpt(**turn):
    return {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b", **turn}]}


def _messages(**turn):
    return {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", **turn}]}


# (id, format, bad row, fragments of the message after "file:3: ")
CASES = [
    ("alpaca-instruction-list", "alpaca", {"instruction": ["a"], "output": "b"}, ["'instruction' must be a string, got list"]),
    ("alpaca-instruction-missing", "alpaca", {"output": "b"}, ["needs 'instruction'"]),
    ("alpaca-output-object", "alpaca", {"instruction": "a", "output": {"x": 1}}, ["'output' must be a string, got dict"]),
    ("alpaca-output-null", "alpaca", {"instruction": "a", "output": None}, ["'output' must be a string, got NoneType"]),
    ("alpaca-input-number", "alpaca", {"instruction": "a", "input": 0, "output": "b"}, ["'input' must be a string, got int"]),
    ("alpaca-input-list", "alpaca", {"instruction": "a", "input": [], "output": "b"}, ["'input' must be a string, got list"]),
    ("alpaca-system-list", "alpaca", {"instruction": "a", "output": "b", "system": ["s"]}, ["'system' must be a string"]),
    ("alpaca-system-false", "alpaca", {"instruction": "a", "output": "b", "system": False}, ["'system' must be a string, got bool"]),
    ("alpaca-history-string", "alpaca", {"instruction": "a", "output": "b", "history": "x"}, ["'history' must be a list", "got str"]),
    ("alpaca-history-zero", "alpaca", {"instruction": "a", "output": "b", "history": 0}, ["'history' must be a list", "got int"]),
    ("alpaca-history-triple", "alpaca", {"instruction": "a", "output": "b", "history": [["u", "a", "x"]]}, ["[user, assistant] pair"]),
    ("alpaca-history-turn-number", "alpaca", {"instruction": "a", "output": "b", "history": [["u", 3]]}, ["history assistant turn must be a string"]),
    ("alpaca-lone-surrogate", "alpaca", {"instruction": "a" + LONE, "output": "b"}, ["'instruction' holds a lone surrogate", "'\\ud800'"]),
    ("alpaca-lone-surrogate-output", "alpaca", {"instruction": "a", "output": LONE}, ["'output' holds a lone surrogate"]),
    ("sharegpt-not-list", "sharegpt", {"conversations": {"from": "human"}}, ["'conversations' must be a non-empty list"]),
    ("sharegpt-empty", "sharegpt", {"conversations": []}, ["'conversations' must be a non-empty list"]),
    ("sharegpt-turn-string", "sharegpt", {"conversations": ["hi"]}, ["conversations[0] must be an object"]),
    ("sharegpt-from-list", "sharegpt", _sharegpt(**{"from": ["gpt"]}), ["conversations[1].from is list ['gpt']", "use one of"]),
    ("sharegpt-from-object", "sharegpt", _sharegpt(**{"from": {"a": 1}}), ["conversations[1].from is dict"]),
    ("sharegpt-from-unknown", "sharegpt", _sharegpt(**{"from": "bot"}), ["conversations[1].from is 'bot'", "human"]),
    ("sharegpt-value-number", "sharegpt", _sharegpt(value=1.5), ["conversations[1].value must be a string, got float"]),
    ("sharegpt-value-surrogate", "sharegpt", _sharegpt(value="x" + LONE), ["conversations[1].value holds a lone surrogate"]),
    ("messages-not-list", "messages", {"messages": "hi"}, ["'messages' must be a non-empty list"]),
    ("messages-turn-list", "messages", {"messages": [["user", "a"]]}, ["messages[0] must be an object"]),
    ("messages-role-list", "messages", _messages(role=["assistant"]), ["messages[1].role is list", "use one of system, user or assistant"]),
    ("messages-role-number", "messages", _messages(role=1), ["messages[1].role is int 1"]),
    ("messages-role-null", "messages", _messages(role=None), ["messages[1].role is NoneType None"]),
    ("messages-role-unknown", "messages", _messages(role="tool"), ["messages[1].role is 'tool'"]),
    ("messages-content-list", "messages", _messages(content=[1]), ["messages[1].content[0] is a int (1), not a part"]),
    ("messages-content-surrogate", "messages", _messages(content="\udfff"), ["messages[1].content holds a lone surrogate"]),
    ("messages-ends-with-user", "messages", {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},
     ["must end with an assistant turn"]),
    ("row-not-object", "messages", ["a", "b"], ["each line must be a JSON object, got list"]),
    ("deeply-nested", "messages", None, ["nests too deeply"]),
]


@pytest.mark.parametrize("fmt,row,fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_wrong_row_shape_is_a_file_line_error(tmp_path, tiny_tokenizer, fmt, row, fragments):
    bad = json.dumps(row) if row is not None else '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}"
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(GOOD[fmt]) + "\n" + json.dumps(GOOD[fmt]) + "\n" + bad + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_dataset(path, tiny_tokenizer, fmt)
    message = str(info.value)
    assert message.startswith(f"{path}:3: "), f"the message must start with file:line of the bad row: {message}"
    for fragment in fragments:
        assert fragment in message, f"missing {fragment!r} in: {message}"
    assert "\n" not in message, "one line"
    message.encode("utf-8")  # printable: a lone surrogate in the message would break writing it to stderr


def test_optional_fields_may_be_null(tmp_path, tiny_tokenizer):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"instruction": "a", "input": None, "system": None, "history": None, "output": "b"}) + "\n")
    assert len(load_dataset(path, tiny_tokenizer)) == 1


def test_json_array_line_numbers(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"instruction": "a",\n   "output": "b"},\n\n  {"instruction": "c", "output": "d"}, {"output": 1}\n]')
    assert [row.source for row in read_rows(path)] == [f"{path}:2", f"{path}:5", f"{path}:5"]
    text = "a\nb\n\nc\n"
    counter = _LineCounter(text)
    offsets = (0, 2, 4, 5, 6, 3, 5)
    assert [counter.line_of(i) for i in offsets] == [text.count("\n", 0, i) + 1 for i in offsets], \
        "the line of an offset is 1 + the newlines before it, also when asked out of order"


def test_reading_a_json_array_is_linear(tmp_path):
    """200k rows: the quadratic line lookup took tens of minutes (40k rows: 35 s); linear reading takes a
    few seconds. The bound is generous so that a loaded machine cannot fail it, a quadratic reader can."""
    rows = [{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(200_000)]
    path = tmp_path / "big.json"
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n", encoding="utf-8")
    started = time.perf_counter()
    read = read_rows(path)
    seconds = time.perf_counter() - started
    assert len(read) == 200_000 and read[-1].source == f"{path}:200001"
    assert seconds < 60, f"reading 200k rows took {seconds:.1f} s: the reader is not linear in the file size"
