"""Fixtures for the server tests: two LoRA adapters on the tiny model, inside one adapter root, and a
real uvicorn server on a free port, driven with the official `openai` client.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from serve.support import ADAPTERS, API_KEY, start_server, write_adapter


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory, tiny_model_dir) -> Path:
    """A directory holding the runs `alpha` and `beta` (the server's adapter root)."""
    root = tmp_path_factory.mktemp("adapter-root")
    for name, (targets, kwargs, seed) in ADAPTERS.items():
        write_adapter(tiny_model_dir, root / name, targets, seed, **kwargs)
    return root


@pytest.fixture(scope="session")
def server(tiny_model_dir, adapter_root):
    """The tiny model with adapters alpha and beta, an API key, and small limits the tests can reach."""
    from slimtune.serve import ServeLimits, build_app

    limits = ServeLimits(max_tokens=300, default_max_tokens=16, max_prompt_tokens=200, max_body_bytes=20_000,
                         max_concurrent=6, max_batch=8)
    app = build_app(str(tiny_model_dir), {"alpha": "alpha", "beta": str(adapter_root / "beta")},
                    adapter_root=adapter_root, api_key=API_KEY, limits=limits, device="cpu")
    running = start_server(app)
    yield running
    running.stop()


@pytest.fixture
def client(server):
    from openai import OpenAI

    with OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60) as c:
        yield c
