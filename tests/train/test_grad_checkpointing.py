"""Gradient checkpointing, on all decoder layers or a fraction of them, recomputes those layers and
leaves the loss and gradients exactly as without it."""

import pytest
import torch

from slimtune.methods.lora import attach_lora
from slimtune.train.prepare import checkpoint_some_layers


def _step(model, ids):
    model.zero_grad()
    calls = []
    hooks = [layer.self_attn.q_proj.register_forward_hook(lambda m, a, o, i=i: calls.append(i))  # runs again when recomputed
             for i, layer in enumerate(model.model.layers)]
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    for hook in hooks:
        hook.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, calls


@pytest.mark.parametrize("fraction, recomputed", [(1.0, [0, 1, 2, 3]), (0.5, [0, 2]), (0.25, [0])])
def test_checkpointed_layers_are_recomputed_and_gradients_unchanged(tiny_tokenizer, fraction, recomputed):
    from conftest import make_tiny_model

    model = make_tiny_model(len(tiny_tokenizer), layers=4)
    attach_lora(model, "all-linear", r=4, alpha=8, dropout=0.1)  # dropout: recomputation must redraw the same mask
    torch.nn.init.normal_(model.model.layers[0].self_attn.q_proj.lora_B.weight, std=0.1)
    model.train()
    ids = torch.randint(3, len(tiny_tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(5)
    loss_ref, grads_ref, calls_ref = _step(model, ids)
    assert calls_ref == [0, 1, 2, 3]

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert checkpoint_some_layers(model, fraction) == (len(recomputed), 4)
    torch.manual_seed(5)
    loss, grads, calls = _step(model, ids)
    assert sorted(calls) == sorted([0, 1, 2, 3] + recomputed), f"layers run: {calls}"
    assert torch.equal(loss, loss_ref)
    for name, grad in grads.items():
        assert torch.allclose(grad, grads_ref[name], atol=1e-6, rtol=1e-5), name
