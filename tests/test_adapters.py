"""Adapter files in PEFT's format, checked against PEFT itself (peft is the reference implementation).

Both directions: an adapter saved by slimtune loads in `PeftModel.from_pretrained` and gives the same
logits; an adapter saved by PEFT's `save_pretrained` loads in slimtune and gives the same logits.
Adapters always carry random non-zero B, so a dropped or mis-keyed tensor changes the logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from conftest import make_tiny_model
from slimtune.adapters import load_lora_adapter, read_adapter_config, save_lora_adapter
from slimtune.api import merge_run
from slimtune.errors import AdapterError, SlimtuneError
from slimtune.methods.lora import attach_lora, lora_layers

R, ALPHA = 4, 12.0  # scaling 3: a scaling bug (alpha, r/alpha, 1) changes the logits


def randomize_lora_b(model, seed: int = 1, std: float = 0.1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * std)


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def peft_lora_paths(peft_model) -> set[str]:
    prefix = "base_model.model."
    return {n[len(prefix):] for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and n.startswith(prefix)}


@pytest.fixture
def input_ids(tiny_tokenizer) -> torch.Tensor:
    return torch.tensor([tiny_tokenizer("<|im_start|>user\nhello there<|im_end|>\n").input_ids])


@pytest.fixture
def fresh_tiny(tiny_tokenizer):
    """Builds more copies of the `tiny_model` fixture's base model (same seed, same weights)."""
    return lambda: make_tiny_model(len(tiny_tokenizer))


@pytest.fixture
def saved_adapter(tiny_model, tmp_path) -> Path:
    """A slimtune adapter (q_proj, v_proj, down_proj; random B) saved to tmp_path/adapter."""
    attach_lora(tiny_model, ["q_proj", "v_proj", "down_proj"], r=R, alpha=ALPHA)
    randomize_lora_b(tiny_model)
    out = tmp_path / "adapter"
    save_lora_adapter(tiny_model, out, base_model="tiny-llama")
    return out


# --- slimtune -> PEFT -------------------------------------------------------------------------------


