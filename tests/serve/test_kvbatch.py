"""The left-padded decode batch: merging prefills pads with masked zero columns, dropping rows trims the
columns no row uses, and step inputs put each row's new token at its own next position."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from slimtune.serve.kvbatch import DecodeBatch, prefill_inputs


def cache_of(keys: torch.Tensor) -> DynamicCache:
    """A one-layer cache whose values are the keys + 100 (so the two can be told apart)."""
    return DynamicCache(ddp_cache_data=[(keys, keys + 100)])


def test_prefill_inputs_left_pad():
    ids, mask, positions = prefill_inputs([[5, 6, 7], [9]], pad_id=0, device=torch.device("cpu"))
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions.tolist() == [[0, 1, 2], [0, 0, 0]], "positions count real tokens only"


def test_add_keep_and_step():
    batch = DecodeBatch()
    first = torch.arange(1.0, 7.0).reshape(2, 1, 3, 1)  # (rows, heads, width, head_dim): rows [1 2 3], [4 5 6]
    batch.add(cache_of(first), torch.tensor([[1, 1, 1], [0, 1, 1]]))
    second = torch.arange(11.0, 16.0).reshape(1, 1, 5, 1)
    batch.add(cache_of(second), torch.ones(1, 5, dtype=torch.long))
    layer = batch.cache.layers[0]
    assert batch.mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 1, 1], [1, 1, 1, 1, 1]]
    assert layer.keys[:, 0, :, 0].tolist() == [[0, 0, 1, 2, 3], [0, 0, 4, 5, 6], [11, 12, 13, 14, 15]], \
        "shorter rows are left-padded with zeros"
    assert layer.values[2, 0, :, 0].tolist() == [111, 112, 113, 114, 115]

    attention_mask, positions = batch.step_inputs()
    assert attention_mask[:, -1].tolist() == [1, 1, 1] and positions.tolist() == [[3], [2], [5]], \
        "each row's next token goes at its own next position"

    batch.keep([1, 0])
    assert batch.mask.tolist() == [[0, 1, 1], [1, 1, 1]], "the two columns only the dropped row used are gone"
    assert layer.keys[:, 0, :, 0].tolist() == [[4, 5, 6], [1, 2, 3]] and layer.values.shape == (2, 1, 3, 1)
    batch.keep([])
    assert batch.rows == 0 and batch.cache is None
