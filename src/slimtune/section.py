"""The base of every config section: unknown keys are errors, assignments are validated, and every
number and path is range-checked at this boundary.

Its own module so that each method can define its config section beside its code (`methods/*.py`)
without importing `config.py`, which imports them.

Checks every field of every section gets (a field's own bounds come on top):
- numbers are finite (no .inf / .nan: they would train into NaN or write `Infinity` into JSON files);
- integers fit in 64 bits (torch and NumPy take no larger ones);
- `true`/`false` is not a number (YAML's `max_steps: yes` would otherwise be 1);
- paths are not empty (`''` would be the working directory), hold no NUL byte, and `~` means the home
  directory, as in a shell.
"""

from __future__ import annotations

import math
import os
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

INT64_MAX = 2**63 - 1


def _annotation_types(annotation: Any) -> set[Any]:
    """Every type an annotation admits (`int | None` -> {int, NoneType}; `dict[str, float]` -> {dict, str, float})."""
    args = typing.get_args(annotation)
    if not args:
        return {annotation}
    found = {typing.get_origin(annotation)}
    for arg in args:
        found |= _annotation_types(arg)
    return found


def _numbers(value: Any) -> typing.Iterator[int | float]:
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _numbers(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _numbers(item)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _plain_input(cls, value: Any, info: ValidationInfo) -> Any:
        types = _annotation_types(cls.model_fields[info.field_name].annotation)
        if isinstance(value, bool) and bool not in types and (int in types or float in types):
            raise ValueError(f"must be a number, not {str(value).lower()}")
        if Path in types and isinstance(value, str):
            if not value.strip():
                raise ValueError("must be a path, not an empty string")
            if "\0" in value:
                raise ValueError("a path cannot hold a NUL byte")
            return os.path.expanduser(value)
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _numbers_in_range(cls, value: Any) -> Any:
        for number in _numbers(value):
            if isinstance(number, float) and not math.isfinite(number):
                raise ValueError(f"must be a finite number, not {number}")
            if isinstance(number, int) and abs(number) > INT64_MAX:
                raise ValueError("is too large: integers must lie within +-(2**63 - 1)")
        return value
