"""What an adversarial review found in the server, each case over real HTTP against a real uvicorn server:
bad requests and bad adapter directories are 4xx in OpenAI's shape that change nothing, a server fault
is a 500 that names a request id and nothing of the server's insides, a catastrophic regex cannot hang
the engine, stop strings are bounded, the KV cache and the number of adapters are bounded.
"""

from __future__ import annotations

import json
import math
import time

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from serve.support import API_KEY, start_server
from serve.test_security import _broken_copy, _set_config, error_of, post

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}


def _write(name: str, text: str):
    def edit(path):
        (path / name).write_text(text, encoding="utf-8")
    return edit


def _nan_weight(path):
    tensors = load_file(path / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key][0, 0] = math.nan
    save_file(tensors, path / "adapter_model.safetensors")


def _config_yaml_link_out(path):
    outside = path.parents[2] / "outside-config.yaml"  # beside the adapter root, not inside it
    outside.write_text("model: secret\n", encoding="utf-8")
    (path / "config.yaml").symlink_to(outside)


@pytest.mark.parametrize("name, edit, fragment", [
    ("config-list", _write("adapter_config.json", "[1, 2]"), "must hold a JSON object"),
    ("r-null", _set_config(r=None), "'r' must be a positive integer, got None"),
    ("alpha-inf", _write("adapter_config.json", json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 1e400,
                                                            "target_modules": ["q_proj", "v_proj"]})), "finite number"),
    ("targets-int", _set_config(target_modules=5), "'target_modules' must be"),
    ("nan-weight", _nan_weight, "non-finite values"),
    ("yaml-too-deep", _write("config.yaml", "[" * 5000 + "]" * 5000), "nested too deeply"),
    ("yaml-link-out", _config_yaml_link_out, "config.yaml is a link to a file outside the adapter root"),
    ("target-regex-redos", _set_config(target_modules="(.|.)*[ab]"), "backtracks exponentially"),
    ("rank-pattern-redos", _set_config(rank_pattern={"(.|.)*\\d\\D{3}": 8}), "backtracks exponentially"),
])
def test_bad_adapter_directories_are_400_and_leave_the_name_free(server, client, adapter_root, name, edit, fragment):
    path_text = _broken_copy(adapter_root, name, edit)
    layers_before = {n: type(m).__name__ for n, m in server.state.engine.model.named_modules()}
    started = time.monotonic()
    response = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": f"bad-{name}", "lora_path": path_text},
                          headers=AUTH, timeout=20)  # a hung engine thread fails here rather than hanging the suite
    error = error_of(response, 400)
    assert fragment in error["message"], error["message"]
    assert str(adapter_root) not in error["message"], "messages name paths relative to the adapter root"
    assert time.monotonic() - started < 10, "a hostile pattern must not hold the engine thread"
    after = {n: type(m).__name__ for n, m in server.state.engine.model.named_modules()}
    assert after == layers_before, "a refused adapter must leave the model's layers as they were"
    # All or nothing: the name is free again, so a good adapter loads under it and unloads.
    assert post(server, "/v1/load_lora_adapter", {"lora_name": f"bad-{name}", "lora_path": "alpha"}).status_code == 200
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": f"bad-{name}"}).status_code == 200
    reply = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert reply.choices[0].finish_reason in ("stop", "length"), "the server keeps serving"


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 10**30])
def test_a_seed_out_of_range_is_400(server, seed):
    response = httpx.post(server.url + "/v1/chat/completions", headers=AUTH, timeout=30,
                          json={**CHAT, "model": "alpha", "seed": seed})
    error = error_of(response, 400)
    assert error["param"] == "seed", error


def test_largest_seed_is_accepted(server):
    response = httpx.post(server.url + "/v1/chat/completions", headers=AUTH, timeout=30,
                          json={**CHAT, "model": "alpha", "seed": 2**64 - 1, "temperature": 1.0})
    assert response.status_code == 200, response.text


def test_every_response_carries_a_request_id(server):
    ok = httpx.get(server.url + "/v1/models", headers=AUTH, timeout=30)
    bad = httpx.post(server.url + "/v1/chat/completions", headers=AUTH, timeout=30, json={"model": "nope"})
    ids = [r.headers.get("x-request-id", "") for r in (ok, bad)]
    assert all(i.startswith("req_") for i in ids) and ids[0] != ids[1], ids


