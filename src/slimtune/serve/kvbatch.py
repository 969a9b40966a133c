"""The KV cache of the sequences decoded together, left-padded to one width.

Layout, per attention layer: keys and values of shape (rows, kv_heads, width, head_dim) in a
`transformers.DynamicCache`, and one mask (rows, width) with 1 where a real token is cached and 0 in
the left padding. Row r's real tokens sit at positions 0 .. n_r - 1 (position ids count real tokens
only), so its next position is n_r = mask[r].sum(): a row computes exactly what it would alone, the
padding being masked out of every attention.

- `prefill_inputs` left-pads new prompts into one prefill forward;
- `add` appends the rows of such a prefill: both caches are left-padded with zeros to the wider width
  and concatenated along the rows;
- each decode step appends one column (every row's new token): `step_inputs`, then `advance`;
- `keep` drops finished rows, then the left columns that only padding uses any more, so the width stays
  the longest live sequence, not the longest one ever served.

Room to grow: each layer's keys and values live in buffers (rows, kv_heads, capacity, head_dim) and the
cache holds views of their first `width` columns (`PreallocatedLayer`). A decode step writes its column
in place, so it copies one column per layer rather than the whole cache (what `DynamicLayer`'s
concatenation costs: O(width) per step, O(width^2) per reply). `add` and `keep`, which change the rows
anyway, copy into new buffers of the `capacity` the caller gives: the engine gives the longest
prompt + max_tokens among the rows, which bounds the width until the rows change (every row grows by one
column per step and the widest one ends by then), and is the bound the KV budget counts (kvbudget.py). A
step past the capacity still works: the buffer is reallocated twice as wide.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, get_layer_types_and_kwargs

# Attention layers whose keys and values the batch can hold as a plain full-length cache.
_SERVABLE_LAYERS = {"full_attention", "sliding_attention"}


def check_servable(config) -> None:
    """Refuse models whose attention layers need a cache other than keys/values per position (linear
    attention, chunked attention, shared KV ...): those caches cannot be left-padded and merged this way."""
    layer_types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    odd = sorted(set(layer_types) - _SERVABLE_LAYERS)
    if odd:
        raise ValueError(f"the server batches full and sliding-window attention only; this model has "
                         f"{', '.join(odd)} layers")


def new_cache() -> DynamicCache:
    """An empty cache with one full `DynamicLayer` per attention layer, sliding-window layers included.

    A sliding-window layer keeps every position here rather than the last `window - 1`: the model's
    sliding mask (built from the config by the position of each cache column) hides the positions
    outside the window, which gives the same attention as transformers' own sliding cache. Every row's
    tokens are contiguous at the right of the batch (left padding only), so column distance is token
    distance. Memory grows as for a full layer; in exchange every layer is left-padded, merged and
    trimmed the same way (`DecodeBatch`)."""
    return DynamicCache()  # no config: layers are created lazily, all of them `DynamicLayer`


def prefill_inputs(prompts: list[list[int]], pad_id: int, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids), each (rows, longest prompt), prompts left-padded."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


class PreallocatedLayer(DynamicLayer):
    """A cache layer whose `keys` / `values` (rows, kv_heads, width, head_dim) are views of the first `width`
    columns of buffers with room for `capacity`; `update` writes new columns in place (module docstring).
    The columns past `width` are never read: every view stops at `width`."""

    def __init__(self) -> None:
        super().__init__()
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return 0 if self._key_buffer is None else self._key_buffer.shape[2]

    def hold(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        """Copy `keys` and `values` (rows, kv_heads, width, head_dim) into new buffers of max(capacity, width) columns."""
        rows, heads, width, dim = keys.shape
        self._key_buffer = keys.new_empty((rows, heads, max(capacity, width), dim))
        self._value_buffer = values.new_empty((rows, values.shape[1], max(capacity, width), values.shape[3]))
        self._key_buffer[:, :, :width].copy_(keys)
        self._value_buffer[:, :, :width].copy_(values)
        self.keys, self.values = self._key_buffer[:, :, :width], self._value_buffer[:, :, :width]
        self.device, self.is_initialized = keys.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append `key_states` / `value_states` (rows, kv_heads, new, head_dim) as the next columns."""
        if not self.is_initialized:
            self.hold(key_states, value_states, key_states.shape[2])
            return self.keys, self.values
        start = self.keys.shape[2]
        end = start + key_states.shape[2]
        if end > self.capacity:  # nobody reserved enough: amortised doubling, still O(1) per step
            self.hold(self.keys, self.values, max(end, 2 * self.capacity))
        self._key_buffer[:, :, start:end].copy_(key_states)
        self._value_buffer[:, :, start:end].copy_(value_states)
        self.keys, self.values = self._key_buffer[:, :, :end], self._value_buffer[:, :, :end]
        return self.keys, self.values


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    # F.pad lists (left, right) pairs from the last dimension backwards.
    pads = [0, 0] * (tensor.dim() - 1 - dim % tensor.dim()) + [missing, 0]
    return F.pad(tensor, pads)


class DecodeBatch:
    """The rows being decoded: their cache and padding mask (see the module docstring)."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (rows, width), long

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    @property
    def width(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def add(self, cache: DynamicCache, mask: torch.Tensor, capacity: int = 0) -> None:
        """Append rows from a prefill: `cache` holds (new rows, kv_heads, w, head_dim) per layer, `mask` (new rows, w).
        `capacity`: columns to make room for (module docstring); the batch's layers become `PreallocatedLayer`s."""
        if self.cache is None:
            self.cache, self.mask = cache, mask
            for index, layer in enumerate(cache.layers):
                cache.layers[index] = held = PreallocatedLayer()
                held.hold(layer.keys, layer.values, capacity)
            return
        width = max(self.width, mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.hold(torch.cat([_left_pad(mine.keys, width, 2), _left_pad(theirs.keys, width, 2)]),
                      torch.cat([_left_pad(mine.values, width, 2), _left_pad(theirs.values, width, 2)]), capacity)
        self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(mask, width, 1)])

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention_mask (rows, width + 1), position_ids (rows, 1)) for one new token per row."""
        ones = torch.ones((self.rows, 1), dtype=self.mask.dtype, device=self.mask.device)
        return torch.cat([self.mask, ones], dim=1), self.mask.sum(-1, keepdim=True)

    def advance(self, attention_mask: torch.Tensor) -> None:
        """After the step's forward (which grew the cache by one column): that column is real in every row."""
        self.mask = attention_mask

    def keep(self, rows: list[int], capacity: int = 0) -> None:
        """Keep only `rows` (in this order); drop the left columns no kept row uses. `capacity` as in `add`."""
        if len(rows) == self.rows:
            return
        if not rows:
            self.cache = self.mask = None
            return
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int(mask.any(dim=0).nonzero()[0])  # first column some kept row uses
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.hold(layer.keys.index_select(0, index)[:, :, start:],
                       layer.values.index_select(0, index)[:, :, start:], capacity)
