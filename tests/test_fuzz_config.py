"""Property-based fuzzing of the config boundary (Hypothesis): whatever keys and values a config file or
the command line holds, the result is a valid `Config` or a `ConfigError` listing one problem per line;
never another exception, and never a file written (the check stage touches nothing; a run writes only
inside its `output`).

Targets, fastest first: `build_config` on arbitrary values at arbitrary keys; `key=value` overrides as a
user types them; the whole check stage on the tiny model; whole `slimtune train` runs.
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from fuzzing import fuzz_settings
from slimtune.config import Config, _valid_keys, build_config, load_config
from slimtune.errors import ConfigError, SlimtuneError
from test_cli import TRAIN_ROWS, run_cli, write_jsonl

LEAF_KEYS = sorted(k for k in _valid_keys(Config) if not any(other.startswith(k + ".") for other in _valid_keys(Config)))
SECTIONS = sorted({k.split(".")[0] for k in LEAF_KEYS if "." in k})

# Values a YAML file can hold, the awkward ones over-represented.
scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.sampled_from([0, -1, 1, 2**31, 2**32, 2**63, 2**64, -2**63 - 1, 10**30]),
    st.floats(), st.sampled_from([float("inf"), float("-inf"), float("nan"), 1e-300, 1e300, -0.0]),
    st.text(max_size=12), st.sampled_from(["", "~", "~/x", "a\0b", "\ud800", "..", "/", "auto", "nf4", "lora",
                                           "all-linear", "0-3,10", "-100", "[", "(?!", "a" * 300]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)
keys = st.one_of(st.sampled_from(LEAF_KEYS), st.sampled_from(SECTIONS),
                 st.builds(lambda s, k: f"{s}.{k}", st.sampled_from(SECTIONS), st.text(string.ascii_lowercase + "_", max_size=8)),
                 st.text(max_size=8))


def _set(tree: dict, dotted: str, value) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def _assert_config_error(error: ConfigError) -> None:
    lines = str(error).splitlines()
    assert lines, "an error has a message"
    if len(lines) > 1:  # a summary, then one line per problem
        assert "problem(s)" in lines[0] and all(line.startswith("  - ") for line in lines[1:]), lines
        assert lines[0].split(" has ")[-1].startswith(f"{len(lines) - 1} problem"), lines
    str(error).encode("utf-8", "backslashreplace")


@fuzz_settings(400)
@given(st.dictionaries(keys, values, max_size=4))
def test_build_config_is_valid_or_a_config_error(changes):
    data: dict = {"data": {"train": "train.jsonl"}}
    for key, value in changes.items():
        _set(data, key, value)
    try:
        cfg = build_config(data)
    except ConfigError as error:
        _assert_config_error(error)
        return
    # A valid config's saved form (config.yaml of a run) reads back as the same config.
    assert build_config(cfg.to_yaml_dict()).to_yaml_dict() == cfg.to_yaml_dict()


override_text = st.one_of(st.text(max_size=16), st.sampled_from(
    ["[q_proj", "{a: 1}", ".inf", ".nan", "1e-4", "yes", "~", "null", "!!python/object:os.system x", "2**64",
     "99999999999999999999999", "-1", "'", "\"\\ud800\"", "&a [*a]"]))


@fuzz_settings(300)
@given(st.lists(st.tuples(keys, override_text), max_size=4), st.sampled_from(["", "=", "KEY"]))
def test_overrides_as_typed_are_valid_or_a_config_error(tmp_path_factory, overrides, shape):
    config = tmp_path_factory.getbasetemp() / "fuzz-overrides.yaml"
    config.write_text("data:\n  train: train.jsonl\n", encoding="utf-8")
    items = [f"{k}={v}" for k, v in overrides] + ([{"": "", "=": "=1", "KEY": "train.lr"}[shape]] if shape else [])
    try:
        load_config(config, items)
    except ConfigError as error:
        _assert_config_error(error)


def _files(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


# Values that make sense for a few keys, so that the check stage gets past validation often.
plausible = st.one_of(
    st.tuples(st.just("method"), st.sampled_from(["lora", "qlora", "dora", "adalora", "freeze", "full"])),
    st.tuples(st.just("lora.r"), st.integers(-1, 5000)),
    st.tuples(st.just("lora.targets"), st.sampled_from(["all-linear", ["q_proj"], ["q_prj"], [], "", "zz.*", "(", ["lm_head"]])),
    st.tuples(st.just("freeze.layers"), st.sampled_from(["0", "-1", "-3", "1-0", "0-99", "5"])),
    st.tuples(st.just("adalora.init_r"), st.integers(0, 40)),
    st.tuples(st.just("adalora.tinit"), st.integers(0, 5)),
    st.tuples(st.just("train.max_steps"), st.integers(0, 3)),
    st.tuples(st.just("train.batch_size"), st.integers(1, 10**6)),
    st.tuples(st.just("data.max_length"), st.integers(1, 10**9)),
    st.tuples(st.just("data.format"), st.sampled_from(["auto", "alpaca", "sharegpt", "messages"])),
    st.tuples(st.just("train.device"), st.sampled_from(["auto", "cpu", "cuda"])),
    st.tuples(st.just("quantize"), st.sampled_from(["none", "nf4"])),
    st.tuples(st.just("resume"), st.booleans()), st.tuples(st.just("overwrite"), st.booleans()),
    st.tuples(st.just("train.report_to"), st.sampled_from([[], ["wandb"], ["tensorboard"]])),
    st.tuples(st.sampled_from(LEAF_KEYS), values),
)


@fuzz_settings(100)
@given(st.lists(plausible, max_size=4))
def test_check_stage_touches_nothing(tmp_path_factory, tiny_model_dir, changes):
    from slimtune.stages import check_run

    root = tmp_path_factory.mktemp("fuzz-check")
    data: dict = {"model": str(tiny_model_dir), "output": str(root / "run"),
                  "data": {"train": str(write_jsonl(root / "train.jsonl", TRAIN_ROWS))}}
    for key, value in changes:
        _set(data, key, value)
    before = _files(root)
    cwd = os.getcwd()
    os.chdir(root)  # a relative path anywhere in the config lands here, where it is watched
    try:
        check_run(build_config(data), Console(quiet=True))
    except ConfigError as error:
        _assert_config_error(error)
    except SlimtuneError:
        pass
    finally:
        os.chdir(cwd)
    assert _files(root) == before, "the check stage must not create or change any file"


run_changes = st.lists(st.one_of(
    st.tuples(st.just("method"), st.sampled_from(["lora", "dora", "adalora", "freeze", "full", "qlora"])),
    st.tuples(st.just("lora.r"), st.integers(1, 40)),
    st.tuples(st.just("train.packing"), st.booleans()),
    st.tuples(st.just("train.grad_accum"), st.integers(1, 3)),
    st.tuples(st.just("train.save_every"), st.sampled_from([None, 1])),
    st.tuples(st.just("output"), st.sampled_from(["run", "./run/", "run/nested/deeper", "~/never-written"])),
    st.tuples(st.just("train.on_nan"), st.sampled_from(["stop", "skip"])),
    st.tuples(st.just("train.lr"), st.sampled_from([1e-4, 1e3, 1e30])),
), max_size=3)


@fuzz_settings(4)
@given(run_changes)
def test_train_runs_write_only_inside_output(tmp_path_factory, tiny_model_dir, capsys, changes):
    import pytest

    root = tmp_path_factory.mktemp("fuzz-run")
    config: dict = {"model": str(tiny_model_dir), "output": "run", "lora": {"targets": ["q_proj"]},
                    "data": {"train": str(write_jsonl(root / "train.jsonl", TRAIN_ROWS)), "max_length": 48},
                    "train": {"max_steps": 1, "batch_size": 2, "precision": "fp32"}}
    for key, value in changes:
        _set(config, key, value)
    if config.get("method") not in (None, "lora", "dora", "qlora"):
        config.pop("lora")
    (root / "config.yaml").write_text(json.dumps(config), encoding="utf-8")
    before = _files(root)
    home = root / "home"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("HOME", str(home))  # '~' in an output lands here, inside the watched tree
        code, _, err = run_cli(patch, capsys, "train", root / "config.yaml")
    assert code in (0, 2) and "Traceback" not in err, err[-2000:]
    output = home / config["output"][2:] if config["output"].startswith("~/") else root / config["output"]
    # Libraries' own caches in the home directory (matplotlib's font list) are not the run's files.
    new = {path for path in set(_files(root)) - set(before) if not path.startswith("home/.")}
    outside = sorted(p for p in new if not (root / p).resolve().is_relative_to(output.resolve()))
    assert not outside, f"files written outside output {output}: {outside}"


def test_found_by_fuzzing_a_one_step_adalora_run(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """AdaLoRA's budget phase ended at step 1 with no scores yet: a KeyError at the final masking."""
    config = {"model": str(tiny_model_dir), "output": str(tmp_path / "run"), "method": "adalora",
              "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", TRAIN_ROWS)), "max_length": 48},
              "lora": {"targets": ["q_proj"]}, "train": {"max_steps": 1, "batch_size": 2, "precision": "fp32"}}
    (tmp_path / "config.yaml").write_text(json.dumps(config), encoding="utf-8")
    code, _, err = run_cli(monkeypatch, capsys, "train", tmp_path / "config.yaml")
    assert code == 0, err[-2000:]
