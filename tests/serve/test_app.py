"""The OpenAI-compatible routes, driven over HTTP with the official `openai` client against a real
uvicorn server (tests/serve/conftest.py): replies equal `slimtune generate`'s, streams add up to the
non-streamed reply, concurrent requests for different adapters each get their own adapter, and every
bad request is a 4xx in OpenAI's error shape while the server keeps serving.
"""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest
import torch

from serve.support import API_KEY, ADAPTERS

PROMPT = "hi there"
MODELS = [None, *ADAPTERS]  # None: the base model


@pytest.fixture(scope="module")
def references(tiny_model_dir, adapter_root):
    """Greedy 16-token replies to PROMPT from `slimtune.api.generate` on each model, loaded the CLI's way."""
    from slimtune.api import generate, load_run
    from slimtune.models import load_model

    replies = {}
    for name in MODELS:
        model, tokenizer = load_run(adapter_root / name) if name else load_model(str(tiny_model_dir))[:2]
        replies[name] = generate(model, tokenizer, PROMPT, max_new_tokens=16)
    assert len(set(replies.values())) == len(replies), f"the models must reply differently, else the test is void: {replies}"
    return replies


def model_id(server, name):
    return name or server.state.base_name


def chat(client, server, name, **kwargs):
    kwargs = {"max_tokens": 16, "temperature": 0, **kwargs}
    return client.chat.completions.create(model=model_id(server, name),
                                          messages=[{"role": "user", "content": PROMPT}], **kwargs)


def test_models_lists_base_and_adapters_with_parent(client, server):
    cards = {m.id: m for m in client.models.list().data}
    base = server.state.base_name
    assert set(cards) == {base, *ADAPTERS}, f"the base and both adapters must be listed: {sorted(cards)}"
    assert cards[base].parent is None and all(cards[a].parent == base for a in ADAPTERS), \
        "adapters name the base model as their parent; the base has none"
    assert client.models.retrieve("alpha").id == "alpha"


@pytest.mark.parametrize("name", MODELS)
def test_chat_equals_slimtune_generate(client, server, references, name):
    reply = chat(client, server, name)
    choice = reply.choices[0]
    # `generate` strips surrounding whitespace from its reply; the API returns the text as decoded.
    assert choice.message.content.strip() == references[name], \
        f"greedy chat reply of {name or 'the base'} must equal slimtune generate's"
    assert choice.message.role == "assistant" and reply.model == model_id(server, name)
    assert reply.usage.completion_tokens <= 16 and reply.usage.total_tokens == \
        reply.usage.prompt_tokens + reply.usage.completion_tokens
    rendered = f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    markers = 2 * (len("<|im_start|>") - 1) + (len("<|im_end|>") - 1)
    assert reply.usage.prompt_tokens == len(rendered) - markers, \
        "prompt tokens: one per byte of the ChatML prompt, one per special marker"


