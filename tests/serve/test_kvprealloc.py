"""The preallocated decode cache: a decode step writes its column into buffers made when the rows change
(no concatenation of the whole cache per step), and the greedy tokens stay those of a naive generate
that recomputes the whole sequence without any cache, while rows of different adapters join and leave."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from slimtune.methods.multi import AdapterSet
from slimtune.serve.engine import Generation
from slimtune.serve.kvbatch import DecodeBatch, PreallocatedLayer
from slimtune.serve.sampling import SamplingParams

from serve.support import make_engine


def test_layer_update_writes_in_place_and_grows_when_full():
    layer = PreallocatedLayer()
    keys = torch.randn(2, 3, 4, 5)
    layer.hold(keys, keys + 1, capacity=6)
    buffer = layer.keys.data_ptr()
    expected = keys
    for step in range(5):  # 4 + 5 columns: past the capacity of 6 at the third step
        column = torch.randn(2, 3, 1, 5)
        expected = torch.cat([expected, column], dim=2)  # what DynamicLayer computes
        out_keys, out_values = layer.update(column, column + 1)
        assert torch.equal(out_keys, expected) and torch.equal(out_values, expected + 1), f"step {step}"
        if step < 2:
            assert out_keys.data_ptr() == buffer, "within the capacity a step must reuse the buffer"
    assert layer.capacity >= 12 and layer.get_seq_length() == 9, "full: the buffer doubles (6 -> 12)"


def test_batch_add_and_keep_make_room_for_the_capacity():
    batch = DecodeBatch()
    batch.add(DynamicCache(ddp_cache_data=[(torch.ones(2, 1, 3, 2), torch.ones(2, 1, 3, 2))]),
              torch.ones(2, 3, dtype=torch.long), capacity=10)
    batch.add(DynamicCache(ddp_cache_data=[(torch.full((1, 1, 5, 2), 2.0), torch.full((1, 1, 5, 2), 2.0))]),
              torch.ones(1, 5, dtype=torch.long), capacity=20)
    layer = batch.cache.layers[0]
    assert isinstance(layer, PreallocatedLayer) and layer.capacity == 20
    assert layer.keys[:, 0, :, 0].tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [2, 2, 2, 2, 2]]
    batch.keep([0, 1], capacity=7)
    assert layer.capacity == 7 and layer.keys.shape == (2, 1, 3, 2), "the padding-only columns are trimmed"


def naive_greedy(model, adapters: AdapterSet, prompt: list[int], adapter: str | None, steps: int) -> list[int]:
    """Greedy decoding that recomputes the whole sequence at every step: no cache, no batch, no padding."""
    ids = list(prompt)
    adapters.set_active(adapter)
    try:
        with torch.no_grad():
            for _ in range(steps):
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
                ids.append(int(logits.argmax()))
    finally:
        adapters.set_active(None)
    return ids[len(prompt):]


@pytest.fixture
def engine(tiny_model_dir, adapter_root):
    return make_engine(tiny_model_dir, adapter_root)  # driven turn by turn here, without its thread


# (turn it arrives at, prompt, adapter, max_tokens): rows join mid-decode and leave at different steps.
SCHEDULE = [(0, "The cat sat on", None, 24), (0, "hi", "alpha", 5), (3, "A much longer prompt, to pad the others", "beta", 9),
            (3, "hi", "beta", 20), (7, "Numbers: 1 2 3", "alpha", 6), (9, "x", None, 4)]


def test_decode_with_joins_and_leaves_equals_naive_generate(engine):
    pending = list(SCHEDULE)
    generations: list[Generation] = []
    steps: list[tuple[tuple[int, ...], int, int]] = []  # (rows, key buffer address, capacity) of every decode step

    def record(_module, _args, kwargs):
        if kwargs["input_ids"].shape[1] == 1:
            layer = engine._batch.cache.layers[0]
            steps.append((tuple(id(g) for g in engine._rows), layer.keys.data_ptr(), layer.capacity))

    hook = engine.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        turn = 0
        while pending or engine._rows or engine._pending:
            while pending and pending[0][0] <= turn:
                _, prompt, adapter, max_tokens = pending.pop(0)
                ids = list(engine.tokenizer(prompt)["input_ids"])
                generation = Generation(ids, adapter, SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                     ignore_eos=True), lambda _event: None)
                generations.append(generation)
                engine.submit(generation)
            engine._take_work(block=False)
            group = engine._admit()
            if group:
                engine._prefill(group)
            if engine._rows:
                engine._decode_step()
            turn += 1
    finally:
        hook.remove()

    for generation, (_, prompt, adapter, max_tokens) in zip(generations, SCHEDULE):
        expected = naive_greedy(engine.model, engine.adapters, generation.prompt_ids, adapter, max_tokens)
        assert generation.text.ids == expected, f"{prompt!r} with {adapter!r}: batched cached decode must equal " \
                                                "naive full recompute"
    assert max(len(rows) for rows, _, _ in steps) >= 4, "rows of several adapters must share decode steps"
    same_rows = [(a, b) for a, b in zip(steps, steps[1:]) if a[0] == b[0]]
    assert len(same_rows) >= 10, "the schedule must hold runs of steps with unchanged rows"
    assert all(a[1] == b[1] for a, b in same_rows), "while the rows stay the same, each step must write into " \
                                                    "the same buffer, not a new concatenation"
    longest = max(g.max_length for g in generations)
    assert all(capacity <= longest for _, _, capacity in steps), "the buffer stays within prompt + max_tokens"
