"""Packed batches give the loss and gradients of the same examples run one by one."""

import pytest
import torch

from slimtune.data.render import ChatRenderer
from slimtune.methods.lora import attach_lora, lora_layers
from slimtune.train.loop import make_batch
from slimtune.train.loss import response_loss_sum
from slimtune.train.packing import use_packed_attention

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
     {"role": "assistant", "content": "six, of course"}],
    [{"role": "user", "content": "a much longer question about nothing in particular"},
     {"role": "assistant", "content": "ok"}],
]


def _adapted_model(make_model, vocab):
    model = make_model(vocab)
    attach_lora(model, "all-linear", r=4, alpha=8)
    torch.manual_seed(1)
    for layer in lora_layers(model).values():  # non-zero B so the adapter path is exercised
        torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    return model


def _loss_and_grads(model, batches):
    model.zero_grad()
    total, count = 0.0, 0
    for batch in batches:
        loss_sum, n = response_loss_sum(model, batch, chunk=5)
        loss_sum.backward()
        total += float(loss_sum.detach())
        count += n
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return total, count, grads


def test_packed_equals_one_by_one(tiny_tokenizer):
    from conftest import make_tiny_model

    renderer = ChatRenderer(tiny_tokenizer)
    examples = [renderer.encode(c, f"row{i}", 512) for i, c in enumerate(CONVERSATIONS)]
    cpu = torch.device("cpu")

    single = _adapted_model(make_tiny_model, len(tiny_tokenizer))
    one_by_one = [make_batch([e], False, tiny_tokenizer.pad_token_id, cpu) for e in examples]
    loss_ref, count_ref, grads_ref = _loss_and_grads(single, one_by_one)

    packed_model = _adapted_model(make_tiny_model, len(tiny_tokenizer))
    assert use_packed_attention(packed_model), "a Llama model must accept the packed attention function"
    packed = make_batch(examples, True, tiny_tokenizer.pad_token_id, cpu)
    assert packed["input_ids"].shape == (1, sum(len(e.input_ids) for e in examples)), "packing adds no padding"
    loss, count, grads = _loss_and_grads(packed_model, [packed])

    assert count == count_ref, f"packed batch counts {count} labelled tokens, one-by-one {count_ref}"
    assert abs(loss - loss_ref) < 1e-4 * max(1.0, abs(loss_ref)), f"packed loss {loss} != one-by-one {loss_ref}"
    for name, grad in grads.items():
        diff = (grad - grads_ref[name]).abs().max().item()
        assert diff < 1e-5, f"gradient of {name} differs by {diff}"


@pytest.mark.parametrize("multiple", [1, 8])
def test_padded_batch_equals_one_by_one(tiny_tokenizer, multiple):
    """Padding must not leak into the loss either (the non-packed path), however wide the batch."""
    from conftest import make_tiny_model

    renderer = ChatRenderer(tiny_tokenizer)
    examples = [renderer.encode(c, f"row{i}", 512) for i, c in enumerate(CONVERSATIONS)]
    cpu = torch.device("cpu")
    model = _adapted_model(make_tiny_model, len(tiny_tokenizer))
    loss_ref, _, grads_ref = _loss_and_grads(model, [make_batch([e], False, 0, cpu) for e in examples])
    padded = make_batch(examples, False, tiny_tokenizer.pad_token_id, cpu, multiple)
    longest = max(len(e.input_ids) for e in examples)
    assert padded["input_ids"].shape[1] == -(-longest // multiple) * multiple, "widened to the multiple"
    capped = make_batch(examples, False, tiny_tokenizer.pad_token_id, cpu, multiple, max_width=longest)
    assert capped["input_ids"].shape[1] == longest, "never wider than max_width"

    loss, _, grads = _loss_and_grads(model, [padded])
    assert abs(loss - loss_ref) < 1e-4 * max(1.0, abs(loss_ref)), f"padded loss {loss} != one-by-one {loss_ref}"
    for name, grad in grads.items():
        assert (grad - grads_ref[name]).abs().max().item() < 1e-5, f"gradient of {name} differs"


def test_soft_capped_attention_keeps_the_models_own_function():
    """A model whose attention soft-caps its logits (Gemma 2) keeps its own attention: SDPA and the
    packed function cannot compute it (transformers' SDPA raises). Logits under slimtune's attention
    setup equal the model's own, and packing falls back to padded batches with a note that says why."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from rich.console import Console
    from slimtune.config import build_config
    from slimtune.train.prepare import slimtune_attention

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, attn_logit_softcapping=0.5,
                          final_logit_softcapping=None, sliding_window=16, attn_implementation="eager")
    model = Gemma2ForCausalLM(config).eval()
    ids = torch.randint(0, 100, (2, 12))
    settings = build_config({"model": "-", "data": {"train": "-"}, "train": {"packing": True}}).train
    console = Console(record=True, width=200)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with slimtune_attention(model, settings, console) as packing:
            got = model(input_ids=ids).logits
    assert not packing
    assert torch.equal(got, want)
    assert "attn_logit_softcapping=0.5" in console.export_text()