@pytest.mark.parametrize("name", MODELS)
def test_streamed_chat_adds_up_to_the_reply(client, server, name):
    whole = chat(client, server, name)
    chunks = list(chat(client, server, name, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant", "the first chunk carries the role"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content, "the streamed deltas must add up to the non-streamed reply"
    finishing = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishing[-1] == whole.choices[0].finish_reason and not any(finishing[:-1]), \
        "only the last chunk of the choice carries finish_reason"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens, \
        "include_usage adds a final chunk with the usage and no choices"


def reference_completion(tiny_model_dir, adapter_dir, prompt: str, steps: int) -> str:
    """Greedy continuation by transformers' own generate on a freshly loaded model (+ adapter)."""
    from slimtune.adapters import load_lora_adapter
    from slimtune.models import load_model

    model, tokenizer, _ = load_model(str(tiny_model_dir))
    if adapter_dir is not None:
        load_lora_adapter(model, adapter_dir)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=steps, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("name", MODELS)
def test_completions_stream_and_not(client, server, tiny_model_dir, adapter_root, name):
    prompt = "The cat sat"
    kwargs = {"model": model_id(server, name), "prompt": prompt, "max_tokens": 12, "temperature": 0}
    whole = client.completions.create(**kwargs)
    assert whole.choices[0].text == reference_completion(tiny_model_dir, adapter_root / name if name else None,
                                                         prompt, 12), "greedy completion must equal transformers' generate"
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 12 and whole.usage.prompt_tokens == len(prompt)


def test_several_prompts_get_one_choice_each(client, server):
    reply = client.completions.create(model="beta", prompt=["The cat sat", "A dog ran"], max_tokens=6, temperature=0)
    alone = [client.completions.create(model="beta", prompt=p, max_tokens=6, temperature=0).choices[0].text
             for p in ("The cat sat", "A dog ran")]
    assert [c.text for c in sorted(reply.choices, key=lambda c: c.index)] == alone


def test_concurrent_requests_for_different_adapters_get_their_own(server, references):
    from openai import OpenAI

    results: dict[str | None, list[str]] = {name: [] for name in MODELS}
    barrier = threading.Barrier(len(MODELS) * 2)

    def ask(name):
        with OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60) as own:
            barrier.wait()
            reply = own.chat.completions.create(model=model_id(server, name), max_tokens=16, temperature=0,
                                                messages=[{"role": "user", "content": PROMPT}])
            results[name].append(reply.choices[0].message.content.strip())

    threads = [threading.Thread(target=ask, args=(name,)) for name in MODELS for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for name in MODELS:
        assert results[name] == [references[name]] * 2, f"each concurrent request for {name!r} gets its own model's reply"


def test_stop_strings_and_max_tokens(client, server):
    whole = chat(client, server, "alpha", max_tokens=16).choices[0].message.content
    cut = whole[3:5]
    stopped = chat(client, server, "alpha", max_tokens=16, stop=[cut, "\x00never"])
    assert stopped.choices[0].message.content == whole[: whole.index(cut)], "the reply ends before the stop string"
    assert stopped.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(client, server, "alpha", stop=cut, stream=True))
    assert streamed == whole[: whole.index(cut)], "a streamed reply never shows any part of the stop string"
    short = chat(client, server, "alpha", max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3


def test_seeded_sampling_repeats(client, server):
    kwargs = {"temperature": 1.0, "top_p": 0.9, "max_tokens": 16}
    first = chat(client, server, "beta", seed=7, **kwargs).choices[0].message.content
    again = chat(client, server, "beta", seed=7, **kwargs).choices[0].message.content
    other = [chat(client, server, "beta", seed=s, **kwargs).choices[0].message.content for s in (8, 9)]
    assert first == again, "the same seed gives the same sampled reply"
    assert any(o != first for o in other), "other seeds give other replies"


# --- bad requests: 4xx in OpenAI's shape, and the server keeps serving ---------------------------------


def post(server, path, content, headers=None):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json", **(headers or {})}
    return httpx.post(server.url + path, content=content, headers=headers, timeout=30)


def assert_openai_error(response, status, *fragments):
    assert response.status_code == status, f"expected {status}, got {response.status_code}: {response.text}"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, f"OpenAI's error shape: {error}"
    for fragment in fragments:
        assert fragment in error["message"], f"{fragment!r} must be in the message: {error['message']!r}"
    return error


def test_unknown_model_is_404(client, server):
    with pytest.raises(openai.NotFoundError) as caught:
        chat(client, server, "gamma")
    assert "gamma" in str(caught.value) and "alpha" in str(caught.value), "the message lists what is offered"


def test_malformed_json_is_400(server, client, references):
    assert_openai_error(post(server, "/v1/chat/completions", b'{"model": "alpha", "messages": [}'), 400, "malformed JSON")
    error = assert_openai_error(post(server, "/v1/chat/completions", json.dumps({"model": "alpha"})), 400, "messages")
    assert error["param"] == "messages"
    assert_openai_error(post(server, "/v1/completions", json.dumps({"model": "alpha", "prompt": "x", "temperature": 9})),
                        400, "temperature")
    assert chat(client, server, "alpha").choices[0].message.content.strip() == references["alpha"], \
        "the server keeps serving after bad requests"


@pytest.mark.parametrize("extra, fragment", [
    ({"n": 2}, "'n' = 2 is not supported"),
    ({"logprobs": True}, "'logprobs'"),
    ({"max_tokens": 301}, "limit of 300"),
    ({"stop": [str(i) for i in range(17)]}, "at most 16"),
])
def test_unsupported_or_over_limit_fields_are_400(server, extra, fragment):
    body = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], **extra}
    assert_openai_error(post(server, "/v1/chat/completions", json.dumps(body)), 400, fragment)


def test_prompt_limits(server):
    long_prompt = {"model": "alpha", "prompt": "x" * 201}
    error = assert_openai_error(post(server, "/v1/completions", json.dumps(long_prompt)), 400, "201 tokens",
                                "limit of 200")
    assert error["param"] == "prompt"
    huge = {"model": "alpha", "prompt": "x" * 30_000}
    assert_openai_error(post(server, "/v1/completions", json.dumps(huge)), 413, "20000 bytes")
    chunked = post(server, "/v1/completions", (json.dumps(huge).encode()[i: i + 4096] for i in range(0, 30_100, 4096)))
    assert_openai_error(chunked, 413, "20000 bytes")  # no Content-Length: counted while reading


def test_prompt_plus_max_tokens_must_fit_the_context(server):
    from dataclasses import replace

    from slimtune.serve import ServeLimits
    from slimtune.serve.errors import APIError
    from slimtune.serve.schemas import CompletionRequest

    state = replace(server.state, limits=ServeLimits(max_prompt_tokens=1000, max_tokens=1000))
    assert state.context_length == 512, "the tiny model's max_position_embeddings"
    with pytest.raises(APIError, match="exceed the model's context of 512 tokens"):
        state.sampling(CompletionRequest(model="alpha", prompt="x", max_tokens=200), 400, "prompt")
    fitted = state.sampling(CompletionRequest(model="alpha", prompt="x"), 400, "prompt")
    assert fitted.max_tokens == 112, "without max_tokens the default shrinks to fit the context"


def test_too_many_requests_in_flight_is_429(server, client, references):
    from openai import OpenAI

    limit = server.state.limits.max_concurrent
    streams = []
    try:
        for _ in range(limit):  # long streams hold their slots until closed
            own = OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
            stream = own.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=300, stream=True, extra_body={"ignore_eos": True})
            next(iter(stream))
            streams.append((own, stream))
        with pytest.raises(openai.RateLimitError) as caught:
            chat(client, server, "beta")
        assert caught.value.status_code == 429 and "busy" in str(caught.value)
    finally:
        for own, stream in streams:
            stream.close()
            own.close()
    # Closed streams free their slots: the next request is served.
    for _ in range(100):
        if server.state.inflight == 0:
            break
        threading.Event().wait(0.05)
    assert chat(client, server, "alpha").choices[0].message.content.strip() == references["alpha"]
