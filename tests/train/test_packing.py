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
