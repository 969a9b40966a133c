"""Property-based (fuzz) tests of the server with Hypothesis, over real HTTP against the session's uvicorn
server (tests/serve/conftest.py): request bodies of every shape, and adapter directories with broken
configs, weights, run configs and links. Whatever arrives, the answer is a response in OpenAI's shape
with a status below 500, never a traceback, never a path of the server's; nothing is written outside;
the server goes on serving.

CI runs a fixed, derandomized set of cases (the same every run). For a longer local run with fresh
random cases:  SLIMTUNE_FUZZ=long python -m pytest tests/serve/test_fuzz.py --hypothesis-show-statistics
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from serve.support import API_KEY

LONG = os.environ.get("SLIMTUNE_FUZZ") == "long"


def fuzz_settings(ci_examples: int) -> settings:
    """CI: `ci_examples` derandomized cases (deterministic); SLIMTUNE_FUZZ=long: 20x as many, random."""
    return settings(max_examples=ci_examples * 20 if LONG else ci_examples, derandomize=not LONG, deadline=None,
                    database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# --- values of any JSON shape, weighted towards the edges ---------------------------------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 8), st.integers(min_value=-(2**80), max_value=2**80),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["", "\x00", "\ud800", "../../etc/passwd", "/etc", "é✓", "a" * 300]))
edges = st.sampled_from([2**31, 2**63, 2**64, -(2**63) - 1, 10**30, 1e308, math.nan, math.inf, -1, 0, "", None, [],
                         {}])  # where types and ranges end
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                           max_leaves=8)


def _valid_then_mutated(valid: dict, fields: list[str]):
    """A body drawn valid, then one or two fields (of `fields`) replaced by an edge or any JSON value: most
    cases get past the first checks and reach the deeper ones (sampling, the engine, the detokenizer)."""
    return st.tuples(st.fixed_dictionaries(valid),
                     st.dictionaries(st.sampled_from(fields), st.one_of(edges, json_values), min_size=1, max_size=2)
                     ).map(lambda t: {**t[0], **t[1]})


_SAMPLING = {"max_tokens": st.integers(1, 6), "temperature": st.floats(0, 2), "top_p": st.floats(0, 1),
             "seed": st.integers(0, 2**64 - 1), "stop": st.lists(st.text(max_size=4), max_size=4),
             "stream": st.booleans()}
_MUTABLE = [*_SAMPLING, "model", "stream_options", "n", "logprobs", "tools", "response_format", "echo", "suffix",
            "best_of", "ignore_eos"]

_part = st.one_of(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=10)}), json_values)
_message = st.fixed_dictionaries({
    "role": st.one_of(st.sampled_from(["user", "system", "assistant", "developer", "tool"]), json_values),
    "content": st.one_of(st.text(max_size=20), st.lists(_part, max_size=2), json_values)})
chat_bodies = _valid_then_mutated(
    {"model": st.sampled_from(["alpha", "beta"]), "messages": st.lists(_message, min_size=1, max_size=3),
     **_SAMPLING}, [*_MUTABLE, "messages", "max_completion_tokens"])
completion_bodies = _valid_then_mutated(
    {"model": st.sampled_from(["alpha", "beta"]),
     "prompt": st.one_of(st.text(max_size=20), st.lists(st.text(max_size=8), max_size=3),
                         st.lists(st.integers(-5, 400), max_size=6),
                         st.lists(st.lists(st.integers(-5, 400), max_size=4), max_size=3)),
     **_SAMPLING}, [*_MUTABLE, "prompt"])


def check_answer(response: httpx.Response, root) -> None:
    """The properties every answer has, whatever the request."""
    assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    text = response.text
    assert "Traceback" not in text and str(root) not in text, text[:500]
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    elif response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", text[:500]
        for event in events[:-1]:
            assert "error" not in json.loads(event), f"a stream that started must not fail: {event}"


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as client:
        yield client


def _post_json(http, path: str, body) -> httpx.Response:
    # NaN and infinities go out as JSON's common extension (NaN, Infinity), as some clients send them.
    return http.post(path, content=json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass"),
                     headers={"Content-Type": "application/json"})


@fuzz_settings(50)
@given(body=chat_bodies)
def test_fuzz_chat_bodies(server, http, adapter_root, body):
    check_answer(_post_json(http, "/v1/chat/completions", body), adapter_root)


@fuzz_settings(40)
@given(body=completion_bodies)
def test_fuzz_completion_bodies(server, http, adapter_root, body):
    check_answer(_post_json(http, "/v1/completions", body), adapter_root)


@fuzz_settings(40)
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/load_lora_adapter",
                             "/v1/unload_lora_adapter"]),
       raw=st.one_of(st.binary(max_size=64), st.just(b"[" * 5000), st.just(b'{"model": ' * 3000)))
def test_fuzz_raw_bodies(server, http, adapter_root, path, raw):
    check_answer(http.post(path, content=raw, headers={"Content-Type": "application/json"}), adapter_root)


# --- adapter directories -------------------------------------------------------------------------------

config_edits = st.one_of(
    st.dictionaries(st.sampled_from(["r", "lora_alpha", "target_modules", "peft_type", "use_dora", "use_rslora",
                                     "rank_pattern", "alpha_pattern", "bias", "init_r"]), json_values, max_size=3),
    st.just({"target_modules": "(.|.)*[ab]"}), st.just({"rank_pattern": {"(.|.)*\\d\\D{3}": 4}}),
    st.just({"lora_alpha": math.inf}))
weight_edits = st.sampled_from(["keep", "drop-key", "nan", "inf", "wrong-shape", "garbage", "empty", "missing"])
run_configs = st.one_of(st.none(), st.text(max_size=40), json_values.map(json.dumps),
                        st.just("[" * 3000), st.just("model: [\n"), st.just("a: &a [*a]\n"))
links = st.sampled_from([None, "config.yaml", "adapter_config.json", "adapter_model.safetensors"])
_counter = itertools.count()


def _edit_weights(path, how: str) -> None:
    weights = path / "adapter_model.safetensors"
    if how == "keep":
        return
    if how in ("garbage", "empty", "missing"):
        weights.unlink()
        if how != "missing":
            weights.write_bytes(b"" if how == "empty" else b"\x07" * 40)
        return
    tensors = load_file(weights)
    key = sorted(tensors)[0]
    if how == "drop-key":
        del tensors[key]
    elif how == "wrong-shape":
        tensors[key] = torch.zeros(3, 5)
    else:
        tensors[key][0, 0] = math.nan if how == "nan" else -math.inf
    save_file(tensors, weights)


def _tree(root) -> dict[str, tuple[int, int]]:
    return {str(p): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if "fuzz-adapters" not in p.parts}


@fuzz_settings(40)
@given(config=config_edits, weights=weight_edits, run_config=run_configs, link=links, replace_config=st.booleans())
def test_fuzz_adapter_directories(server, http, adapter_root, config, weights, run_config, link, replace_config):
    directory = adapter_root / "fuzz-adapters" / f"case-{next(_counter)}"
    shutil.copytree(adapter_root / "alpha", directory)
    outside = adapter_root.parent / f"fuzz-outside-{directory.name}"
    outside.write_text("model: secret\n", encoding="utf-8")
    before_outside, before_root = outside.read_bytes(), _tree(adapter_root)
    settings_file = directory / "adapter_config.json"
    original = json.loads(settings_file.read_text())
    settings_file.write_text(json.dumps(config if replace_config else {**original, **config}, allow_nan=True)
                             .encode("utf-8", "surrogatepass").decode("utf-8", "replace"))
    _edit_weights(directory, weights)
    if run_config is not None:
        (directory / "config.yaml").write_text(run_config, encoding="utf-8", errors="replace")
    if link is not None:
        (directory / link).unlink(missing_ok=True)
        (directory / link).symlink_to(outside)
    before_root = _tree(adapter_root)

    response = _post_json(http, "/v1/load_lora_adapter", {"lora_name": "fz", "lora_path": str(directory.relative_to(
        adapter_root))})
    check_answer(response, adapter_root)
    assert response.status_code in (200, 400), response.text
    if response.status_code == 200:
        reply = _post_json(http, "/v1/completions", {"model": "fz", "prompt": "hi", "max_tokens": 2})
        check_answer(reply, adapter_root)
        assert reply.status_code == 200, reply.text
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "fz"}).status_code == 200
    assert "fz" not in server.state.registry.paths
    assert outside.read_bytes() == before_outside and _tree(adapter_root) == before_root, "nothing is written"
    assert http.get("/health").json() == {"status": "ok"}
