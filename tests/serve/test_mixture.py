"""Weighted mixtures of adapters as a request's `model` ('one:0.7+two:0.3'), over real HTTP: greedy replies equal
those of the `cat` combination of the same adapters and weights, loaded as an adapter of its own, while
mixtures, single adapters and the combination share decode batches; bad mixtures are 4xx."""

from __future__ import annotations

import threading

import openai
import pytest

from serve.support import API_KEY, start_server, write_adapter

PROMPTS = ["Name three colours.", "What is the capital of France?"]
MIXTURES = {"one:0.7+two:0.3": "cat73", "two:1.5+one:-0.5": "cat_neg"}


def mix_server(model_dir, root, scale, dora=True):
    """A server with LoRA adapters one and two, a DoRA adapter, and the cat combination of each mixture."""
    from slimtune.combine import combine_adapters
    from slimtune.methods.multi import parse_mixture
    from slimtune.serve import ServeLimits, build_app

    write_adapter(model_dir, root / "one", ["q_proj", "v_proj"], 21, scale=scale)
    write_adapter(model_dir, root / "two", ["v_proj", "down_proj", "o_proj"], 22, scale=scale, rslora=True)
    if dora:
        write_adapter(model_dir, root / "dora", ["v_proj"], 23, use_dora=True)
    for spec, name in MIXTURES.items():
        mixture = parse_mixture(spec)
        combine_adapters([root / n for n in mixture.names], root / name, [w for _, w in mixture.parts], "cat")
    adapters = {name: name for name in ("one", "two", *(["dora"] if dora else []), *MIXTURES.values())}
    app = build_app(str(model_dir), adapters, adapter_root=root, api_key=API_KEY, device="cpu",
                    limits=ServeLimits(max_tokens=64, default_max_tokens=16, max_batch=16))
    return start_server(app)


@pytest.fixture(scope="module")
def tiny_client(tiny_model_dir, tmp_path_factory):
    running = mix_server(tiny_model_dir, tmp_path_factory.mktemp("mix-tiny"), 0.5)
    with openai.OpenAI(base_url=running.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60) as c:
        yield c
    running.stop()


@pytest.fixture(scope="module")
def bundled_client(bundled_model_dir, tmp_path_factory):
    running = mix_server(bundled_model_dir, tmp_path_factory.mktemp("mix-bundled"), 0.08, dora=False)
    with openai.OpenAI(base_url=running.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120) as c:
        yield c
    running.stop()


def reply(client, model, prompt, results=None, key=None):
    text = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                          max_tokens=12, temperature=0).choices[0].message.content
    if results is not None:
        results[key] = text
    return text


@pytest.mark.integration
def test_mixture_replies_equal_the_cat_combination_in_shared_batches(bundled_client):
    """On the bundled model (readable replies: a byte-level tiny model replies mostly U+FFFD, which hides
    differences)."""
    mix_client = bundled_client
    jobs = [(model, prompt) for prompt in PROMPTS for spec, cat in MIXTURES.items() for model in (spec, cat)]
    jobs += [("one", prompt) for prompt in PROMPTS]
    results: dict = {}
    threads = [threading.Thread(target=reply, args=(mix_client, model, prompt, results, (model, prompt)))
               for model, prompt in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for prompt in PROMPTS:
        for spec, cat in MIXTURES.items():
            assert results[(spec, prompt)] == results[(cat, prompt)], (
                f"{spec} must reply as the cat combination {cat} to {prompt!r}: "
                f"{results[(spec, prompt)]!r} vs {results[(cat, prompt)]!r}")
        assert results[(next(iter(MIXTURES)), prompt)] != results[("one", prompt)], "the mixture must differ from one"
    # One at a time too (a batch of a single mixture row takes the same paths as a mixed batch).
    assert reply(mix_client, "one:0.7+two:0.3", PROMPTS[0]) == results[("cat73", PROMPTS[0])]


def test_response_names_the_mixture(tiny_client):
    response = tiny_client.chat.completions.create(model="one:0.7+two:0.3", max_tokens=4, temperature=0,
                                                  messages=[{"role": "user", "content": "hi"}])
    assert response.model == "one:0.7+two:0.3"


@pytest.mark.parametrize(("model", "status", "words"), [
    ("one:0.7+nope:0.3", 404, "not loaded: nope"),
    ("one:abc+two:1", 400, "NAME:WEIGHT"),
    ("one:0.5+one:0.5", 400, "twice"),
    ("one:0.5+dora:0.5", 400, "DoRA"),
])
def test_bad_mixtures_are_4xx(tiny_client, model, status, words):
    with pytest.raises(openai.APIStatusError) as caught:
        reply(tiny_client, model, "hi")
    assert caught.value.status_code == status, caught.value
    assert words in caught.value.message, caught.value.message
