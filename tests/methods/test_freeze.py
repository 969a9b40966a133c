"""Full and freeze tuning: which parameters train, what is saved, and loading it back.

Expected parameter counts are written out from the tiny model's config (hidden 32, intermediate 64,
4 heads, 2 KV heads, 2 layers), not taken from the code under test.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_model
from slimtune.errors import AdapterError
from slimtune.methods.freeze import (
    FREEZE_CONFIG, FREEZE_WEIGHTS, FreezeMethod, FullMethod, attach_freeze, attach_full, load_freeze,
    parse_layer_spec, save_freeze,
)

HIDDEN, INTER, KV = 32, 64, 16  # KV = 2 KV heads x head dim 8
# q, k, v, o projections + gate, up, down + two RMSNorm weights: no biases in Llama.
LAYER_PARAMS = HIDDEN * HIDDEN * 2 + HIDDEN * KV * 2 + 3 * HIDDEN * INTER + 2 * HIDDEN


def trained_names(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_last_layers_trains_exactly_that_layer(tiny_model):
    attach_freeze(tiny_model, last_layers=1)
    names = trained_names(tiny_model)
    assert names and all(name.startswith("model.layers.1.") for name in names), f"only layer 1 may train, got {names}"
    trainable, total = FreezeMethod("freeze", tiny_model).parameter_counts()
    assert trainable == LAYER_PARAMS, f"one Llama layer has {LAYER_PARAMS} parameters, got {trainable} trainable"
    assert total == sum(p.numel() for p in tiny_model.parameters()), "total must count every parameter"


def test_selection_is_the_union_of_options(tiny_model):
    attach_freeze(tiny_model, layers="0", patterns=[r"layers\.1\.mlp\.down_proj"], train_norms=True,
                  train_embeddings=True, train_lm_head=True)
    names = trained_names(tiny_model)
    expected = {n for n, _ in tiny_model.named_parameters() if n.startswith("model.layers.0.")}
    expected |= {"model.layers.1.mlp.down_proj.weight", "model.layers.1.input_layernorm.weight",
                 "model.layers.1.post_attention_layernorm.weight", "model.norm.weight", "model.embed_tokens.weight",
                 "lm_head.weight"}
    assert names == expected, f"missing {expected - names}, unexpected {names - expected}"


def test_layer_spec_parsing():
    assert parse_layer_spec("0-3,10", 12) == {0, 1, 2, 3, 10}, "'0-3,10' must select layers 0, 1, 2, 3 and 10"
    assert parse_layer_spec("-1", 12) == {11}, "'-1' must select the last layer"
    with pytest.raises(AdapterError, match="outside the model's layers 0-11"):
        parse_layer_spec("10-12", 12)
    with pytest.raises(AdapterError, match="not an index or a range"):
        parse_layer_spec("a", 12)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "freeze selects no parameters"),
    ({"patterns": ["no_such_param"]}, "'no_such_param' matches no parameter name"),
    ({"last_layers": 3}, "last_layers=3, but the model has only 2 layers"),
])
def test_bad_selection_raises(tiny_model, kwargs, message):
    with pytest.raises(AdapterError, match=message):
        attach_freeze(tiny_model, **kwargs)


def test_full_trains_everything_and_upcasts_bf16(tiny_model):
    tiny_model.to(torch.bfloat16)
    attach_full(tiny_model)
    params = list(tiny_model.parameters())
    assert all(p.requires_grad for p in params), "full fine-tuning must train every parameter"
    assert all(p.dtype == torch.float32 for p in params), "trained bf16 parameters must be upcast to fp32 for AdamW"
    trainable, total = FullMethod("full", tiny_model).parameter_counts()
    assert trainable == total == sum(p.numel() for p in params), "full: trainable must equal total"


def test_freeze_save_holds_only_trained_tensors_and_loads_back(tiny_model, tiny_tokenizer, tmp_path):
    attach_freeze(tiny_model, last_layers=1, train_norms=True)
    with torch.no_grad():
        for name, param in tiny_model.named_parameters():
            if param.requires_grad:
                param.add_(0.05)
    save_freeze(tiny_model, tmp_path, base_model="tiny-llama")
    saved = load_file(str(tmp_path / FREEZE_WEIGHTS))
    assert set(saved) == trained_names(tiny_model), "the file must hold exactly the trained tensors"
    config = json.loads((tmp_path / FREEZE_CONFIG).read_text())
    assert config["base_model"] == "tiny-llama" and config["tensors"] == sorted(saved), f"bad config {config}"

    fresh = make_tiny_model(len(tiny_tokenizer))
    load_freeze(fresh, tmp_path)
    for name, value in tiny_model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), f"'{name}' must be restored by load_freeze"


def test_tied_lm_head_trains_the_shared_tensor_and_the_tie_survives(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    def tied_model():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))

    model = tied_model()
    attach_freeze(model, train_lm_head=True)
    assert model.model.embed_tokens.weight.requires_grad, "with tied weights, training the head trains the embeddings"
    with torch.no_grad():
        model.lm_head.weight.add_(0.1)
    save_freeze(model, tmp_path, base_model="tied")
    assert list(load_file(str(tmp_path / FREEZE_WEIGHTS))) == ["model.embed_tokens.weight"], (
        "the tied tensor must be saved once, under the embedding's name"
    )
    fresh = tied_model()
    load_freeze(fresh, tmp_path)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight, "loading must keep the tie"
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight), "the trained head must be restored"


def test_load_freeze_refuses_wrong_shapes_without_changing_the_model(tiny_model, tiny_tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = LlamaForCausalLM(LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=48, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    attach_freeze(wide, last_layers=1)
    save_freeze(wide, tmp_path, base_model="wide")
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    with pytest.raises(AdapterError, match="has shape"):
        load_freeze(tiny_model, tmp_path)
    for name, value in tiny_model.state_dict().items():
        assert torch.equal(value, before[name]), f"a refused load must leave '{name}' unchanged"
