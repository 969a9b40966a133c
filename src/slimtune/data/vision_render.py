"""Render image + text conversations with a vision-language model's processor, with a loss mask.

The processor's chat template turns each image part into the model's placeholder (Qwen:
`<|vision_start|><|image_pad|><|vision_end|>`, LLaVA: `<image>`), and calling the processor expands
each placeholder into as many image tokens as the image has features, so token counts depend on the
image sizes. The mask is therefore found in tokens, not characters: for each assistant turn i,

    start_i = len(tokens(render(messages[:i], generation prompt)))
    end_i   = len(tokens(render(messages[:i+1])))

(both with the images of that prefix), and tokens [start_i, end_i) of the whole conversation are
labelled; every other token, and every image token wherever it is, gets -100. The prefixes' tokens
must be prefixes of the whole conversation's tokens, which is checked, as `ChatRenderer` checks text.
"""

from __future__ import annotations

from typing import Any

import torch

from slimtune.data.formats import Message
from slimtune.data.images import image_refs, load_image
from slimtune.data.render import IGNORE_INDEX, Encoded
from slimtune.errors import DataError

# Processor outputs that are per token (padded like input_ids); the rest except these are image tensors.
_TOKEN_KEYS = ("mm_token_type_ids",)
_TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def _template_messages(messages: list[Message]) -> list[Message]:
    """Messages as chat templates expect them: image parts without the file reference."""
    return [{**m, "content": [{"type": "image"} if p["type"] == "image" else p for p in m["content"]]}
            if isinstance(m["content"], list) else m for m in messages]


class VisionRenderer:
    """`ChatRenderer`'s interface for a vision-language processor; images scaled to `max_pixels`."""

    uses_template = True

    def __init__(self, processor, max_pixels: int | None = None) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_pixels = max_pixels
        token = getattr(processor, "image_token", None) or "<image>"
        self.image_token_id = getattr(processor, "image_token_id", None) or self.tokenizer.convert_tokens_to_ids(token)

    def render(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        return self.processor.apply_chat_template(_template_messages(messages), tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def images(self, messages: list[Message], source: str) -> list:
        return [load_image(ref, source, self.max_pixels) for ref in image_refs(messages)]

    def process(self, text: str, images: list, source: str) -> dict[str, torch.Tensor]:
        """The processor's tensors for one text (batch of 1)."""
        try:
            return dict(self.processor(text=[text], images=images or None, return_tensors="pt"))
        except (ValueError, IndexError) as exc:
            raise DataError(f"{source}: the processor rejected the example ({str(exc)[:160]}): check that each "
                            "image part has one image and the images are valid") from None

    def prompt_inputs(self, messages: list[Message], source: str = "prompt") -> dict[str, torch.Tensor]:
        """Model inputs (batch of 1) of a prompt ending where the assistant's reply begins."""
        return self.process(self.render(messages, add_generation_prompt=True), self.images(messages, source), source)

    def encode_prompt(self, messages: list[Message]) -> list[int]:
        return self.prompt_inputs(messages)["input_ids"][0].tolist()

    def _length(self, messages: list[Message], images: list, generation_prompt: bool, source: str,
                whole: list[int]) -> int:
        count = sum(len(image_refs([m])) for m in messages)
        ids = self.process(self.render(messages, generation_prompt), images[:count], source)["input_ids"][0].tolist()
        if whole[: len(ids)] != ids:
            raise DataError(f"{source}: the chat template renders a conversation prefix differently from the whole "
                            "conversation, so prompt tokens cannot be masked reliably; use a processor whose template "
                            "is prefix-stable")
        return len(ids)

    def encode(self, messages: list[Message], source: str, max_length: int) -> Encoded:
        """Tokens, labels (assistant turns only, never image tokens) and image tensors of a conversation."""
        images = self.images(messages, source)
        full = self.process(self.render(messages), images, source)
        ids = full["input_ids"][0].tolist()
        labels = [IGNORE_INDEX] * len(ids)
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = self._length(messages[:index], images, True, source, ids)
            end = self._length(messages[: index + 1], images, False, source, ids)
            labels[start:end] = ids[start:end]
        labels = [IGNORE_INDEX if token == self.image_token_id else label for token, label in zip(ids, labels)]
        if len(ids) > max_length and self.image_token_id in ids[max_length:]:
            raise DataError(f"{source}: data.max_length={max_length} cuts into the example's image tokens "
                            f"({ids.count(self.image_token_id)} of them); raise data.max_length or lower "
                            "data.image_max_pixels")
        extras = {key: full[key][0].tolist()[:max_length] for key in _TOKEN_KEYS if key in full}
        vision = {key: value for key, value in full.items() if key not in _TEXT_KEYS and key not in _TOKEN_KEYS}
        return Encoded(ids[:max_length], labels[:max_length], source, truncated=len(ids) > max_length,
                       token_extras=extras, vision=vision)


def stack_vision(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The image tensors of several examples as one batch: concatenated along the first axis (Qwen's
    patches (n_patches, dim) and grids (n_images, 3), LLaVA's images (n_images, 3, H, W)); examples
    without images add nothing."""
    keys = sorted({key for example in examples for key in example})
    return {key: torch.cat([example[key] for example in examples if key in example]) for key in keys}


__all__ = ["VisionRenderer", "stack_vision"]
