"""QLoRA adapters are served on the NF4 base they were trained on (`--quantize auto` picks it)."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from serve.support import start_server


@pytest.fixture(scope="module")
def qlora_root(tmp_path_factory, tiny_model_dir):
    from slimtune.api import finetune
    from slimtune.config import build_config

    root = tmp_path_factory.mktemp("qlora-root")
    rows = [{"instruction": f"say {i}", "output": f"number {i} " * 3} for i in range(8)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    finetune(build_config({
        "model": str(tiny_model_dir), "method": "qlora", "output": str(root / "q"),
        "data": {"train": str(root / "train.jsonl")}, "lora": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "precision": "fp32", "save_every": None},
    }), Console(quiet=True))
    return root


@pytest.mark.parametrize("quantize, equal", [("auto", True), ("none", False)])
def test_qlora_adapter_replies_equal_generate_on_the_nf4_base(qlora_root, tiny_model_dir, quantize, equal):
    from openai import OpenAI

    from slimtune.api import generate, load_run
    from slimtune.quant import Linear4bit
    from slimtune.serve import build_app

    model, tokenizer = load_run(qlora_root / "q")
    prompts = ["say 3", "say 5", "hello there"]
    expected = [generate(model, tokenizer, p, max_new_tokens=12) for p in prompts]
    # An adapter that learned to stop at once says '' on any base, and then the comparison shows nothing.
    assert all(expected), f"the fixture's adapter must reply with text, got {expected}"
    app = build_app(str(tiny_model_dir), {"q": "q"}, adapter_root=qlora_root, device="cpu", quantize=quantize)
    served = app.state.server.engine.model
    assert any(isinstance(m, Linear4bit) for m in served.modules()) == (quantize == "auto"), \
        "auto must quantize the base for a QLoRA adapter; none must not"
    running = start_server(app)
    try:
        with OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
            replies = [client.chat.completions.create(model="q", temperature=0, max_tokens=12,
                                                      messages=[{"role": "user", "content": p}])
                       .choices[0].message.content.strip() for p in prompts]
    finally:
        running.stop()
    if equal:
        assert replies == expected, "on the NF4 base the served replies must equal slimtune generate's"
    else:
        assert replies != expected, "the unquantized base changes the replies here, else the test shows nothing"
