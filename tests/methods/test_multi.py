"""Several adapters on one base: switching, disabling, deleting and per-row selection.

The reference for each adapter is the same files loaded alone with `load_lora_adapter` (itself checked
against PEFT in tests/test_adapters.py) on a fresh copy of the base model.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import make_tiny_model
from slimtune.adapters import load_lora_adapter, save_lora_adapter
from slimtune.errors import AdapterError
from slimtune.methods.lora import attach_lora, lora_layers
from slimtune.methods.multi import AdapterSet, MultiAdapterLinear

ADAPTERS = {  # name: (targets, attach kwargs)
    "a": (["q_proj", "v_proj"], {}),
    "b": (["v_proj", "down_proj"], {"use_dora": True, "rslora": True}),
}


@pytest.fixture
def fresh(tiny_tokenizer):
    return lambda: make_tiny_model(len(tiny_tokenizer))


@pytest.fixture
def adapter_dirs(fresh, tmp_path):
    dirs = {}
    for seed, (name, (targets, kwargs)) in enumerate(ADAPTERS.items()):
        model = fresh()
        attach_lora(model, targets, r=4, alpha=8.0, **kwargs)
        gen = torch.Generator().manual_seed(10 + seed)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.3)
                if hasattr(layer, "lora_magnitude_vector"):
                    layer.lora_magnitude_vector.mul_(1.2)
        save_lora_adapter(model, tmp_path / name, base_model="tiny")
        dirs[name] = tmp_path / name
    return dirs


@pytest.fixture
def ids():
    return torch.randint(0, 200, (3, 9), generator=torch.Generator().manual_seed(5))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def reference(fresh, adapter_dir, ids):
    model = fresh()
    if adapter_dir is not None:
        load_lora_adapter(model, adapter_dir)
    return logits(model, ids)


def test_switch_disable_and_delete(fresh, adapter_dirs, ids):
    model = fresh()
    adapters = AdapterSet(model)
    for name, path in adapter_dirs.items():
        adapters.load(path, name)
    expected = {name: reference(fresh, path, ids) for name, path in adapter_dirs.items()}
    expected[None] = reference(fresh, None, ids)
    assert (expected["a"] - expected["b"]).abs().max().item() > 1e-2, "the two adapters must differ, else the test is void"

    for name in ("a", "b", None, "a"):
        adapters.set_active(name)
        diff = (logits(model, ids) - expected[name]).abs().max().item()
        assert diff <= 1e-5, f"active adapter {name!r} must give its own logits; max abs diff {diff}"
    with adapters.disabled():
        diff = (logits(model, ids) - expected[None]).abs().max().item()
        assert diff <= 1e-6, f"disabled() must give the base logits; max abs diff {diff}"
    assert adapters.active == "a", "the active adapter must come back after disabled()"

    adapters.delete("a")
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear, "q_proj (used only by 'a') must be plain again"
    assert isinstance(model.model.layers[0].self_attn.v_proj, MultiAdapterLinear), "v_proj still serves 'b'"
    assert adapters.active is None, "deleting the active adapter must leave the base model active"
    with pytest.raises(AdapterError, match="no adapter named 'a'"):
        adapters.set_active("a")
    adapters.set_active("b")
    diff = (logits(model, ids) - expected["b"]).abs().max().item()
    assert diff <= 1e-5, f"'b' must be unaffected by deleting 'a'; max abs diff {diff}"


def test_per_row_selection_equals_each_row_alone(fresh, adapter_dirs, ids):
    model = fresh()
    adapters = AdapterSet(model)
    for name, path in adapter_dirs.items():
        adapters.load(path, name)
    adapters.set_active("a")  # per_row must override the active adapter
    choice = ["b", None, "a"]
    with adapters.per_row(choice):
        mixed = logits(model, ids)
    for row, name in enumerate(choice):
        alone = reference(fresh, adapter_dirs[name] if name else None, ids[row: row + 1])
        diff = (mixed[row: row + 1] - alone).abs().max().item()
        assert diff <= 1e-5, f"row {row} with adapter {name!r} must equal running it alone; max abs diff {diff}"
    diff = (logits(model, ids) - reference(fresh, adapter_dirs["a"], ids)).abs().max().item()
    assert diff <= 1e-5, "after per_row the active adapter must apply to every row again"


def test_bad_names_raise(fresh, adapter_dirs):
    adapters = AdapterSet(fresh())
    adapters.load(adapter_dirs["a"], "a")
    with pytest.raises(AdapterError, match="already loaded"):
        adapters.load(adapter_dirs["b"], "a")
    with pytest.raises(AdapterError, match=r"unknown adapters \['zz'\]"):
        with adapters.per_row(["a", "zz"]):
            pass


def test_lora_merge_functions_leave_an_adapter_set_alone(fresh, adapter_dirs, ids):
    from slimtune.methods.lora import merge_lora

    model = fresh()
    adapters = AdapterSet(model)
    for name, path in adapter_dirs.items():
        adapters.load(path, name)
    adapters.set_active("b")
    before = logits(model, ids)
    assert merge_lora(model) == 0, "merge_lora must not fold the adapters of an AdapterSet into their shared weight"
    diff = (logits(model, ids) - before).abs().max().item()
    assert diff == 0, f"the logits must not change; max abs diff {diff}"
    with pytest.raises(AdapterError, match="already has LoRA layers"):
        attach_lora(model, ["q_proj"])


def test_mixture_rows_equal_the_cat_combination(fresh, adapter_dirs, ids, tmp_path, tiny_model_dir):
    """A row asking for 0.7 a + 0.3 c equals the `cat` combination of a and c loaded alone, in layers with a
    DoRA neighbour ('b' in v_proj: the per-adapter path) and without (q_proj, o_proj: the stacked path)."""
    from slimtune.combine import combine_adapters
    from slimtune.methods.multi import parse_mixture

    model = fresh()
    attach_lora(model, ["v_proj", "o_proj"], r=6, alpha=4.0, rslora=True)
    gen = torch.Generator().manual_seed(30)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.3)
    save_lora_adapter(model, tmp_path / "c", base_model="tiny")
    dirs = {**adapter_dirs, "c": tmp_path / "c"}
    adapters = AdapterSet(fresh())
    for name, path in dirs.items():
        adapters.load(path, name)
    rows = [parse_mixture("a:0.7+c:0.3"), "b", None, parse_mixture("c:-0.5+a:1.5")]
    batch = torch.cat([ids, ids[:1]])
    with adapters.per_row(rows):
        mixed = logits(adapters.model, batch)
    for row, entry in enumerate(rows):
        if isinstance(entry, str) or entry is None:
            want = reference(fresh, dirs[entry] if entry else None, batch[row: row + 1])
        else:
            out = combine_adapters([dirs[n] for n in entry.names], tmp_path / f"cat{row}",
                                   [w for _, w in entry.parts], "cat", model=str(tiny_model_dir))
            want = reference(fresh, out, batch[row: row + 1])
        diff = (mixed[row: row + 1] - want).abs().max().item()
        assert diff <= 1e-5, f"row {row} ({entry}) must equal its reference; max abs diff {diff}"
    assert (mixed[0] - mixed[3]).abs().max() > 1e-3, "the two mixtures must differ, else the test is void"
    with pytest.raises(AdapterError, match="DoRA adapters"):
        with adapters.per_row([parse_mixture("a:0.5+b:0.5")]):
            pass
    for bad in ("a:x", "a:0.5+a:0.5", "+a"):
        with pytest.raises(AdapterError, match="mixture"):
            parse_mixture(bad)
