"""API key, adapter root confinement, and adapter load / unload at run time, over HTTP."""

from __future__ import annotations

import json
import shutil

import httpx
import openai
import pytest

from serve.support import ADAPTERS, API_KEY, write_adapter


def get(server, path, auth: str | None = f"Bearer {API_KEY}"):
    return httpx.get(server.url + path, headers={"Authorization": auth} if auth else {}, timeout=30)


def post(server, path, body: dict, auth: str | None = f"Bearer {API_KEY}"):
    return httpx.post(server.url + path, json=body, headers={"Authorization": auth} if auth else {}, timeout=60)


def error_of(response, status: int) -> dict:
    assert response.status_code == status, f"expected {status}, got {response.status_code}: {response.text}"
    return response.json()["error"]


@pytest.mark.parametrize("auth", [None, "Bearer wrong-key", f"Bearer {API_KEY}x", f"Bearer {API_KEY[:-1]}",
                                  f"Basic {API_KEY}", API_KEY])
def test_requests_without_the_right_key_are_401(server, auth):
    for path, body in (("/v1/models", None), ("/v1/chat/completions", {"model": "alpha", "messages": []}),
                       ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "alpha"}), ("/v1/nowhere", None)):
        response = get(server, path, auth) if body is None else post(server, path, body, auth)
        error = error_of(response, 401)
        assert error["type"] == "authentication_error" and "API key" in error["message"], error
        assert response.headers["www-authenticate"] == "Bearer"


def test_openai_client_with_a_wrong_key_gets_401(server):
    from openai import OpenAI

    with OpenAI(base_url=server.url + "/v1", api_key="not-the-key", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()


def test_health_needs_no_key(server):
    assert get(server, "/health", auth=None).json() == {"status": "ok"}


@pytest.fixture(scope="module")
def outside(tmp_path_factory, tiny_model_dir):
    """A valid adapter outside the adapter root."""
    return write_adapter(tiny_model_dir, tmp_path_factory.mktemp("outside") / "evil", ["q_proj"], seed=3)


@pytest.mark.parametrize("path_text, status, fragment", [
    ("../outside/evil", 400, "contains '..'"),
    ("alpha/../../outside/evil", 400, "contains '..'"),
    ("/etc", 400, "outside the adapter root"),
    ("link-out", 400, "outside the adapter root"),
    ("weights-link", 400, "is a link to"),
    ("no-such-run", 404, "no directory"),
    ("", 400, "non-empty path"),
])
def test_paths_leaving_the_root_are_refused(server, adapter_root, outside, path_text, status, fragment):
    link = adapter_root / "link-out"
    if not link.exists():
        link.symlink_to(outside, target_is_directory=True)
        (adapter_root / "weights-link").mkdir()
        shutil.copy(outside / "adapter_config.json", adapter_root / "weights-link")
        (adapter_root / "weights-link" / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    error = error_of(post(server, "/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": path_text}), status)
    assert fragment in error["message"] and error["param"] == "lora_path", error
    assert "evil" not in server.state.registry.paths


@pytest.mark.parametrize("name", ["../alpha", "a/b", "/abs", ".hidden", "x" * 65, "with space"])
def test_adapter_names_are_plain_words(server, name):
    error = error_of(post(server, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": "alpha"}), 400)
    assert "is not allowed" in error["message"] and error["param"] == "lora_name"


def test_load_use_and_unload_at_run_time(server, client, adapter_root, tiny_model_dir):
    from slimtune.api import generate, load_run

    run = write_adapter(tiny_model_dir, adapter_root / "runtime" / "gamma", ["k_proj", "o_proj"], seed=21)
    model, tokenizer = load_run(run)
    expected = generate(model, tokenizer, "hi there", max_new_tokens=16)

    loaded = post(server, "/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": "runtime/gamma"})
    assert loaded.status_code == 200, loaded.text
    cards = {m.id: m for m in client.models.list().data}
    assert cards["gamma"].parent == server.state.base_name
    reply = client.chat.completions.create(model="gamma", messages=[{"role": "user", "content": "hi there"}],
                                           max_tokens=16, temperature=0)
    assert reply.choices[0].message.content.strip() == expected, "a run-time adapter serves its own replies"
    error = error_of(post(server, "/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": "alpha"}), 400)
    assert "already loaded" in error["message"]

    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "gamma"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gamma", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert "gamma" not in {m.id for m in client.models.list().data}
    error = error_of(post(server, "/v1/unload_lora_adapter", {"lora_name": "gamma"}), 404)
    assert "no adapter named 'gamma'" in error["message"]


def test_unloading_an_adapter_in_use_is_409(server, client):
    stream = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "hi"}], max_tokens=300,
                                            stream=True, extra_body={"ignore_eos": True})
    try:
        next(iter(stream))
        error = error_of(post(server, "/v1/unload_lora_adapter", {"lora_name": "beta"}), 409)
        assert "in use by 1 request" in error["message"]
    finally:
        stream.close()
    assert set(ADAPTERS) <= set(server.state.registry.paths), "beta stays loaded"


