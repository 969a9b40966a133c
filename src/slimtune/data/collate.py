"""Batches of encoded examples: right-padded tensors with the loss mask carried in `labels`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from slimtune.data.render import IGNORE_INDEX, Encoded


def pad_batch(examples: Sequence[Encoded], pad_token_id: int, multiple_of: int = 1,
              max_width: int | None = None) -> dict[str, torch.Tensor]:
    """Pad to the longest example. Returns input_ids, labels (-100 on padding), attention_mask, all
    (batch, width) int64.

    A batch that needs padding anyway is widened to a multiple of `multiple_of` (at most `max_width`);
    one whose rows are all the same length is left unpadded, so it keeps the mask-free causal path.
    """
    lengths = [len(example.input_ids) for example in examples]
    longest = width = max(lengths)
    if min(lengths) < longest:
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
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
