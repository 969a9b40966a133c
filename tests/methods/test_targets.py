"""Target specs ('all-linear', list of names, regex) on the tiny Llama, checked against PEFT's own matching."""

from __future__ import annotations

import copy

import pytest
from peft import LoraConfig, get_peft_model

from slimtune.errors import TargetError
from slimtune.methods.targets import linear_layers, resolve_targets

PROJ_KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_PREFIX = "base_model.model."


def hand_paths(layers: range, kinds: list[str]) -> set[str]:
    """Llama module paths written out by hand."""
    paths = set()
    for i in layers:
        for kind in kinds:
            block = "self_attn" if kind in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            paths.add(f"model.layers.{i}.{block}.{kind}")
    return paths


def peft_targets(model, target_modules) -> set[str]:
    """Module paths PEFT wraps for `target_modules` (on a copy; the input model is untouched)."""
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, lora_alpha=4, target_modules=target_modules))
    return {
        name[len(PEFT_PREFIX):]
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_A") and name.startswith(PEFT_PREFIX)
    }


def test_all_linear_is_every_projection_but_not_lm_head(tiny_model):
    chosen = resolve_targets(tiny_model, "all-linear")
    assert "lm_head" not in chosen, "all-linear must exclude the output head"
    assert set(chosen) == hand_paths(range(2), PROJ_KINDS), f"all-linear must be the 7 projections x 2 layers, got {chosen}"
    assert len(chosen) == len(set(chosen)) == 14, "no path may be listed twice"
    assert "lm_head" not in linear_layers(tiny_model), "linear_layers must leave out the output head"


def test_all_linear_matches_peft(tiny_model):
    ours = set(resolve_targets(tiny_model, "all-linear"))
    assert ours == peft_targets(tiny_model, "all-linear"), "all-linear must select exactly what PEFT's all-linear wraps"


def test_list_is_suffix_match(tiny_model):
    chosen = resolve_targets(tiny_model, ["q_proj", "mlp.up_proj", "layers.1.self_attn.o_proj"])
    expected = hand_paths(range(2), ["q_proj", "up_proj"]) | {"model.layers.1.self_attn.o_proj"}
    assert set(chosen) == expected, f"list entries must match a path equal to or ending in '.<entry>', got {chosen}"


def test_list_entry_matches_only_whole_components(tiny_model):
    # 'proj' is a suffix of 'q_proj' as a string, but not after a '.'
    with pytest.raises(TargetError, match="'proj'"):
        resolve_targets(tiny_model, ["proj"])


def test_regex_is_full_match(tiny_model):
    chosen = resolve_targets(tiny_model, r".*\.layers\.0\.self_attn\.(q|v)_proj")
    assert set(chosen) == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"}, (
        f"the regex must select exactly layer 0's q_proj and v_proj, got {chosen}"
    )
    # 'q_proj' as a regex would match via re.search but not via fullmatch
    with pytest.raises(TargetError, match="matches no linear layer"):
        resolve_targets(tiny_model, "q_pro")


@pytest.mark.parametrize(
    "spec",
    [
        ["q_proj", "mlp.down_proj", "layers.1.self_attn.o_proj"],
        ["k_proj", "v_proj"],
        r".*\.layers\.1\.(self_attn\.(q|k)_proj|mlp\.gate_proj)",
        # PEFT raises on a regex that also hits non-linear modules (mlp.act_fn); slimtune keeps the
        # linear ones, so the comparison uses a regex that hits linear layers only.
        r"model\.layers\.\d+\.mlp\.\w+_proj",
    ],
)
def test_same_modules_as_peft(tiny_model, spec):
    ours = set(resolve_targets(tiny_model, spec))
    theirs = peft_targets(tiny_model, spec)
    assert ours == theirs, f"slimtune and PEFT must target the same modules for {spec!r}: ours-only {ours - theirs}, PEFT-only {theirs - ours}"


def test_unknown_target_lists_real_names(tiny_model):
    with pytest.raises(TargetError) as info:
        resolve_targets(tiny_model, ["q_proj", "q_prj"])
    message = str(info.value)
    assert "'q_prj'" in message, f"the error must name the bad target: {message}"
    assert "matches no module" in message, f"the error must say the name matches nothing: {message}"
    for name in PROJ_KINDS:
        assert name in message, f"the error must list the model's real module name '{name}': {message}"
    assert "lm_head" not in message, f"the output head is not a valid target and must not be suggested: {message}"


def test_non_linear_module_is_rejected(tiny_model):
    with pytest.raises(TargetError, match=r"'input_layernorm' \(is not a linear layer\)"):
        resolve_targets(tiny_model, ["input_layernorm"])


def test_invalid_regex(tiny_model):
    with pytest.raises(TargetError, match=r"target regex '\(q_proj' is invalid"):
        resolve_targets(tiny_model, "(q_proj")


def test_empty_list(tiny_model):
    with pytest.raises(TargetError, match="empty"):
        resolve_targets(tiny_model, [])
