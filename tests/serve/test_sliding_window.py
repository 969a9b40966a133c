"""Models with sliding-window attention layers (Gemma-3) are served: the batch keeps every position in
every layer and the model's sliding mask hides what lies outside each window, so greedy replies equal
`slimtune generate`'s (which runs transformers' own sliding-window cache), alone and in a mixed batch.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_tokenizer
from serve.support import start_server

PROMPTS = ["hi there, a prompt longer than the window", "ok", "The cat sat on the mat and looked around"]


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    """A tiny random Gemma-3 text model: layer 0 slides over 4 positions, layer 1 attends to all."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    path = tmp_path_factory.mktemp("tiny-gemma3")
    tokenizer = make_tiny_tokenizer()
    torch.manual_seed(3)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=512,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                              bos_token_id=tokenizer.bos_token_id)
    model = Gemma3ForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def test_gemma3_replies_equal_generate_alone_and_batched(gemma_dir):
    from openai import OpenAI

    from slimtune.api import generate
    from slimtune.models import load_model
    from slimtune.serve import build_app

    model, tokenizer, _ = load_model(str(gemma_dir))
    references = [generate(model, tokenizer, prompt, max_new_tokens=12) for prompt in PROMPTS]
    # The window must matter, else the test could not tell a sliding layer from a full one.
    full = model.config.__class__(**{**model.config.to_dict(), "layer_types": ["full_attention"] * 2})
    model_full = type(model)(full)
    model_full.load_state_dict(model.state_dict())
    assert [generate(model_full.eval(), tokenizer, p, max_new_tokens=12) for p in PROMPTS] != references, \
        "with the window removed the replies must change, else the test cannot see the sliding layer"

    running = start_server(build_app(str(gemma_dir), device="cpu"))
    try:
        with OpenAI(base_url=running.url + "/v1", api_key="x", max_retries=0, timeout=60) as client:
            def ask(prompt: str) -> str:
                reply = client.chat.completions.create(model=running.state.base_name, max_tokens=12, temperature=0,
                                                       messages=[{"role": "user", "content": prompt}])
                return reply.choices[0].message.content.strip()

            assert [ask(p) for p in PROMPTS] == references, "each reply alone must equal slimtune generate's"
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(len(PROMPTS)) as pool:
                batched = list(pool.map(ask, PROMPTS))
            assert batched == references, "replies decoded together (left-padded) must equal generate's too"
    finally:
        running.stop()
