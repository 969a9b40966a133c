"""Render conversations to token ids with a loss mask: learn the assistant's words, not the prompt.

With a chat template, the text is the tokenizer's own rendering. For each assistant turn i we render
`messages[:i]` with the generation prompt and `messages[:i+1]`; the characters between the two are the
assistant's reply (its content plus the end-of-turn marker). After tokenizing the whole text once, a
token is labelled iff its first character lies in such a span; every other token gets label -100
(ignored by the loss). This needs a template whose renderings of prefixes are prefixes of the whole,
which holds for the usual templates; one that does not is reported, not silently mislabelled.

Without a chat template (base models usually have none) we use a plain, documented format and say so
once:

    ### System:\n{system}\n\n          (only if there is a system message)
    ### User:\n{user}\n\n
    ### Assistant:\n{assistant}{eos}\n\n
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from slimtune.data.formats import Message
from slimtune.errors import DataError

IGNORE_INDEX = -100

_PLAIN_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}
_warned_plain = False


@dataclass
class Encoded:
    """One tokenized example. `labels[t] == input_ids[t]` on learned tokens, else -100."""

    input_ids: list[int]
    labels: list[int]
    source: str
    truncated: bool = False
    # Vision-language examples (data/vision_render.py): per-token ids the model also takes (padded with 0,
    # e.g. Qwen's mm_token_type_ids), and the processor's image tensors (pixel_values, image_grid_thw ...).
    token_extras: dict[str, list[int]] = field(default_factory=dict)
    vision: dict[str, Any] = field(default_factory=dict)

    @property
    def num_labelled(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


class ChatRenderer:
    """Turns message lists into text with the tokenizer's chat template, or the plain fallback."""

    def __init__(self, tokenizer) -> None:
        global _warned_plain
        self.tokenizer = tokenizer
        self.uses_template = bool(getattr(tokenizer, "chat_template", None))
        if not self.uses_template and not _warned_plain:
            _warned_plain = True
            print(
                "slimtune: the tokenizer has no chat template; using the plain '### User: / ### Assistant:' "
                "prompt format (see the README)", file=sys.stderr,
            )

    def render(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        if self.uses_template:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        eos = self.tokenizer.eos_token or ""
        parts = []
        for message in messages:
            ending = eos if message["role"] == "assistant" else ""
            parts.append(f"{_PLAIN_HEADERS[message['role']]}{message['content']}{ending}\n\n")
        if add_generation_prompt:
            parts.append(_PLAIN_HEADERS["assistant"])
        return "".join(parts)

    def encode_text(self, text: str, with_offsets: bool = False):
        # Templates carry their own BOS text; the plain format gets the tokenizer's usual specials.
        return self.tokenizer(
            text, add_special_tokens=not self.uses_template, return_offsets_mapping=with_offsets
        )

    def encode_prompt(self, messages: list[Message]) -> list[int]:
        """Token ids of a prompt ending where the assistant's reply should begin."""
        return list(self.encode_text(self.render(messages, add_generation_prompt=True))["input_ids"])

    def encode(self, messages: list[Message], source: str, max_length: int) -> Encoded:
        """Tokenize a conversation; label the assistant turns; keep at most `max_length` tokens."""
        full = self.render(messages)
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:index], add_generation_prompt=True)
            turn = self.render(messages[: index + 1])
            if not (full.startswith(prompt) and full.startswith(turn)):
                raise DataError(
                    f"{source}: the chat template renders a conversation prefix differently from the whole "
                    "conversation, so prompt tokens cannot be masked reliably; use a tokenizer whose template "
                    "is prefix-stable or remove the chat template to use the plain format"
                )
            spans.append((len(prompt), len(turn)))
        encoding = self.encode_text(full, with_offsets=True)
        ids = list(encoding["input_ids"])
        labels = [IGNORE_INDEX] * len(ids)
        for position, (char_start, char_end) in enumerate(encoding["offset_mapping"]):
            if char_end > char_start and any(start <= char_start < end for start, end in spans):
                labels[position] = ids[position]
        return Encoded(ids[:max_length], labels[:max_length], source, truncated=len(ids) > max_length)
