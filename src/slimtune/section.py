"""The base of every config section: unknown keys are errors, assignments are validated.

Its own module so that each method can define its config section beside its code (`methods/*.py`)
without importing `config.py`, which imports them."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