def test_saved_config_and_keys_are_peft_format(saved_adapter):
    config = json.loads((saved_adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA", f"peft_type must be 'LORA', got {config['peft_type']!r}"
    assert config["task_type"] == "CAUSAL_LM", f"task_type must be 'CAUSAL_LM', got {config['task_type']!r}"
    assert config["r"] == R, f"r must be {R}, got {config['r']!r}"
    assert config["lora_alpha"] == ALPHA, f"lora_alpha must be {ALPHA}, got {config['lora_alpha']!r}"
    assert sorted(config["target_modules"]) == ["down_proj", "q_proj", "v_proj"], (
        f"target_modules must name the adapted kinds, got {config['target_modules']!r}"
    )
    LoraConfig.from_pretrained(str(saved_adapter))  # PEFT itself must accept the config file

    with safe_open(str(saved_adapter / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    expected = {
        f"base_model.model.model.layers.{i}.{block}.{kind}.lora_{ab}.weight"
        for i in range(2)
        for block, kind in [("self_attn", "q_proj"), ("self_attn", "v_proj"), ("mlp", "down_proj")]
        for ab in "AB"
    }
    assert keys == expected, f"safetensors keys must be PEFT's: missing {expected - keys}, unexpected {keys - expected}"


def test_slimtune_adapter_loads_in_peft(tiny_model, saved_adapter, fresh_tiny, input_ids):
    base_logits = logits(fresh_tiny(), input_ids)
    ours = logits(tiny_model, input_ids)
    assert (ours - base_logits).abs().max().item() > 1e-3, "random B must change the logits, else the test is void"

    peft_model = PeftModel.from_pretrained(fresh_tiny(), str(saved_adapter))
    assert peft_lora_paths(peft_model) == set(lora_layers(tiny_model)), "PEFT must wrap exactly the modules slimtune adapted"
    theirs = logits(peft_model, input_ids)
    diff = (theirs - ours).abs().max().item()
    assert diff <= 1e-5, f"PEFT with slimtune's adapter must give slimtune's logits; max abs diff {diff}"


def test_layer_subset_adapter_round_trips(tiny_model, tmp_path, fresh_tiny, input_ids):
    # A regex that adapts q_proj in layer 0 only: the saved target_modules must not widen to every q_proj.
    attach_lora(tiny_model, r".*\.layers\.0\.self_attn\.q_proj", r=R, alpha=ALPHA)
    randomize_lora_b(tiny_model)
    save_lora_adapter(tiny_model, tmp_path, base_model="tiny-llama")
    ours = logits(tiny_model, input_ids)

    peft_model = PeftModel.from_pretrained(fresh_tiny(), str(tmp_path))
    assert peft_lora_paths(peft_model) == {"model.layers.0.self_attn.q_proj"}, (
        f"PEFT must wrap only layer 0's q_proj, got {peft_lora_paths(peft_model)}"
    )
    reloaded = fresh_tiny()
    load_lora_adapter(reloaded, tmp_path)
    assert set(lora_layers(reloaded)) == {"model.layers.0.self_attn.q_proj"}, "slimtune must reload its own subset adapter"
    diff = (logits(reloaded, input_ids) - ours).abs().max().item()
    assert diff <= 1e-6, f"a reloaded adapter must give the same logits; max abs diff {diff}"


# --- rsLoRA, DoRA and per-module rank / alpha, both ways ----------------------------------------------

VARIANTS = {
    # name: (slimtune attach_lora kwargs, PEFT LoraConfig kwargs)
    "rslora": ({"rslora": True}, {"use_rslora": True}),
    "dora": ({"use_dora": True}, {"use_dora": True}),
    "dora+rslora": ({"use_dora": True, "rslora": True}, {"use_dora": True, "use_rslora": True}),
    "patterns": ({"rank_pattern": {"v_proj": 2}, "alpha_pattern": {r"layers\.0\.self_attn\.q_proj": 3.0}},
                 {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {r"layers\.0\.self_attn\.q_proj": 3.0}}),
}


def randomize_all(model, seed: int = 3, std: float = 0.2) -> None:
    """Random A, B and (DoRA) magnitude, so every tensor of the file shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=gen) * std)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * std)
            if hasattr(layer, "lora_magnitude_vector"):
                m = layer.lora_magnitude_vector
                m.mul_(1 + 1.5 * std * torch.randn(m.shape, generator=gen))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_adapter_loads_in_peft(variant, tiny_model, fresh_tiny, tmp_path, input_ids):
    ours_kwargs, peft_kwargs = VARIANTS[variant]
    attach_lora(tiny_model, ["q_proj", "v_proj", "down_proj"], r=R, alpha=ALPHA, **ours_kwargs)
    randomize_all(tiny_model)
    save_lora_adapter(tiny_model, tmp_path, base_model="tiny-llama")
    ours = logits(tiny_model, input_ids)
    assert (ours - logits(fresh_tiny(), input_ids)).abs().max().item() > 1e-3, "the adapter must change the logits"

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    for key, value in peft_kwargs.items():
        if key in ("use_dora", "use_rslora"):
            assert config[key] is value, f"adapter_config.json must say {key}={value}, got {config[key]!r}"
    if "use_dora" in peft_kwargs:
        with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
            mags = [k for k in f.keys() if k.endswith(".lora_magnitude_vector")]
        assert len(mags) == 6, f"one PEFT-named lora_magnitude_vector per adapted layer, got {mags}"
    peft_model = PeftModel.from_pretrained(fresh_tiny(), str(tmp_path)).eval()
    diff = (logits(peft_model, input_ids) - ours).abs().max().item()
    assert diff <= 1e-5, f"{variant}: PEFT with slimtune's adapter must give slimtune's logits; max abs diff {diff}"

    reloaded = fresh_tiny()
    load_lora_adapter(reloaded, tmp_path)
    diff = (logits(reloaded, input_ids) - ours).abs().max().item()
    assert diff <= 1e-6, f"{variant}: slimtune must reload its own adapter exactly; max abs diff {diff}"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_peft_adapter_loads_in_slimtune(variant, fresh_tiny, tmp_path, input_ids):
    _, peft_kwargs = VARIANTS[variant]
    torch.manual_seed(6)
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj", "up_proj"],
                        init_lora_weights=False, **peft_kwargs)
    peft_model = get_peft_model(fresh_tiny(), config).eval()
    if config.use_dora:  # PEFT initialises m = ||W + s B A||: scale it so a wrong norm convention shows
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_magnitude_vector" in name:
                    param.mul_(torch.linspace(0.7, 1.3, param.numel()))
    theirs = logits(peft_model, input_ids)
    peft_model.save_pretrained(str(tmp_path))

    model = fresh_tiny()
    load_lora_adapter(model, tmp_path)
    assert set(lora_layers(model)) == peft_lora_paths(peft_model), "slimtune must adapt the modules PEFT adapted"
    diff = (logits(model, input_ids) - theirs).abs().max().item()
    assert diff <= 1e-5, f"{variant}: slimtune with PEFT's adapter must give PEFT's logits; max abs diff {diff}"


# --- PEFT -> slimtune -------------------------------------------------------------------------------


def test_peft_adapter_loads_in_slimtune(fresh_tiny, tmp_path, input_ids):
    torch.manual_seed(5)
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["k_proj", "o_proj", "up_proj"], init_lora_weights=False)
    peft_model = get_peft_model(fresh_tiny(), config)
    peft_model.eval()
    theirs = logits(peft_model, input_ids)
    base_logits = logits(fresh_tiny(), input_ids)
    assert (theirs - base_logits).abs().max().item() > 1e-3, "PEFT's random B must change the logits, else the test is void"
    peft_model.save_pretrained(str(tmp_path))

    model = fresh_tiny()
    loaded_config = load_lora_adapter(model, tmp_path)
    assert loaded_config["r"] == R, "load_lora_adapter must return the adapter's config"
    assert set(lora_layers(model)) == peft_lora_paths(peft_model), "slimtune must adapt the modules PEFT adapted"
    ours = logits(model, input_ids)
    diff = (ours - theirs).abs().max().item()
    assert diff <= 1e-5, f"slimtune with PEFT's adapter must give PEFT's logits; max abs diff {diff}"


def test_keys_with_adapter_name_load(tiny_model, saved_adapter, fresh_tiny, input_ids):
    # PEFT's in-memory keys carry the adapter name ('.lora_A.default.weight'); files written from a raw
    # state_dict have them too.
    weights = saved_adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}, str(weights))
    model = fresh_tiny()
    load_lora_adapter(model, saved_adapter)
    diff = (logits(model, input_ids) - logits(tiny_model, input_ids)).abs().max().item()
    assert diff <= 1e-6, f"keys named '.default.weight' must load like '.weight'; max abs diff {diff}"


# --- refusals ---------------------------------------------------------------------------------------


def edit_config(adapter_dir: Path, **changes) -> None:
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def test_refuses_pickle_only_adapter(saved_adapter, fresh_tiny):
    weights = saved_adapter / "adapter_model.safetensors"
    torch.save(load_file(str(weights)), saved_adapter / "adapter_model.bin")
    weights.unlink()
    with pytest.raises(AdapterError, match="adapter_model.bin is a pickle"):
        load_lora_adapter(fresh_tiny(), saved_adapter)


def test_refuses_wrong_peft_type(saved_adapter, fresh_tiny):
    edit_config(saved_adapter, peft_type="IA3")
    with pytest.raises(AdapterError, match=r"peft_type 'IA3' is not supported.*expected 'LORA'"):
        load_lora_adapter(fresh_tiny(), saved_adapter)


def test_refuses_config_without_r(saved_adapter):
    edit_config(saved_adapter, r=None)
    with pytest.raises(AdapterError, match=r"adapter_config.json: missing field 'r'"):
        read_adapter_config(saved_adapter)


def test_refuses_unsupported_options(saved_adapter):
    edit_config(saved_adapter, fan_in_fan_out=True)
    with pytest.raises(AdapterError, match="not supported yet.*fan_in_fan_out"):
        read_adapter_config(saved_adapter)


def test_refuses_weights_of_another_model_size(tiny_tokenizer, tmp_path, fresh_tiny):
    # The same architecture with hidden size 48 instead of 32: every key exists, shapes differ.
    wide = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=48, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    ))
    attach_lora(wide, ["q_proj"], r=R, alpha=ALPHA)
    save_lora_adapter(wide, tmp_path, base_model="wide-llama")
    with pytest.raises(AdapterError, match=r"q_proj\.lora_A\.weight' has shape \(4, 48\), the model needs \(4, 32\)"):
        load_lora_adapter(fresh_tiny(), tmp_path)


def test_refuses_weights_of_another_depth(tiny_tokenizer, tmp_path, fresh_tiny):
    deeper = make_tiny_model(len(tiny_tokenizer), layers=3)
    attach_lora(deeper, ["q_proj"], r=R, alpha=ALPHA)
    save_lora_adapter(deeper, tmp_path, base_model="deeper-llama")
    with pytest.raises(AdapterError, match=r"does not fit the base model: 0 missing keys.*2 unexpected keys.*layers\.2\."):
        load_lora_adapter(fresh_tiny(), tmp_path)


# --- merge_run --------------------------------------------------------------------------------------


def test_merge_run_writes_plain_model_with_adapted_logits(tiny_model_dir, tmp_path, fresh_tiny, input_ids):
    from slimtune.models import load_model

    model, _, _ = load_model(str(tiny_model_dir))
    attach_lora(model, ["q_proj", "gate_proj"], r=R, alpha=ALPHA)
    randomize_lora_b(model, seed=3)
    run_dir = tmp_path / "run"
    save_lora_adapter(model, run_dir, base_model=str(tiny_model_dir))
    run_config = {"model": str(tiny_model_dir), "data": {"train": "x.jsonl"}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(run_config))
    adapted = logits(model.eval(), input_ids)
    base_logits = logits(fresh_tiny(), input_ids)
    assert (adapted - base_logits).abs().max().item() > 1e-3, "random B must change the logits, else the test is void"

    out = merge_run(run_dir, tmp_path / "merged")
    assert (out / "model.safetensors").is_file(), "the merged directory must hold model.safetensors"
    assert not (out / "adapter_model.safetensors").exists(), "the merged directory must not hold adapter files"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        merged_keys = set(f.keys())
    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as f:
        base_keys = set(f.keys())
    assert merged_keys == base_keys, (
        f"the merged checkpoint must have the base model's keys only: extra {sorted(merged_keys - base_keys)[:3]}, "
        f"missing {sorted(base_keys - merged_keys)[:3]}"
    )

    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    diff = (logits(merged, input_ids) - adapted).abs().max().item()
    assert diff <= 1e-5, f"the merged model must give the adapted model's logits; max abs diff {diff}"

    # Independent reference: PEFT's own merge of the same adapter.
    peft_merged = PeftModel.from_pretrained(fresh_tiny(), str(run_dir)).merge_and_unload()
    diff = (logits(merged, input_ids) - logits(peft_merged, input_ids)).abs().max().item()
    assert diff <= 1e-5, f"the merged model must match PEFT's merge_and_unload; max abs diff {diff}"


def test_merge_run_refuses_non_empty_output(saved_adapter, tmp_path, tiny_model_dir):
    (saved_adapter / "config.yaml").write_text(yaml.safe_dump({"model": str(tiny_model_dir), "data": {"train": "x.jsonl"}}))
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(SlimtuneError, match="is not empty"):
        merge_run(saved_adapter, out)
    assert (out / "keep.txt").read_text() == "precious", "a refused merge must leave the output directory alone"


# --- the bundled real model -------------------------------------------------------------------------


@pytest.fixture
def bundled(bundled_model_dir):
    """(fresh SmolLM2-135M-Instruct base, ids of a ~20-token chat prompt), run on one CPU thread.

    On a small, busy CPU machine two-thread MKL matmuls of this size can be ~20x slower than one thread,
    which would make each forward take seconds. Loading is cheap (safetensors are memory-mapped), so each
    test loads a fresh base rather than deep-copying one.
    """
    from slimtune.models import load_model

    model, tokenizer, _ = load_model(str(bundled_model_dir))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer(text).input_ids])
    assert ids.shape[1] <= 24, f"keep the prompt short for speed, got {ids.shape[1]} tokens"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield model.eval(), ids
    finally:
        torch.set_num_threads(threads)


@pytest.mark.integration
def test_bundled_slimtune_adapter_in_peft(bundled, bundled_model_dir, tmp_path):
    model, ids = bundled
    base_logits = logits(model, ids)
    attach_lora(model, ["q_proj", "v_proj"], r=8, alpha=16)
    randomize_lora_b(model, seed=11, std=0.05)
    save_lora_adapter(model, tmp_path, base_model=str(bundled_model_dir))
    ours = logits(model, ids)
    assert (ours - base_logits).abs().max().item() > 1e-2, "random B must change the logits, else the test is void"

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(bundled_model_dir)), str(tmp_path))
    assert len(peft_lora_paths(peft_model)) == 60, "PEFT must wrap q_proj and v_proj in all 30 layers"
    theirs = logits(peft_model.eval(), ids)
    diff = (theirs - ours).abs().max().item()
    assert diff <= 1e-4, f"PEFT on the real model must give slimtune's logits; max abs diff {diff}"


@pytest.mark.integration
def test_bundled_peft_adapter_in_slimtune(bundled, bundled_model_dir, tmp_path):
    model, ids = bundled
    base_logits = logits(model, ids)
    torch.manual_seed(12)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(bundled_model_dir)), config).eval()
    theirs = logits(peft_model, ids)
    assert (theirs - base_logits).abs().max().item() > 1e-2, "PEFT's random B must change the logits"
    peft_model.save_pretrained(str(tmp_path))

    load_lora_adapter(model, tmp_path)
    assert len(lora_layers(model)) == 60, "slimtune must adapt q_proj and v_proj in all 30 layers"
    diff = (logits(model, ids) - theirs).abs().max().item()
    assert diff <= 1e-4, f"slimtune with PEFT's adapter on the real model must give PEFT's logits; max abs diff {diff}"


@pytest.mark.integration
def test_bundled_dora_adapter_both_ways(bundled, bundled_model_dir, tmp_path):
    model, ids = bundled
    attach_lora(model, ["q_proj", "v_proj"], r=8, alpha=16, use_dora=True, rslora=True)
    base_logits = logits(model, ids)
    randomize_all(model, seed=13, std=0.05)
    save_lora_adapter(model, tmp_path / "ours", base_model=str(bundled_model_dir))
    ours = logits(model, ids)
    assert (ours - base_logits).abs().max().item() > 1e-2, "the random adapter must change the logits, else the test is void"
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(bundled_model_dir)), str(tmp_path / "ours")).eval()
    diff = (logits(peft_model, ids) - ours).abs().max().item()
    assert diff <= 1e-4, f"PEFT with slimtune's DoRA adapter on the real model must match; max abs diff {diff}"

    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1.1)
    theirs = logits(peft_model, ids)
    assert (theirs - ours).abs().max().item() > 1e-2, "scaling m must change PEFT's logits, else the test is void"
    peft_model.save_pretrained(str(tmp_path / "theirs"))
    from slimtune.models import load_model

    fresh, _, _ = load_model(str(bundled_model_dir))
    load_lora_adapter(fresh.eval(), tmp_path / "theirs")
    diff = (logits(fresh, ids) - theirs).abs().max().item()
    assert diff <= 1e-4, f"slimtune with PEFT's DoRA adapter on the real model must match; max abs diff {diff}"
