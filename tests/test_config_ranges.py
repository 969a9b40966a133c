"""Every numeric and path setting is range-checked at the config boundary, the bad value named.

The field lists are walked, not hand-picked, so a field added later is covered too: every float refuses
inf and NaN, every integer refuses values past 64 bits and `true`, every path refuses '' and NUL and
expands '~'. The hand-picked cases are the ones an adversarial review found passing before.
"""

from __future__ import annotations

import math
import os
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from slimtune.config import Config, build_config
from slimtune.errors import ConfigError
from slimtune.methods.freeze import parse_layer_spec
from slimtune.errors import AdapterError

METHOD_OF_SECTION = {"lora": "lora", "adalora": "adalora", "freeze": "freeze"}


def _fields(model: type[BaseModel], prefix: str = ""):
    """(dotted key, annotation types) of every leaf field of the config."""
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _fields(annotation, f"{prefix}{name}.")
            continue
        types = {annotation, *typing.get_args(annotation)}
        for arg in typing.get_args(annotation):
            types |= set(typing.get_args(arg))
        yield f"{prefix}{name}", types


def _config(key: str, value) -> dict:
    data: dict = {"data": {"train": "train.jsonl"}}
    section = key.split(".")[0]
    if section in METHOD_OF_SECTION:
        data["method"] = METHOD_OF_SECTION[section]
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return data


def _problem(key: str, value) -> str:
    with pytest.raises(ConfigError) as info:
        build_config(_config(key, value))
    lines = str(info.value).splitlines()
    mine = [line for line in lines[1:] if line.startswith((f"  - {key}:", f"  - {key}."))]
    assert mine, f"{key}={value!r} must be reported on a line of its own naming the key: {lines}"
    return mine[0]


FLOATS = [key for key, types in _fields(Config) if float in types and "pattern" not in key]
INTS = [key for key, types in _fields(Config) if int in types and bool not in types and "pattern" not in key]
PATHS = [key for key, types in _fields(Config) if Path in types]


def test_the_walk_finds_the_settings():
    assert {"train.lr", "lora.alpha", "adalora.beta1", "train.mmap_threshold_mb"} <= set(FLOATS), FLOATS
    assert {"train.seed", "lora.r", "train.batch_size", "adalora.tinit", "data.max_length"} <= set(INTS), INTS
    assert set(PATHS) == {"output", "data.train", "data.eval"}, PATHS


@pytest.mark.parametrize("key", FLOATS)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
def test_floats_are_finite(key, value):
    line = _problem(key, value)
    assert str(value) in line, f"the bad value must be named: {line}"


@pytest.mark.parametrize("key", INTS)
def test_integers_fit_64_bits_and_are_not_booleans(key):
    assert str(2**64) in _problem(key, 2**64)
    assert "not true" in _problem(key, True)


@pytest.mark.parametrize("key", ["lora.rank_pattern", "lora.alpha_pattern"])
def test_pattern_values_are_finite_and_bounded(key):
    assert "nan" in _problem(key, {"q_proj": math.nan}) and "inf" in _problem(key, {"q_proj": math.inf})
    if key == "lora.rank_pattern":
        assert str(2**64) in _problem(key, {"q_proj": 2**64})


@pytest.mark.parametrize("key", PATHS)
def test_paths_are_real_paths_with_home_expanded(key):
    assert "empty string" in _problem(key, "")
    assert "NUL" in _problem(key, "a\0b")
    cfg = build_config(_config(key, "~/slimtune-x"))
    resolved = cfg
    for part in key.split("."):
        resolved = getattr(resolved, part)
    assert resolved == Path(os.path.expanduser("~")) / "slimtune-x", f"{key}: '~' must be the home directory"


def test_review_cases():
    assert "less than or equal to 4294967295" in _problem("train.seed", 2**32), "NumPy takes seeds up to 2**32-1"
    assert "greater than or equal to 0" in _problem("train.seed", -1)
    build_config(_config("train.seed", 2**32 - 1))  # the largest seed NumPy accepts
    assert "finite" in _problem("lora.alpha", math.inf)
    assert build_config(_config("model", "~/models/m")).model == os.path.expanduser("~/models/m")


def test_negative_layer_indices_do_not_wrap():
    assert parse_layer_spec("-2", 30) == {28} and parse_layer_spec("-30", 30) == {0}
    for spec in ("-100", "-31", "-100--1", "30"):
        with pytest.raises(AdapterError, match=f"freeze.layers '{spec}' is outside the model's layers 0-29"):
            parse_layer_spec(spec, 30)
    with pytest.raises(AdapterError, match="runs backwards"):
        parse_layer_spec("5-2", 30)


def test_problems_across_sections_are_one_line_each():
    data = _config("lora.r", 4)
    data.update(method="full", quantize="nf4")
    with pytest.raises(ConfigError) as info:
        build_config(data)
    lines = str(info.value).splitlines()
    assert lines[0] == "config has 2 problem(s):", lines
    assert lines[1].startswith("  - lora.r does not apply") and lines[2].startswith("  - quantize: nf4"), lines
