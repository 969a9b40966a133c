"""`model: "auto"` over real HTTP: the server routes each request to the adapter whose signature is closest to
the prompt, reports it in the response's `model` field and its log, and answers with the base model below the
threshold. Signatures are made by hand here (one centroid: a prompt's own representation, computed naively),
so which adapter must win is known without the router."""

from __future__ import annotations

import logging

import openai
import pytest
import torch

from serve.support import API_KEY, start_server, write_adapter

ONE, TWO, OTHER = "repeat the word apple", "hello there, how are you today?", "zz"


def naive(model, tokenizer, text: str, layer: int) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0]
    pooled = hidden[1:].mean(0)
    return pooled / pooled.norm()


@pytest.fixture(scope="module")
def routed(tiny_model_dir, tmp_path_factory):
    from slimtune.models import load_model
    from slimtune.routing import Signature
    from slimtune.serve import build_app

    root = tmp_path_factory.mktemp("route-root")
    model, tokenizer, _ = load_model(str(tiny_model_dir))
    vectors = {text: naive(model, tokenizer, text, 1) for text in (ONE, TWO, OTHER)}
    assert all(float(vectors[OTHER] @ vectors[t]) < 0.999 for t in (ONE, TWO)), "OTHER must be below the threshold"
    for name, text, seed in (("one", ONE, 31), ("two", TWO, 32)):
        write_adapter(tiny_model_dir, root / name, ["q_proj", "v_proj"], seed, scale=1.0)
        Signature(vectors[text], vectors[text][None], 0.999, 1, str(tiny_model_dir), 1).save(root / name)
    write_adapter(tiny_model_dir, root / "plain", ["q_proj"], 33)  # no signature: never a candidate
    app = build_app(str(tiny_model_dir), {"one": "one", "two": "two", "plain": "plain"}, adapter_root=root,
                    api_key=API_KEY, device="cpu", route_name="pick")
    running = start_server(app)
    with openai.OpenAI(base_url=running.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60) as client:
        yield running, client
    running.stop()


def ask(client, model, text, **kwargs):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], max_tokens=8,
                                          temperature=0, **kwargs)


@pytest.mark.parametrize(("text", "adapter"), [(ONE, "one"), (TWO, "two"), (OTHER, None)])
def test_route_name_picks_the_closest_adapter_or_the_base(routed, caplog, text, adapter):
    running, client = routed
    caplog.set_level(logging.INFO, logger="slimtune.serve")
    response = ask(client, "pick", text)
    expected = adapter or running.state.base_name
    assert response.model == expected, f"{text!r} must be routed to {expected}, the response says {response.model}"
    direct = ask(client, expected, text)
    assert response.choices[0].message.content == direct.choices[0].message.content, "routed reply != direct reply"
    assert any(f"routed to {adapter or 'the base model'}" in r.getMessage() for r in caplog.records), \
        "the server log must name the chosen adapter"


def test_route_name_is_listed_streamed_and_reserved(routed):
    running, client = routed
    assert "pick" in {m.id for m in client.models.list().data}, "/v1/models must list the route name"
    chunks = list(ask(client, "pick", ONE, stream=True))
    assert {c.model for c in chunks} == {"one"}, "every chunk of a routed stream names the chosen adapter"
    with pytest.raises(openai.APIStatusError) as caught:
        client.post("/load_lora_adapter", body={"lora_name": "pick", "lora_path": "one"}, cast_to=object)
    assert caught.value.status_code == 400 and "routing name" in caught.value.message