def test_a_server_fault_is_a_500_naming_only_the_request_id(server, caplog):
    """A fault inside the server (here: the tokenizer is gone) is OpenAI's error shape with the request id,
    and the exception's class, message and the server's paths stay in the log."""
    state = server.state
    tokenizer = state.tokenizer
    state.tokenizer = None  # every chat request now fails inside the route, as a real server bug would
    try:
        response = httpx.post(server.url + "/v1/chat/completions", headers=AUTH, timeout=30,
                              json={**CHAT, "model": "alpha"})
    finally:
        state.tokenizer = tokenizer
    error = error_of(response, 500)
    request_id = response.headers["x-request-id"]
    assert request_id in error["message"] and error["type"] == "internal_server_error", error
    assert "Error" not in error["message"] and "/" not in error["message"], f"no class names or paths: {error}"
    assert any(request_id in record.getMessage() for record in caplog.records), "the log holds the id with the details"


def test_stop_strings_are_bounded_in_length(server):
    response = httpx.post(server.url + "/v1/completions", headers=AUTH, timeout=30,
                          json={"model": "alpha", "prompt": "hi", "max_tokens": 2, "stop": ["x" * 257]})
    error = error_of(response, 400)
    assert error["param"] == "stop" and "256" in error["message"], error


@pytest.fixture(scope="module")
def small_server(tiny_model_dir, adapter_root):
    """A server with a KV-cache budget of 400 tokens and room for two adapters."""
    from slimtune.serve import ServeLimits, build_app

    limits = ServeLimits(max_tokens=300, default_max_tokens=16, max_prompt_tokens=200, max_kv_tokens=400,
                         max_adapters=2)
    running = start_server(build_app(str(tiny_model_dir), {"alpha": "alpha", "beta": "beta"}, adapter_root=adapter_root,
                                     limits=limits, device="cpu"))
    yield running
    running.stop()


def test_a_request_over_the_kv_budget_alone_is_400(small_server):
    response = httpx.post(small_server.url + "/v1/completions", timeout=30,
                          json={"model": "alpha", "prompt": "x" * 150, "max_tokens": 260})
    error = error_of(response, 400)
    assert "KV-cache budget of 400 tokens" in error["message"], error


def test_the_kv_cache_stays_within_its_budget(small_server):
    """One long request and several short ones, each within the limits: the batch's cache (rows x width,
    read from the cache itself after every decode step) never passes the budget, and all of them finish."""
    engine = small_server.state.engine
    peaks: list[int] = []
    step = engine._decode_step

    def measured_step():
        step()
        if engine._batch.cache is not None and engine._batch.cache.layers:
            keys = engine._batch.cache.layers[0].keys  # (rows, kv_heads, width, head_dim)
            peaks.append(keys.shape[0] * keys.shape[2])

    engine._decode_step = measured_step
    try:
        import concurrent.futures

        bodies = [{"model": "alpha", "prompt": "y" * 150, "max_tokens": 40, "extra": 0}] + \
                 [{"model": "beta", "prompt": "short", "max_tokens": 30} for _ in range(5)]
        with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
            responses = list(pool.map(lambda b: httpx.post(small_server.url + "/v1/completions", json={
                **b, "ignore_eos": True}, timeout=120), bodies))
    finally:
        del engine._decode_step
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert peaks and max(peaks) <= 400, f"the cache held up to {max(peaks)} tokens, over the budget of 400"
    # Without the budget the same requests would share one batch 6 rows x ~190 columns wide (> 1000 tokens).


def test_adapters_are_bounded_in_number(small_server):
    response = httpx.post(small_server.url + "/v1/load_lora_adapter", timeout=30,
                          json={"lora_name": "third", "lora_path": "alpha"})
    error = error_of(response, 409)
    assert "--max-adapters" in error["message"] and error["code"] == "too_many_adapters", error
    assert "third" not in small_server.state.registry.paths


def test_health_reports_a_stopped_engine(small_server):
    """Runs last in this module: it stops the small server's engine thread."""
    assert httpx.get(small_server.url + "/health", timeout=30).status_code == 200
    small_server.state.engine.stop()
    response = httpx.get(small_server.url + "/health", timeout=30)
    assert response.status_code == 503 and response.json()["error"]["code"] == "engine_stopped", response.text
