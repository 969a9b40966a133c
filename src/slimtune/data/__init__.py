"""Data: JSON/JSONL rows in Alpaca, ShareGPT or OpenAI-messages form (text and images) -> token ids +
loss masks (+ image tensors for a vision-language model's processor)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimtune.data.collate import pad_batch
from slimtune.data.formats import Format, Message, detect_format, to_messages
from slimtune.data.images import text_only
from slimtune.data.reader import Row, read_rows
from slimtune.data.render import IGNORE_INDEX, ChatRenderer, Encoded
from slimtune.errors import DataError


@dataclass
class Dataset:
    """A validated, tokenized dataset. `conversations[i]` is the source of `examples[i]`."""

    path: Path
    format: Format
    examples: list[Encoded]
    conversations: list[list[Message]]
    truncated: int = 0
    dropped: list[str] = field(default_factory=list)
    renderer: Any = None  # what rendered it (ChatRenderer, or VisionRenderer for images); generation reuses it

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def num_tokens(self) -> int:
        return sum(len(example.input_ids) for example in self.examples)


def load_dataset(path: str | Path, tokenizer, fmt: str = "auto", max_length: int = 1024, processor=None,
                 image_max_pixels: int | None = None, note: Callable[[str], None] | None = None) -> Dataset:
    """Read, validate and tokenize every row before any training starts, so a bad line fails fast.

    With a vision-language `processor` the processor renders the rows and their images (each loaded and
    scaled to `image_max_pixels`); without one an image in a row is an error naming the line.

    Examples whose assistant tokens are all cut off by `max_length` are dropped with a note: `note(text)`,
    by default a line on stderr (the check stage passes its console, silent in torchrun's other processes).
    """
    rows = read_rows(path)
    resolved: Format = detect_format(rows[0]) if fmt == "auto" else fmt  # type: ignore[assignment]
    if processor is not None:
        from slimtune.data.vision_render import VisionRenderer

        renderer: Any = VisionRenderer(processor, image_max_pixels)
    else:
        renderer = ChatRenderer(tokenizer)
    examples, conversations, dropped = [], [], []
    truncated = 0
    for row in rows:
        messages = to_messages(row, resolved)
        if processor is None:
            messages = text_only(messages, row.source)
        encoded = renderer.encode(messages, row.source, max_length)
        truncated += encoded.truncated
        if encoded.num_labelled == 0:
            dropped.append(row.source)
            continue
        examples.append(encoded)
        conversations.append(messages)
    if not examples:
        raise DataError(
            f"'{path}': all {len(rows)} examples lose their whole answer to truncation at "
            f"data.max_length={max_length}; raise data.max_length"
        )
    if dropped:
        (note or (lambda text: print(text, file=sys.stderr)))(
            f"slimtune: dropped {len(dropped)} example(s) from {path} whose answer lies beyond "
            f"data.max_length={max_length} (first: {dropped[0]})")
    return Dataset(Path(path), resolved, examples, conversations, truncated, dropped, renderer)


__all__ = [
    "IGNORE_INDEX", "ChatRenderer", "Dataset", "Encoded", "Message", "Row", "detect_format",
    "load_dataset", "pad_batch", "read_rows", "to_messages",
]
