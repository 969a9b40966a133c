"""Image data: content parts, LLaMA-Factory placeholders, paths, loss masks, bad input (file:line + fix)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_tokenizer
from slimtune.data import IGNORE_INDEX, load_dataset, pad_batch
from slimtune.errors import DataError
from slimtune.models.vision import load_processor
from tiny_vl import make_llava_dir, make_qwen_vl_dir, write_image


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    return make_qwen_vl_dir(tmp_path_factory.mktemp("qwen-vl"))


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    return make_llava_dir(tmp_path_factory.mktemp("llava"))


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def parts_row(image: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image", "image": image},
                                                      {"type": "text", "text": "colour?"}]},
                         {"role": "assistant", "content": answer}]}


def test_three_forms_give_the_same_tokens_and_images(tmp_path, qwen_dir):
    """Parts with a relative path, an image_url data: URL, and LLaMA-Factory's <image> + images list."""
    image = write_image(tmp_path / "data" / "img" / "red.png", (220, 20, 20))
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    rows = [
        parts_row("img/red.png", "red"),
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                   {"type": "text", "text": "colour?"}]},
                      {"role": "assistant", "content": "red"}]},
        {"conversations": [{"from": "human", "value": "<image>colour?"}, {"from": "gpt", "value": "red"}],
         "images": ["img/red.png"]},
    ]
    processor = load_processor(str(qwen_dir))
    for index, row in enumerate(rows):
        data = load_dataset(write_rows(tmp_path / "data" / f"d{index}.jsonl", [row]), processor.tokenizer,
                            processor=processor)
        example = data.examples[0]
        if index == 0:
            first = example
        assert example.input_ids == first.input_ids
        assert torch.equal(example.vision["pixel_values"], first.vision["pixel_values"])
        assert example.vision["image_grid_thw"].tolist() == [[1, 4, 4]]  # 56x56 px / 14 = 4x4 patches


def test_labels_cover_only_the_reply_never_image_or_prompt_tokens(tmp_path, qwen_dir):
    write_image(tmp_path / "img.png", (20, 200, 20))
    processor = load_processor(str(qwen_dir))
    tokenizer = processor.tokenizer
    row = {"messages": [
        {"role": "user", "content": [{"type": "image", "image": "img.png"}, {"type": "text", "text": "what?"}]},
        {"role": "assistant", "content": "green"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "still green"}]}
    example = load_dataset(write_rows(tmp_path / "d.jsonl", [row]), tokenizer, processor=processor).examples[0]
    labelled = [label for label in example.labels if label != IGNORE_INDEX]
    # Reference: the replies with their end-of-turn marker, tokenized alone (one token per byte + specials).
    expected = [t for reply in ("green", "still green")
                for t in tokenizer(f"{reply}<|im_end|>\n", add_special_tokens=False)["input_ids"]]
    assert labelled == expected
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    image_positions = [i for i, t in enumerate(example.input_ids) if t == image_id]
    assert len(image_positions) == 16 // 4  # 4x4 patches merged 2x2
    assert all(example.labels[i] == IGNORE_INDEX for i in image_positions)
    batch = pad_batch([example, example], tokenizer.pad_token_id, multiple_of=8)
    assert batch["pixel_values"].shape[0] == 2 * 16 and batch["image_grid_thw"].shape == (2, 3)
    assert batch["mm_token_type_ids"].shape == batch["input_ids"].shape


def test_llava_placeholders_expand_and_are_masked(tmp_path, llava_dir):
    write_image(tmp_path / "a.png", (200, 200, 20), size=(40, 30))
    processor = load_processor(str(llava_dir))
    rows = [{"messages": [{"role": "user", "content": "<image>colour?"}, {"role": "assistant", "content": "yellow"}],
             "images": ["a.png"]}]
    example = load_dataset(write_rows(tmp_path / "d.jsonl", rows), processor.tokenizer, processor=processor).examples[0]
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert example.input_ids.count(image_id) == 4  # (28 / 14)^2 patches, CLS dropped
    assert example.vision["pixel_values"].shape == (1, 3, 28, 28)
    labelled = [label for label in example.labels if label != IGNORE_INDEX]
    assert labelled == processor.tokenizer("yellow<|im_end|>\n", add_special_tokens=False)["input_ids"]


def test_image_max_pixels_scales_down_keeping_the_aspect(tmp_path):
    from slimtune.data.images import load_image

    path = write_image(tmp_path / "big.png", (1, 2, 3), size=(400, 200))
    image = load_image(str(path), "x:1", max_pixels=20_000)
    assert image.size == (200, 100)
    assert load_image(str(path), "x:1", max_pixels=None).size == (400, 200)


@pytest.mark.parametrize("row, message", [
    (parts_row("missing.png", "x"), "missing.png' does not exist: fix the path"),
    (parts_row("broken.png", "x"), "cannot be read"),
    (parts_row("https://example.com/a.png", "x"), "remote URL"),
    ({"messages": [{"role": "user", "content": "<image><image>two?"}, {"role": "assistant", "content": "x"}],
      "images": ["ok.png"]}, "2 '<image>' placeholder(s) in the text but 1 image(s)"),
    ({"messages": [{"role": "user", "content": "none?"}, {"role": "assistant", "content": "x"}],
      "images": ["ok.png"]}, "0 '<image>' placeholder(s) in the text but 1 image(s)"),
    ({"messages": [{"role": "user", "content": [{"type": "video", "video": "a.mp4"}]},
                   {"role": "assistant", "content": "x"}]}, "not a part: use"),
])
def test_bad_image_input_names_file_line_and_fix(tmp_path, qwen_dir, row, message):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    write_image(tmp_path / "ok.png", (1, 2, 3))
    path = write_rows(tmp_path / "d.jsonl", [parts_row("ok.png", "fine"), row])
    processor = load_processor(str(qwen_dir))
    with pytest.raises(DataError) as caught:
        load_dataset(path, processor.tokenizer, processor=processor)
    assert str(caught.value).startswith(f"{path}:2: ") and message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_image_part_for_a_text_only_model_is_refused(tmp_path):
    write_image(tmp_path / "ok.png", (1, 2, 3))
    path = write_rows(tmp_path / "d.jsonl", [
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, {"role": "assistant", "content": "yo"}]},
        parts_row("ok.png", "x")])
    with pytest.raises(DataError, match=rf"^{path}:2: the example has an image, but the model is a text-only model"):
        load_dataset(path, make_tiny_tokenizer())
    # Text parts alone are fine for a text-only model: joined into one string.
    data = load_dataset(write_rows(tmp_path / "t.jsonl", [
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, {"role": "assistant", "content": "yo"}]}]),
        make_tiny_tokenizer())
    assert data.conversations[0][0]["content"] == "hi"
