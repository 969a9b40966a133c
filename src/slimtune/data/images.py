"""Images in conversations: content parts, LLaMA-Factory's `<image>` placeholders, loading files.

A message's `content` is a string or a list of parts, normalised to

    {"type": "text", "text": "..."}     and     {"type": "image", "image": REF}

where REF is an absolute file path or a `data:image/...;base64,...` URL. Accepted on input:
- `{"type": "image", "image": PATH}` and `{"type": "image_url", "image_url": {"url": URL_OR_PATH}}`
  (OpenAI's form; a bare string url is accepted too);
- LLaMA-Factory's form: `<image>` placeholders in the text of `messages` / `conversations` plus an
  `images` list, one path per placeholder, in order.
Relative paths are relative to the data file. Remote URLs (http, https, ...) are refused: data never
comes from the network. Images are decoded with PIL, converted to RGB and, if larger than the pixel
budget, scaled down (aspect ratio kept) so that width * height <= max_pixels.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from pathlib import Path
from typing import Any

from slimtune.errors import DataError

IMAGE_PLACEHOLDER = "<image>"


def data_dir(source: str) -> Path:
    """The directory of the data file a row `source` ("path:line") comes from; the working directory for
    a source that is no file (a command-line option)."""
    return Path(source.rsplit(":", 1)[0]).parent if ":" in source else Path.cwd()


def resolve_ref(ref: Any, source: str, where: str) -> str:
    """An image reference as an absolute path or a data: URL; remote URLs are refused."""
    if not isinstance(ref, str) or not ref.strip():
        raise DataError(f"{source}: {where} must be an image path or a data: URL, got {ref!r:.60}")
    if ref.startswith("data:"):
        return ref
    if ref.startswith("file://"):
        ref = ref[len("file://"):]
    elif "://" in ref:
        raise DataError(f"{source}: {where} is a remote URL ({ref:.60}); slimtune never fetches data from the "
                        "network: download the image and give its path (relative to the data file)")
    path = Path(ref).expanduser()
    return str(path if path.is_absolute() else (data_dir(source) / path).resolve())


def parse_parts(parts: Any, source: str, where: str) -> list[dict[str, str]]:
    """A content list in any accepted form -> normalised text and image parts."""
    if not isinstance(parts, list) or not parts:
        raise DataError(f"{source}: {where} must be a string or a non-empty list of content parts")
    normalised = []
    for index, part in enumerate(parts):
        at = f"{where}[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            normalised.append({"type": "text", "text": part["text"]})
        elif kind == "image" and "image" in part:
            normalised.append({"type": "image", "image": resolve_ref(part["image"], source, f"{at}.image")})
        elif kind == "image_url" and "image_url" in part:
            url = part["image_url"]
            url = url.get("url") if isinstance(url, dict) else url
            normalised.append({"type": "image", "image": resolve_ref(url, source, f"{at}.image_url.url")})
        else:
            raise DataError(f"{source}: {where} must be a string or a list of content parts, but {at} is a "
                            f"{type(part).__name__} ({part!r:.40}), not a part: use {{\"type\": \"text\", \"text\": ...}}, "
                            "{\"type\": \"image\", \"image\": PATH} or {\"type\": \"image_url\", \"image_url\": "
                            "{\"url\": \"data:...\"}}")
    return normalised


def expand_placeholders(messages: list[dict[str, Any]], images: Any, source: str) -> list[dict[str, Any]]:
    """LLaMA-Factory's form: each `<image>` in the text becomes the next image of `images`."""
    if not isinstance(images, list):
        raise DataError(f"{source}: 'images' must be a list of image paths, got {type(images).__name__}")
    count = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages if isinstance(m["content"], str))
    if count != len(images):
        raise DataError(f"{source}: {count} '{IMAGE_PLACEHOLDER}' placeholder(s) in the text but {len(images)} "
                        f"image(s) in 'images': put one '{IMAGE_PLACEHOLDER}' in the text for each image")
    refs = iter(resolve_ref(ref, source, f"images[{i}]") for i, ref in enumerate(images))
    expanded = []
    for message in messages:
        content = message["content"]
        if not isinstance(content, str) or IMAGE_PLACEHOLDER not in content:
            expanded.append(message)
            continue
        parts: list[dict[str, str]] = []
        for number, piece in enumerate(content.split(IMAGE_PLACEHOLDER)):
            if number:
                parts.append({"type": "image", "image": next(refs)})
            if piece:
                parts.append({"type": "text", "text": piece})
        expanded.append({**message, "content": parts})
    return expanded


def image_refs(messages: list[dict[str, Any]]) -> list[str]:
    """Every image reference of a conversation, in order."""
    return [part["image"] for m in messages if isinstance(m["content"], list)
            for part in m["content"] if part["type"] == "image"]


def text_only(messages: list[dict[str, Any]], source: str, model: str = "the model") -> list[dict[str, Any]]:
    """Messages for a text-only model: text parts joined; an image part is an error naming the fix."""
    if image_refs(messages):
        raise DataError(f"{source}: the example has an image, but {model} is a text-only model: use a "
                        "vision-language model (e.g. a Qwen2.5-VL or LLaVA directory) or remove the image")
    return [{**m, "content": "".join(p["text"] for p in m["content"])} if isinstance(m["content"], list) else m
            for m in messages]


def load_image(ref: str, source: str, max_pixels: int | None = None):
    """The image at `ref` (a path or data: URL) as an RGB PIL image within `max_pixels`."""
    from PIL import Image, UnidentifiedImageError

    shown = ref if not ref.startswith("data:") else ref[:40] + "..."
    try:
        if ref.startswith("data:"):
            header, _, payload = ref.partition(",")
            if ";base64" not in header:
                raise DataError(f"{source}: image data URL '{shown}' is not base64: write data:image/png;base64,...")
            raw = io.BytesIO(base64.b64decode(payload, validate=True))
        else:
            raw = io.BytesIO(Path(ref).read_bytes())
        with Image.open(raw) as opened:
            image = opened.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{source}: image '{shown}' does not exist: fix the path (relative paths are relative "
                        "to the data file)") from None
    except (OSError, UnidentifiedImageError, binascii.Error, ValueError) as exc:
        raise DataError(f"{source}: image '{shown}' cannot be read ({type(exc).__name__}: {str(exc)[:80]}): "
                        "replace it with a PNG, JPEG or WebP file") from None
    if max_pixels and image.width * image.height > max_pixels:
        scale = math.sqrt(max_pixels / (image.width * image.height))
        size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
    return image


def message_text(message: dict) -> str:
    """A message's text (text parts joined; image parts left out)."""
    content = message["content"]
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)


__all__ = ["IMAGE_PLACEHOLDER", "expand_placeholders", "image_refs", "load_image", "message_text", "parse_parts",
           "resolve_ref", "text_only"]
