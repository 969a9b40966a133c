"""Config loading: defaults, YAML-typed overrides that win over the file, and errors that say how to fix.

Expected values are the documented defaults and hand-written YAML; every error check names the key and
the bad value the message must contain.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from slimtune.config import build_config, load_config, parse_overrides
from slimtune.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_defaults_fill_everything_but_data_train(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", "data:\n  train: t.jsonl\n"))
    assert cfg.data.train == Path("t.jsonl"), "data.train comes from the file"
    assert (cfg.model, cfg.method, cfg.output, cfg.overwrite) == ("smollm2-135m", "lora", Path("runs/run"), False), \
        "top-level defaults: the bundled model, LoRA, runs/run, no overwrite"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets) == (16, 32.0, 0.05, "all-linear"), \
        "LoRA defaults: r=16, alpha=32, dropout=0.05 on every linear layer"
    assert (cfg.data.eval, cfg.data.format, cfg.data.max_length) == (None, "auto", 1024), \
        "data defaults: no eval set, format detection, 1024 tokens"
    t = cfg.train
    assert (t.epochs, t.max_steps, t.batch_size, t.grad_accum, t.lr, t.schedule, t.seed) == \
        (1, None, 4, 1, 2e-4, "cosine", 0), "train defaults: one epoch, batch 4, lr 2e-4, cosine"
    assert (cfg.eval.generations, cfg.eval.max_new_tokens) == (8, 64), "eval defaults: 8 generations of 64 tokens"


def test_empty_file_reports_missing_data_train(tmp_path):
    message = config_error(write(tmp_path / "c.yaml", "# nothing here\n"))
    assert "missing key 'data.train'" in message, f"must name the one required key: {message}"
    assert "data.train=VALUE" in message, f"the suggested override must be one that works: {message}"


def test_missing_data_train_in_data_section(tmp_path):
    message = config_error(write(tmp_path / "c.yaml", "data:\n  eval: e.jsonl\n"))
    assert "1 problem(s)" in message and "missing key 'data.train'" in message, f"must name data.train: {message}"


def test_overrides_win_and_are_yaml_typed(tmp_path):
    path = write(tmp_path / "c.yaml", (
        "model: base-a\n"
        "data:\n  train: t.jsonl\n  eval: e.jsonl\n"
        "lora:\n  r: 8\n  targets: all-linear\n"
        "train:\n  lr: 1.0e-3\n  epochs: 2\n"
    ))
    cfg = load_config(path, ["train.lr=1e-4", "lora.targets=[q_proj,v_proj]", "lora.r=4", "overwrite=true",
                             "data.eval=null", "train.max_steps=3", "model=base-b"])
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 1e-4, "train.lr=1e-4 must override 1.0e-3 as a float"
    assert cfg.lora.targets == ["q_proj", "v_proj"], "a YAML flow list becomes a list of names"
    assert cfg.lora.r == 4 and isinstance(cfg.lora.r, int), "lora.r=4 must override 8 as an int"
    assert cfg.overwrite is True, "overwrite=true is a YAML boolean"
    assert cfg.data.eval is None, "data.eval=null must clear the file's eval set"
    assert cfg.train.max_steps == 3, "a key absent from the file can be set by override"
    assert cfg.model == "base-b", "a top-level override wins over the file"
    assert cfg.train.epochs == 2 and cfg.data.train == Path("t.jsonl"), "keys not overridden keep the file's value"


def test_parse_overrides_builds_nested_dict():
    assert parse_overrides(["a.b.c=1", "a.b.d=x y", "a.e=[1, 2]", "f="]) == \
        {"a": {"b": {"c": 1, "d": "x y"}, "e": [1, 2]}, "f": ""}, "dotted keys nest; values are YAML"


def test_override_value_that_is_not_yaml_is_kept_as_text():
    assert parse_overrides(["lora.targets=*proj"]) == {"lora": {"targets": "*proj"}}, \
        "'*proj' is no valid YAML (an alias); it must be passed through as a string"


@pytest.mark.parametrize("item", ["train.lr", "=5"])
def test_override_without_key_value(item):
    with pytest.raises(ConfigError) as info:
        parse_overrides([item])
    message = str(info.value)
    assert f"'{item}'" in message and "KEY=VALUE" in message and "train.lr=1e-4" in message, \
        f"must show the bad override and an example: {message}"


def test_unknown_nested_key_suggests_closest(tmp_path):
    message = config_error(write(tmp_path / "c.yaml", "data:\n  train: t.jsonl\n"), ["lora.rr=8"])
    assert "unknown key 'lora.rr'" in message and "did you mean 'lora.r'?" in message, f"must suggest lora.r: {message}"


def test_unknown_top_level_key_suggests_closest(tmp_path):
    message = config_error(write(tmp_path / "c.yaml", "data:\n  train: t.jsonl\ntrian:\n  lr: 0.1\n"))
    assert "unknown key 'trian'" in message and "did you mean 'train'?" in message, f"must suggest train: {message}"


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path):
    message = config_error(write(tmp_path / "c.yaml", "data:\n  train: t.jsonl\neval:\n  zzzzzz: 1\n"))
    assert "unknown key 'eval.zzzzzz'" in message, f"must name the key: {message}"
    for key in ("eval.generations", "eval.max_new_tokens", "eval.batch_size"):
        assert key in message, f"with no close match, must list the section's keys ({key}): {message}"


def test_wrong_type_names_key_and_value(tmp_path):
    message = config_error(write(tmp_path / "c.yaml", "data:\n  train: t.jsonl\n"), ["train.lr=fast"])
    assert "train.lr:" in message and "'fast'" in message, f"must name the key and the bad value: {message}"
    assert "number" in message, f"must say a number is expected: {message}"


def test_several_problems_reported_at_once(tmp_path):
    path = write(tmp_path / "c.yaml", (
        "data:\n  train: t.jsonl\n  format: csv\n"
        "lora:\n  rr: 8\n"
        "train:\n  lr: fast\n  batch_size: 0\n"
    ))
    message = config_error(path)
    assert message.startswith(f"{path} has 4 problem(s)"), f"all four problems must be counted in one error: {message}"
    for expected in ("data.format", "'csv'", "unknown key 'lora.rr'", "train.lr", "'fast'", "train.batch_size"):
        assert expected in message, f"the error must mention {expected}: {message}"


def test_empty_model_name(tmp_path):
    message = config_error(write(tmp_path / "c.yaml", "model: '  '\ndata:\n  train: t.jsonl\n"))
    assert "model: must name a model" in message, f"an empty model must be refused with a hint: {message}"


def test_malformed_yaml_reports_file_and_line(tmp_path):
    path = write(tmp_path / "c.yaml", "model: x\ndata:\n  train: a: b\n")
    message = config_error(path)
    assert message.startswith(f"{path}:3:"), f"the stray ': ' is on line 3: {message}"
    assert "not valid YAML" in message, f"must say the YAML is invalid: {message}"


def test_top_level_not_a_mapping(tmp_path):
    path = write(tmp_path / "c.yaml", "- model: x\n- data: y\n")
    message = config_error(path)
    assert str(path) in message and "must be a mapping" in message and "list" in message, \
        f"must say a mapping is expected and a list was found: {message}"


def test_missing_config_file(tmp_path):
    message = config_error(tmp_path / "missing.yaml")
    assert f"'{tmp_path / 'missing.yaml'}' does not exist" in message, f"must name the missing file: {message}"


def test_non_utf8_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"model: caf\xe9\ndata:\n  train: t.jsonl\n")  # Latin-1
    message = config_error(path)
    assert str(path) in message and "not UTF-8" in message, f"must be a ConfigError naming the file: {message}"


def test_build_config_accepts_its_own_yaml_dict(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", "data:\n  train: t.jsonl\n"), ["lora.targets=[q_proj]"])
    again = build_config(cfg.to_yaml_dict())
    assert again == cfg, "the resolved config written to a run directory must load back unchanged"
    assert cfg.to_yaml_dict()["data"]["train"] == "t.jsonl", "paths are written as plain strings"


def test_method_keys_for_dora_freeze_and_patterns():
    cfg = build_config({"data": {"train": "t.jsonl"}, "method": "dora",
                        "lora": {"rslora": True, "rank_pattern": {"v_proj": 8}, "alpha_pattern": {"q_proj": 4}}})
    assert cfg.uses_dora and cfg.lora.rslora, "method: dora must imply DoRA; lora.rslora must be read"
    assert cfg.lora.rank_pattern == {"v_proj": 8} and cfg.lora.alpha_pattern == {"q_proj": 4.0}, "patterns must be kept"
    assert build_config({"data": {"train": "t.jsonl"}, "lora": {"use_dora": True}}).uses_dora, "lora.use_dora must imply DoRA"
    freeze = build_config({"data": {"train": "t.jsonl"}, "method": "freeze",
                           "freeze": {"layers": "0-3, 10", "patterns": ["mlp"], "train_lm_head": True}})
    assert freeze.freeze.layers == "0-3, 10" and freeze.freeze.train_lm_head, "freeze keys must be read"


def test_bad_freeze_and_lora_keys_are_reported_together():
    with pytest.raises(ConfigError) as info:
        build_config({"data": {"train": "t.jsonl"}, "method": "freeze", "freeze": {"layers": "a-b"},
                      "lora": {"rank_pattern": {"(": 2}}})
    message = str(info.value)
    assert "freeze.layers: must list layer indices and ranges like '0-3,10'" in message, message
    assert "lora.rank_pattern: key '(' is not a valid regex" in message, message
    with pytest.raises(ConfigError, match="unknown method 'ia3': choose one of lora, qlora, dora, adalora, freeze, full"):
        build_config({"data": {"train": "t.jsonl"}, "method": "ia3"})


@pytest.mark.parametrize("name, method", [("extract.yaml", "lora"), ("extract_dora.yaml", "dora"),
                                          ("extract_freeze.yaml", "freeze"), ("extract_full.yaml", "full"),
                                          ("extract_adalora.yaml", "adalora")])
def test_example_configs_load_with_their_method(name, method):
    path = Path(__file__).resolve().parent.parent / "examples" / name
    cfg = load_config(path)
    assert cfg.method == method, f"{name} must use method {method}, got {cfg.method}"
    assert cfg.train.max_steps is not None and cfg.train.max_steps <= 40, f"{name}: keep the demo short"