def _broken_copy(adapter_root, name: str, edit) -> str:
    target = adapter_root / "broken" / name
    shutil.copytree(adapter_root / "alpha", target)
    edit(target)
    return f"broken/{name}"


def _set_config(**changes):
    def edit(path):
        config = json.loads((path / "adapter_config.json").read_text())
        config.update(changes)
        (path / "adapter_config.json").write_text(json.dumps(config))
    return edit


def _last_layer_rank_40(path):
    """Rank 40 (> the 32 features of the tiny model) on the last adapted layer only, tensors to match: the
    load fails only after the earlier layers were built, so this checks that it is all or nothing."""
    import torch
    from safetensors.torch import load_file, save_file

    layer = "model.layers.1.self_attn.v_proj"
    _set_config(rank_pattern={"layers\\.1\\.self_attn\\.v_proj": 40})(path)
    tensors = load_file(path / "adapter_model.safetensors")
    key = f"base_model.model.{layer}"
    tensors[f"{key}.lora_A.weight"] = torch.randn(40, 32)
    tensors[f"{key}.lora_B.weight"] = torch.randn(tensors[f"{key}.lora_B.weight"].shape[0], 40)
    save_file(tensors, path / "adapter_model.safetensors")


@pytest.mark.parametrize("name, edit, fragment", [
    ("rank", _set_config(r=8), "the model needs (8, 32)"),  # the tensors have rank 4
    ("zero-rank", _set_config(r=0), "'r' must be a positive integer, got 0"),
    ("rank-over-layer-size", _last_layer_rank_40, "exceeds the layer size"),
    ("peft-type", _set_config(peft_type="IA3"), "peft_type 'IA3' is not supported"),
    ("targets", _set_config(target_modules=["q_prj"]), "q_prj"),
    ("not-json", lambda p: (p / "adapter_config.json").write_text("{"), "not valid JSON"),
    ("pickle", lambda p: (p / "adapter_model.safetensors").rename(p / "adapter_model.bin"), "never loaded"),
    ("garbage", lambda p: (p / "adapter_model.safetensors").write_bytes(b"\x00" * 64), "unreadable weights"),
])
def test_bad_adapters_are_400_and_change_nothing(server, client, adapter_root, name, edit, fragment):
    path_text = _broken_copy(adapter_root, name, edit)
    layers_before = {n: type(m).__name__ for n, m in server.state.engine.model.named_modules()}
    error = error_of(post(server, "/v1/load_lora_adapter", {"lora_name": f"bad-{name}", "lora_path": path_text}), 400)
    assert fragment in error["message"], error["message"]
    assert f"bad-{name}" not in {m.id for m in client.models.list().data}
    after = {n: type(m).__name__ for n, m in server.state.engine.model.named_modules()}
    assert after == layers_before, "a refused adapter must leave the model's layers as they were"
    reply = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert reply.choices[0].finish_reason in ("stop", "length"), "the server keeps serving"
