"""Serving image parts: a real server, the `openai` client, the same greedy reply as `slimtune generate
--image`; data: URLs, local paths only inside the image root, never remote; limits as 4xx."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest

from slimtune.api import generate, load_run
from slimtune.models.vision import run_processor
from tiny_vl import make_qwen_vl_dir, write_image


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from serve.support import start_server
    from test_vision_lora import run_config, train, write_colour_data

    from slimtune.serve.server import build_app

    root = tmp_path_factory.mktemp("vl-serve")
    model_dir = make_qwen_vl_dir(root / "model")
    train(run_config(model_dir, write_colour_data(root / "data"), root / "run"))
    app = build_app(str(model_dir), {"colours": str(root / "run")}, adapter_root=root, image_root=root / "data")
    server = start_server(app)
    yield root, server
    server.stop()


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def ask(server, model: str, *parts: dict, **kwargs):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": [
        *parts, {"type": "text", "text": "colour?"}]}], max_tokens=3, temperature=0, **kwargs)


def test_served_image_reply_equals_generate_with_image(served):
    root, server = served
    image = root / "data" / "img" / "blue.png"
    model, tokenizer = load_run(root / "run")
    expected = generate(model, tokenizer, "colour?", 3, images=[image], processor=run_processor(root / "run"))
    by_url = ask(server, "colours", {"type": "image_url", "image_url": {"url": data_url(image)}})
    assert by_url.choices[0].message.content == expected
    by_path = ask(server, "colours", {"type": "image_url", "image_url": {"url": "img/blue.png"}})
    assert by_path.choices[0].message.content == expected
    # The base model and a text request share the same server.
    ask(server, str(root / "model"), {"type": "image_url", "image_url": {"url": data_url(image)}})


@pytest.mark.parametrize("url, status, words", [
    ("https://example.com/a.png", 400, "remote image URLs are not fetched"),
    ("../run/adapter_config.json", 403, "outside the image root"),
    ("img/none.png", 400, "no image at that path"),
    ("data:image/png,abc", 400, "must be base64"),
])
def test_bad_image_urls_are_4xx(served, url, status, words):
    import openai

    _, server = served
    with pytest.raises(openai.APIStatusError) as caught:
        ask(server, "colours", {"type": "image_url", "image_url": {"url": url}})
    assert caught.value.status_code == status and words in caught.value.message


def test_image_count_limit_is_named(served):
    import openai

    root, server = served
    part = {"type": "image_url", "image_url": {"url": data_url(root / "data" / "img" / "red.png")}}
    with pytest.raises(openai.APIStatusError) as caught:
        ask(server, "colours", *[part] * 5)
    assert caught.value.status_code == 400 and "more than 4 images" in caught.value.message
