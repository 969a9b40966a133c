"""Read JSON (an array of objects) and JSONL (one object per line) files, remembering line numbers.

Each row comes back with its 1-based line number so that every later error can say `file:line`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimtune.errors import DataError


@dataclass(frozen=True)
class Row:
    """One raw example and where it came from."""

    data: dict[str, Any]
    source: str  # "path:line"


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _read_json_array(path: Path, text: str) -> list[Row]:
    # Walk the array element by element so each row keeps the line it starts on.
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if not text.startswith("[", pos):
        raise DataError(f"{path}:{_line_of(text, pos)}: a .json dataset must be an array of objects `[{{...}}, ...]`; for one object per line use .jsonl")
    pos += 1
    rows: list[Row] = []
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            raise DataError(f"{path}:{_line_of(text, pos)}: the array is not closed with ']'")
        if text[pos] == "]":
            return rows
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
        line = _line_of(text, pos)
        if not isinstance(value, dict):
            raise DataError(f"{path}:{line}: each example must be a JSON object, got {type(value).__name__}")
        rows.append(Row(value, f"{path}:{line}"))
        pos = end


def read_rows(path: str | Path) -> list[Row]:
    """All rows of a `.json` or `.jsonl` file. Errors name the file, the line and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file '{path}' does not exist: check data.train / data.eval in your config")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate a byte-order mark
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); save the file as UTF-8") from None
    if not text.strip():
        raise DataError(f"data file '{path}' is empty: it needs at least one example")
    stripped = text.lstrip()
    if path.suffix == ".json" or (path.suffix != ".jsonl" and stripped.startswith("[")):
        rows = _read_json_array(path, text)
    else:
        rows = []
        # Split on "\n" only: str.splitlines() also breaks at U+2028/U+2029/U+0085, which JSON strings may
        # hold unescaped (json.dumps(..., ensure_ascii=False) writes them raw).
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: invalid JSON: {exc.msg} (column {exc.colno})") from None
            if not isinstance(value, dict):
                raise DataError(f"{path}:{number}: each line must be a JSON object, got {type(value).__name__}")
            rows.append(Row(value, f"{path}:{number}"))
    if not rows:
        raise DataError(f"data file '{path}' holds no examples")
    return rows
