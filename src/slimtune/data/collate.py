"""Batches of encoded examples: right-padded tensors with the loss mask carried in `labels`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from slimtune.data.render import IGNORE_INDEX, Encoded


def pad_batch(examples: Sequence[Encoded], pad_token_id: int, multiple_of: int = 1,
              max_width: int | None = None) -> dict[str, torch.Tensor]:
    """Pad to the longest example. Returns input_ids, labels (-100 on padding), attention_mask, all
    (batch, width) int64; vision-language examples add their per-token ids (zero on padding) and image
    tensors (`data/vision_render.py`).

    The width is rounded up to a multiple of `multiple_of`, at most `max_width` (and never below the
    longest example). Rounding even batches whose rows are all one length measured better than
    sparing them (peak RSS 1326 vs 1427 MB, and faster, on the bundled model): a step of a new width
    leaves freed blocks the allocator cannot reuse, which costs more than the attention mask it saves.
    """
    longest = max(len(example.input_ids) for example in examples)
    rounded = longest + (-longest % multiple_of)
    width = rounded if max_width is None else max(longest, min(rounded, max_width))
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids)
        labels[row, :length] = torch.tensor(example.labels)
        attention_mask[row, :length] = 1
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    for key in sorted({key for example in examples for key in example.token_extras}):  # zeros on padding
        batch[key] = torch.zeros((len(examples), width), dtype=torch.long)
        for row, example in enumerate(examples):
            values = example.token_extras.get(key, [0] * len(example.input_ids))
            batch[key][row, :len(values)] = torch.tensor(values, dtype=torch.long)
    if any(example.vision for example in examples):
        from slimtune.data.vision_render import stack_vision

        batch.update(stack_vision([example.vision for example in examples]))
    return batch
