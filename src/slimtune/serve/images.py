"""Image parts in chat requests (vision-language models), kept apart from the text path.

An OpenAI chat request may hold `{"type": "image_url", "image_url": {"url": ...}}` parts. Accepted urls:
- `data:image/...;base64,...` (the image travels in the request);
- a local path or `file://` URL, only inside the image root the server was started with
  (`--image-root`); without one, local paths are refused;
- never a remote URL: the server fetches nothing.
Each request holds at most `max_images` images of at most `max_image_bytes` bytes each, and each image
is scaled to `max_pixels` like training data; a request over a limit gets a 4xx naming it.

Image requests are generated on the engine thread between decode steps (`Engine.call`), one at a time,
with the requested adapter active, by the same code as `slimtune generate --image`, so the replies are
the same. They do not join the continuous batch: text requests wait while an image request runs.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimtune.errors import DataError
from slimtune.serve.errors import APIError


@dataclass(frozen=True)
class ImageLimits:
    """Where local image paths may point, and how much image data one request may carry."""

    root: Path | None = None
    max_images: int = 4
    max_image_bytes: int = 8 * 2**20
    max_pixels: int = 768 * 768


def has_images(body) -> bool:
    """True when any message of a chat request holds an image part."""
    return any(isinstance(m.content, list) and any(isinstance(p, dict) and p.get("type") in ("image_url", "image")
                                                   for p in m.content) for m in body.messages)


def _image_ref(part: dict[str, Any], where: str, limits: ImageLimits) -> str:
    """A checked reference (data: URL or resolved path inside the root) for one image part."""
    url = part.get("image_url", part.get("image"))
    url = url.get("url") if isinstance(url, dict) else url
    if not isinstance(url, str) or not url:
        raise APIError(400, f"{where}: an image_url part needs image_url.url (a data: URL)", param=where)
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise APIError(400, f"{where}: a data: URL must be base64 (data:image/png;base64,...)", param=where)
        size = len(payload) * 3 // 4
        if size > limits.max_image_bytes:
            raise APIError(413, f"{where}: the image is {size} bytes; the limit is {limits.max_image_bytes} bytes per "
                           "image (max_image_bytes)", param=where)
        try:
            base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{where}: the data: URL is not valid base64", param=where) from None
        return url
    if url.startswith("file://"):
        url = url[len("file://"):]
    elif "://" in url:
        raise APIError(400, f"{where}: remote image URLs are not fetched; send the image as a data: URL", param=where)
    if limits.root is None:
        raise APIError(400, f"{where}: local image paths are refused (the server has no --image-root); send the image "
                       "as a data: URL", param=where)
    root = limits.root.resolve()
    path = (root / url).resolve()
    if not path.is_relative_to(root):
        raise APIError(403, f"{where}: image path is outside the image root", param=where)
    if not path.is_file():
        raise APIError(400, f"{where}: no image at that path inside the image root", param=where)
    if path.stat().st_size > limits.max_image_bytes:
        raise APIError(413, f"{where}: the image is {path.stat().st_size} bytes; the limit is {limits.max_image_bytes} "
                       "bytes per image (max_image_bytes)", param=where)
    return str(path)


def image_conversation(body, limits: ImageLimits) -> list[dict[str, Any]]:
    """The request's messages with text and checked image parts (slimtune's normalised form)."""
    roles = {"developer": "system"}
    messages, count = [], 0
    for index, message in enumerate(body.messages):
        if not isinstance(message.content, list):
            messages.append({"role": roles.get(message.role, message.role), "content": message.text(index)})
            continue
        parts = []
        for number, part in enumerate(message.content):
            where = f"messages.{index}.content.{number}"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": str(part.get("text", ""))})
            elif kind in ("image_url", "image"):
                count += 1
                if count > limits.max_images:
                    raise APIError(400, f"the request holds more than {limits.max_images} images, the limit per "
                                   "request (max_images)", param="messages")
                parts.append({"type": "image", "image": _image_ref(part, where, limits)})
            else:
                raise APIError(400, f"{where}: unsupported content part type {kind!r}: use text or image_url",
                               param=where)
        messages.append({"role": roles.get(message.role, message.role), "content": parts})
    return messages


def generate_image_reply(state, body, adapter: str | None, limits: ImageLimits):
    """A future of (reply, prompt tokens, completion tokens) for an image request, run on the engine thread."""
    from slimtune.data.vision_render import VisionRenderer
    from slimtune.evaluate import generate_replies

    processor = getattr(state, "processor", None)
    if processor is None:
        raise APIError(400, f"model {state.base_name!r} is a text-only model: image parts need a vision-language "
                       "model", param="messages")
    if body.stream:
        raise APIError(400, "streamed replies to image requests are not supported yet: set stream to false",
                       param="stream")
    conversation = image_conversation(body, limits)
    renderer = VisionRenderer(processor, limits.max_pixels)
    max_tokens = body.requested_max_tokens() or state.limits.max_tokens
    engine = state.engine

    def run() -> tuple[str, int, int]:
        previous = engine.adapters.active
        engine.adapters.set_active(adapter)
        try:
            prompt_tokens = len(renderer.prompt_inputs(conversation)["input_ids"][0])
            reply = generate_replies(engine.model, engine.tokenizer, [conversation], max_tokens, 1,
                                     1.0 if body.temperature is None else body.temperature,  # OpenAI's default
                                     1.0 if body.top_p is None else body.top_p,
                                     renderer=renderer)[0]
        except DataError as exc:
            raise APIError(400, str(exc).replace("prompt: ", "", 1), param="messages") from None
        finally:
            engine.adapters.set_active(previous)
        return reply, prompt_tokens, len(engine.tokenizer(reply, add_special_tokens=False)["input_ids"])

    return engine.call(run)




async def image_chat_completion(state, body, adapter: str | None) -> dict:
    """The chat.completion response to a request with image parts (non-streamed)."""
    import asyncio

    from slimtune.serve import schemas

    limits = getattr(state, "image_limits", None) or ImageLimits()
    reply, prompt_tokens, completion = await asyncio.wrap_future(generate_image_reply(state, body, adapter, limits))
    max_tokens = body.requested_max_tokens() or state.limits.max_tokens
    reason = "length" if completion >= max_tokens else "stop"
    return schemas.chat_completion(schemas.new_id("chatcmpl"), body.model, [reply], [reason],
                                   schemas.usage(prompt_tokens, completion))


__all__ = ["ImageLimits", "generate_image_reply", "has_images", "image_chat_completion", "image_conversation"]
