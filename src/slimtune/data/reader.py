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


class _LineCounter:
    """Line numbers of increasing offsets in one text, counting each newline once: O(len(text)) for a
    whole file, where counting from the start for every row would be quadratic."""

    def __init__(self, text: str) -> None:
        self.text, self.offset, self.line = text, 0, 1

    def line_of(self, offset: int) -> int:
        if offset < self.offset:  # never happens for a forward walk; correct anyway
            self.offset, self.line = 0, 1
        self.line += self.text.count("\n", self.offset, offset)
        self.offset = offset
        return self.line


def _decode(path: Path, line: int, decode, first_line: int):
    """`decode()` with its failures as `file:line` errors; `line` is the row's, `first_line` the line of the
    decoded text's first character (JSON errors count lines from there)."""
    try:
        return decode()
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{first_line + exc.lineno - 1}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise DataError(f"{path}:{line}: the JSON nests too deeply to read; flatten this example") from None


def _read_json_array(path: Path, text: str) -> list[Row]:
    # Walk the array element by element so each row keeps the line it starts on.
    decoder = json.JSONDecoder()
    lines = _LineCounter(text)
    pos = len(text) - len(text.lstrip())
    if not text.startswith("[", pos):
        raise DataError(f"{path}:{lines.line_of(pos)}: a .json dataset must be an array of objects `[{{...}}, ...]`; for one object per line use .jsonl")
    pos += 1
    rows: list[Row] = []
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            raise DataError(f"{path}:{lines.line_of(pos)}: the array is not closed with ']'")
        if text[pos] == "]":
            return rows
        line = lines.line_of(pos)
        # raw_decode reports lines within the whole text, so they count from line 1.
        value, end = _decode(path, line, lambda: decoder.raw_decode(text, pos), first_line=1)
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
    except OSError as exc:
        raise DataError(f"cannot read data file '{path}' ({exc.strerror}): check its permissions") from None
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
            value = _decode(path, number, lambda: json.loads(line), first_line=number)
            if not isinstance(value, dict):
                raise DataError(f"{path}:{number}: each line must be a JSON object, got {type(value).__name__}")
            rows.append(Row(value, f"{path}:{number}"))
    if not rows:
        raise DataError(f"data file '{path}' holds no examples")
    return rows
