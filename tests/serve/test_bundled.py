"""The server on the bundled SmolLM2-135M-Instruct: a concurrent base request and adapter request each
get what `slimtune generate` gives for them (a real tokenizer, chat template and 30-layer model)."""

from __future__ import annotations

import threading

import pytest

from serve.support import start_server, write_adapter

PROMPT = "Name three colours."


@pytest.mark.integration
def test_bundled_model_serves_base_and_adapter_together(bundled_model_dir, tmp_path):
    from openai import OpenAI

    from slimtune.api import generate, load_run
    from slimtune.models import load_model
    from slimtune.serve import build_app

    write_adapter(bundled_model_dir, tmp_path / "tuned", ["q_proj", "v_proj"], seed=5, scale=0.05)
    model, tokenizer = load_run(tmp_path / "tuned")
    expected = {"tuned": generate(model, tokenizer, PROMPT, max_new_tokens=12)}
    model, tokenizer, _ = load_model(str(bundled_model_dir))
    expected["base"] = generate(model, tokenizer, PROMPT, max_new_tokens=12)
    del model
    assert expected["tuned"] != expected["base"], f"the adapter must change the reply, else the test is void: {expected}"

    running = start_server(build_app(str(bundled_model_dir), {"tuned": "tuned"}, adapter_root=tmp_path, device="cpu"))
    replies: dict[str, str] = {}
    try:
        def ask(label: str, model_name: str) -> None:
            with OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
                reply = client.chat.completions.create(model=model_name, max_tokens=12, temperature=0,
                                                       messages=[{"role": "user", "content": PROMPT}])
                replies[label] = reply.choices[0].message.content.strip()

        threads = [threading.Thread(target=ask, args=("tuned", "tuned")),
                   threading.Thread(target=ask, args=("base", str(bundled_model_dir)))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        running.stop()
    assert replies == expected, "each concurrent request gets its own model's greedy reply, as slimtune generate gives it"
