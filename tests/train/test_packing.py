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


@pytest.mark.parametrize("multiple", [1, 16])
def test_packed_equals_one_by_one(tiny_tokenizer, multiple):
    from conftest import make_tiny_model

    renderer = ChatRenderer(tiny_tokenizer)
    examples = [renderer.encode(c, f"row{i}", 512) for i, c in enumerate(CONVERSATIONS)]
    cpu = torch.device("cpu")

    single = _adapted_model(make_tiny_model, len(tiny_tokenizer))
    one_by_one = [make_batch([e], False, tiny_tokenizer.pad_token_id, cpu) for e in examples]
    loss_ref, count_ref, grads_ref = _loss_and_grads(single, one_by_one)

    packed_model = _adapted_model(make_tiny_model, len(tiny_tokenizer))
    assert use_packed_attention(packed_model), "a Llama model must accept the packed attention function"
    packed = make_batch(examples, True, tiny_tokenizer.pad_token_id, cpu, multiple)
    total = sum(len(e.input_ids) for e in examples)
    assert packed["input_ids"].shape == (1, -(-total // multiple) * multiple), "padding only up to the multiple"
    loss, count, grads = _loss_and_grads(packed_model, [packed])

    assert count == count_ref, f"packed batch counts {count} labelled tokens, one-by-one {count_ref}"
    assert abs(loss - loss_ref) < 1e-4 * max(1.0, abs(loss_ref)), f"packed loss {loss} != one-by-one {loss_ref}"
    for name, grad in grads.items():
        diff = (grad - grads_ref[name]).abs().max().item()
        assert diff < 1e-5, f"gradient of {name} differs by {diff}"


@pytest.mark.parametrize("multiple", [1, 8])
@pytest.mark.parametrize("slimtune_function", [False, True], ids=["sdpa", "slimtune-attention"])
def test_padded_batch_equals_one_by_one(tiny_tokenizer, multiple, slimtune_function, monkeypatch):
    """Padding must not leak into the loss either (the non-packed path), however wide the batch; with
    slimtune's attention function the right-padded batch runs as plain causal attention, no mask."""
    from conftest import make_tiny_model
    from transformers.integrations import sdpa_attention

    renderer = ChatRenderer(tiny_tokenizer)
    examples = [renderer.encode(c, f"row{i}", 512) for i, c in enumerate(CONVERSATIONS)]
    cpu = torch.device("cpu")
    model = _adapted_model(make_tiny_model, len(tiny_tokenizer))
    masks = []
    if slimtune_function:
        assert use_packed_attention(model)
        sdpa = sdpa_attention.sdpa_attention_forward

        def recording(module, query, key, value, attention_mask, **kwargs):
            if query.shape[0] > 1:
                masks.append(attention_mask)
            return sdpa(module, query, key, value, attention_mask, **kwargs)

        monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", recording)
    loss_ref, _, grads_ref = _loss_and_grads(model, [make_batch([e], False, 0, cpu) for e in examples])
    padded = make_batch(examples, False, tiny_tokenizer.pad_token_id, cpu, multiple)
    longest = max(len(e.input_ids) for e in examples)
    assert padded["input_ids"].shape[1] == -(-longest // multiple) * multiple, "widened to the multiple"
    capped = make_batch(examples, False, tiny_tokenizer.pad_token_id, cpu, multiple, max_width=longest)
    assert capped["input_ids"].shape[1] == longest, "never wider than max_width"

    loss, _, grads = _loss_and_grads(model, [padded])
    assert all(mask is None for mask in masks), "a right-padded batch needs no mask tensor"
    assert len(masks) == (2 if slimtune_function else 0)
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


def _mask_kwargs(length: int, **changes) -> dict:
    from transformers.masking_utils import causal_mask_function

    kwargs = {"batch_size": 2, "q_length": length, "kv_length": length, "q_offset": 0, "kv_offset": 0,
              "mask_function": causal_mask_function, "allow_is_causal_skip": True, "local_size": None}
    return {**kwargs, **changes}


def test_only_right_padded_whole_rows_go_without_a_mask():
    """Plain causal attention stands in for the padding mask only where it computes the same thing for
    every real token: padding at the end of each row, the queries the whole rows."""
    from transformers.masking_utils import sliding_window_causal_mask_function

    from slimtune.train.packing import causal_covers_padding

    right = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    left = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    holes = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 1, 1]])
    assert causal_covers_padding(right, _mask_kwargs(5))
    assert causal_covers_padding(right.bool(), _mask_kwargs(5))
    assert not causal_covers_padding(left, _mask_kwargs(5)), "left padding (generation) needs the mask"
    assert not causal_covers_padding(holes, _mask_kwargs(5))
    assert not causal_covers_padding(right, _mask_kwargs(5, q_length=1, q_offset=4)), "a decoding step"
    assert not causal_covers_padding(right, _mask_kwargs(5, q_length=3, kv_length=5, q_offset=2)), "a cache"
    assert not causal_covers_padding(right, _mask_kwargs(5, allow_is_causal_skip=False))
    assert not causal_covers_padding(right, _mask_kwargs(5, local_size=3))
    window = sliding_window_causal_mask_function(3)
    assert not causal_covers_padding(right, _mask_kwargs(5, mask_function=window))
    # transformers' earlier 5.x signature: the queries' positions instead of q_length / q_offset
    earlier = {key: value for key, value in _mask_kwargs(5).items() if key not in ("q_length", "q_offset")}
    assert causal_covers_padding(right, {**earlier, "cache_position": torch.arange(5)})
    assert not causal_covers_padding(right, {**earlier, "cache_position": torch.arange(2, 5)})


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("window", [None, 4])
def test_padded_logits_equal_each_row_alone_under_slimtunes_attention(padding_side, window):
    """Real tokens' logits of a padded batch under slimtune's attention function equal each row run
    alone by the model's eager attention, whichever side is padded and with a sliding window (Mistral)
    shorter than the rows, where the mask must stay."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=window,
                           attn_implementation="eager", use_cache=False)
    model = MistralForCausalLM(config).eval()
    lengths = [11, 7, 3]
    width = max(lengths)
    rows = [torch.randint(1, 64, (n,)) for n in lengths]
    with torch.no_grad():
        alone = [model(input_ids=row[None]).logits[0] for row in rows]
        assert use_packed_attention(model)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        positions = torch.zeros_like(ids)
        for index, row in enumerate(rows):
            cols = slice(0, len(row)) if padding_side == "right" else slice(width - len(row), width)
            ids[index, cols], mask[index, cols] = row, 1
            positions[index, cols] = torch.arange(len(row))
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    for index, row in enumerate(rows):
        cols = slice(0, len(row)) if padding_side == "right" else slice(width - len(row), width)
        torch.testing.assert_close(logits[index, cols], alone[index], rtol=1e-5, atol=1e-5)
