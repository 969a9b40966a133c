"""Property-based fuzzing of the data reader (Hypothesis): any JSON value as a row, any field of any
format replaced by any JSON value, and arbitrary bytes as a file give a dataset or a one-line
`DataError` that names `file:line` (or the file); never another exception."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from fuzzing import fuzz_settings
from slimtune.data import load_dataset, read_rows
from slimtune.errors import DataError

# JSON values with the awkward strings over-represented (lone surrogates, control and line-separator
# characters, role names); json.dumps writes a lone surrogate as its escape, as other tools do.
texts = st.one_of(st.text(max_size=8), st.sampled_from(["\ud800", "\udfff", "a\u2028b", "\x00", "\r", "user",
                                                        "assistant", "system", "gpt", "human", ""]))
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), texts),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(texts, inner, max_size=3)), max_leaves=8)

TEMPLATES = {
    "alpaca": {"instruction": "a", "input": "i", "output": "b", "system": "s", "history": [["u", "v"]]},
    "sharegpt": {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
    "messages": {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
}


def _paths(value, prefix=()):
    """Every path into a JSON value (keys and list indices)."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


def _replace(value, path, new):
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replace(value[path[0]], path[1:], new)
    return copy


@st.composite
def rows(draw):
    kind = draw(st.sampled_from(["template", "template", "any"]))
    if kind == "any":
        return draw(json_values), draw(st.sampled_from(["auto", "alpaca", "sharegpt", "messages"]))
    fmt = draw(st.sampled_from(sorted(TEMPLATES)))
    row = TEMPLATES[fmt]
    for _ in range(draw(st.integers(1, 2))):
        path = draw(st.sampled_from(list(_paths(row))))
        row = _replace(row, path, draw(json_values))
    return row, draw(st.sampled_from(["auto", fmt]))


def _assert_data_error(error: DataError, path) -> None:
    message = str(error)
    assert str(path) in message, f"the message names the file: {message}"
    assert len(message.splitlines()) == 1, f"one line: {message!r}"
    message.encode("utf-8")  # printable as it is


@fuzz_settings(300)
@given(rows(), st.sampled_from([".jsonl", ".json"]))
def test_any_row_is_read_or_a_file_line_error(tmp_path_factory, tiny_tokenizer, row_and_format, suffix):
    row, fmt = row_and_format
    path = tmp_path_factory.getbasetemp() / f"fuzz-rows{suffix}"
    good = TEMPLATES["alpaca"] if fmt in ("auto", "alpaca") else TEMPLATES[fmt]
    text = json.dumps(good) + "\n" + json.dumps(row) + "\n"
    path.write_text(text if suffix == ".jsonl" else "[\n" + text.replace("\n", ",\n", 1) + "]\n", encoding="utf-8")
    try:
        load_dataset(path, tiny_tokenizer, fmt, 64)
    except DataError as error:
        _assert_data_error(error, path)
        fuzzed_line = 2 if suffix == ".jsonl" else 3  # the good row comes first (.json: after the '[' line)
        assert str(error).startswith((f"{path}:{fuzzed_line}:", f"'{path}'")), str(error)


@fuzz_settings(200)
@given(st.binary(max_size=200), st.sampled_from([".jsonl", ".json", ".txt"]))
def test_any_bytes_are_read_or_a_data_error(tmp_path_factory, content, suffix):
    path = tmp_path_factory.getbasetemp() / f"fuzz-bytes{suffix}"
    path.write_bytes(content)
    try:
        read_rows(path)
    except DataError as error:
        _assert_data_error(error, path)
