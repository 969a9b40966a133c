"""Reading JSON / JSONL dataset files: rows keep their 1-based line, and every error names `file:line`.

Expected line numbers are counted by hand from the file text written in each test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimtune.data import read_rows
from slimtune.errors import DataError


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_rows_keep_their_line_numbers_across_blank_lines(tmp_path):
    path = write(tmp_path / "train.jsonl", '{"a": 1}\n\n{"a": 2}\n   \n{"a": 3}\n')
    rows = read_rows(path)
    assert [row.data for row in rows] == [{"a": 1}, {"a": 2}, {"a": 3}], "blank lines must be skipped, rows kept in order"
    assert [row.source for row in rows] == [f"{path}:1", f"{path}:3", f"{path}:5"], \
        "each row's source must be file:line of the line it was read from"


def test_jsonl_broken_line_reports_its_line(tmp_path):
    # Line 1 fine, line 2 blank, line 3 broken, line 4 fine.
    path = write(tmp_path / "train.jsonl",
                 '{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": }\n{"instruction": "d", "output": "e"}\n')
    with pytest.raises(DataError) as info:
        read_rows(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: invalid JSON"), f"the broken line is line 3 of the file: {message}"


def test_jsonl_crlf_line_endings_are_read(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"a": 1}\r\n{"a": 2}\r\n')
    rows = read_rows(path)
    assert [row.data for row in rows] == [{"a": 1}, {"a": 2}], "Windows line endings must not break JSONL rows"
    assert rows[1].source == f"{path}:2", "the second CRLF-terminated line is line 2"


def test_jsonl_row_with_raw_line_separator_character_is_one_row(tmp_path):
    # json.dumps(ensure_ascii=False) writes U+2028 / U+2029 / U+0085 unescaped; they are not line breaks in JSONL.
    rows_in = [{"instruction": "a\u2028b\u2029c\x85d", "output": "x"}, {"instruction": "e", "output": "y"}]
    path = write(tmp_path / "train.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows_in))
    assert "\u2028" in path.read_text(encoding="utf-8"), "the test file must hold the raw separator character"
    rows = read_rows(path)
    assert [row.data for row in rows] == rows_in, "rows with raw U+2028/U+2029/U+0085 must round-trip unchanged"
    assert rows[1].source == f"{path}:2", "the separator characters must not shift line numbers"


def test_utf8_file_with_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"a": 1}\n')
    assert [row.data for row in read_rows(path)] == [{"a": 1}], "a UTF-8 BOM (as Notepad writes it) must be ignored"


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = write(tmp_path / "train.jsonl", '{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError) as info:
        read_rows(path)
    message = str(info.value)
    assert f"{path}:2:" in message, f"the array row is on line 2: {message}"
    assert "must be a JSON object" in message and "list" in message, f"must say an object was expected, got a list: {message}"


def test_json_array_rows_keep_the_line_each_element_starts_on(tmp_path):
    text = '[\n  {"a": 1},\n\n  {"a": 2,\n   "b": 3},\n  {"a": 4}\n]\n'
    path = write(tmp_path / "train.json", text)
    rows = read_rows(path)
    assert [row.data for row in rows] == [{"a": 1}, {"a": 2, "b": 3}, {"a": 4}], "all array elements, in order"
    assert [row.source for row in rows] == [f"{path}:2", f"{path}:4", f"{path}:6"], \
        "each element's source is the line its '{' is on"


def test_json_array_with_bad_element_reports_its_line(tmp_path):
    text = '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"},\n  {"instruction": "e", "output": "f"}\n]\n'
    path = write(tmp_path / "train.json", text)
    with pytest.raises(DataError) as info:
        read_rows(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: invalid JSON"), f"the missing comma is on line 3: {message}"


def test_json_array_element_that_is_not_an_object(tmp_path):
    path = write(tmp_path / "train.json", '[\n  {"a": 1},\n\n  "just text"\n]\n')
    with pytest.raises(DataError) as info:
        read_rows(path)
    message = str(info.value)
    assert f"{path}:4:" in message, f"the string element is on line 4: {message}"
    assert "must be a JSON object" in message and "str" in message, f"must name what it got (str): {message}"


def test_json_file_that_is_not_an_array(tmp_path):
    path = write(tmp_path / "train.json", '\n{"a": 1}\n')
    with pytest.raises(DataError) as info:
        read_rows(path)
    message = str(info.value)
    assert f"{path}:2:" in message, f"the object starts on line 2: {message}"
    assert "array" in message and ".jsonl" in message, f"must say an array is expected or to use .jsonl: {message}"


def test_json_array_not_closed(tmp_path):
    path = write(tmp_path / "train.json", '[\n  {"a": 1},\n')
    with pytest.raises(DataError, match=r"not closed with '\]'") as info:
        read_rows(path)
    assert str(path) in str(info.value), "the error must name the file"


def test_empty_file(tmp_path):
    path = write(tmp_path / "train.jsonl", "\n  \n")
    with pytest.raises(DataError) as info:
        read_rows(path)
    message = str(info.value)
    assert str(path) in message and "empty" in message, f"must name the file and say it is empty: {message}"


def test_empty_json_array(tmp_path):
    path = write(tmp_path / "train.json", "[]\n")
    with pytest.raises(DataError) as info:
        read_rows(path)
    message = str(info.value)
    assert str(path) in message and "no examples" in message, f"must say the file holds no examples: {message}"


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as info:
        read_rows(path)
    message = str(info.value)
    assert f"'{path}'" in message and "does not exist" in message, f"must name the missing file: {message}"
    assert "data.train" in message, f"must point at the config key to fix: {message}"


def test_non_utf8_file_names_the_byte(tmp_path):
    raw = '{"instruction": "caf'.encode() + b"\xe9" + b'", "output": "x"}\n'  # Latin-1 e-acute
    path = tmp_path / "train.jsonl"
    path.write_bytes(raw)
    with pytest.raises(DataError) as info:
        read_rows(path)
    message = str(info.value)
    assert str(path) in message and "not UTF-8" in message, f"must name the file and the encoding problem: {message}"
    offset = raw.index(b"\xe9")  # 20
    assert f"byte {offset}" in message, f"must name the offset of the bad byte ({offset}): {message}"
