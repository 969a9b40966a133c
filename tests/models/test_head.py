"""The output projection gets a contiguous input (models/head.py): the prefill's last-position slice
reaches the head as a contiguous tensor, with the same logits as without the hook."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from slimtune.models.head import contiguous_head_input


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_last_position_slice_reaches_the_head_contiguous(dtype):
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2)
    model = tf.LlamaForCausalLM(config).to(dtype).eval()
    ids = torch.randint(0, 64, (3, 7))
    with torch.no_grad():
        expected = model(input_ids=ids).logits[:, -1:]
    seen: list[bool] = []
    model.lm_head.register_forward_hook(lambda module, args, out: seen.append(args[0].is_contiguous()))
    with torch.no_grad():
        model(input_ids=ids, logits_to_keep=1)
    assert seen == [False], "transformers passes the head a strided slice (the case this guards)"
    contiguous_head_input(model)
    contiguous_head_input(model)  # once per model, however often it is called
    with torch.no_grad():
        got = model(input_ids=ids, logits_to_keep=1).logits
    assert seen == [False, True]
    torch.testing.assert_close(got, expected)
    assert len(model.lm_head._forward_pre_hooks) == 1


def test_loaded_models_carry_it(tiny_model_dir):
    from slimtune.models import load_model

    model, _, _ = load_model(str(tiny_model_dir))
    assert model.get_output_embeddings()._slimtune_contiguous_input
