"""Helpers for the server tests: adapters with random non-zero weights, and a real uvicorn server in a thread."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from slimtune.adapters import save_lora_adapter
from slimtune.methods.lora import attach_lora, lora_layers
from slimtune.models import load_model

API_KEY = "test-key-0123456789"
ADAPTERS = {  # name: (targets, attach kwargs, seed)
    "alpha": (["q_proj", "v_proj"], {}, 11),
    "beta": (["v_proj", "down_proj"], {"use_dora": True}, 12),
}


def write_adapter(base_dir: Path, out: Path, targets: list[str], seed: int, scale: float = 0.3, **kwargs) -> Path:
    """A LoRA adapter on the model in `base_dir` with random non-zero B, so it changes the replies."""
    model, _, _ = load_model(str(base_dir))
    torch.manual_seed(seed)  # lora_A's init draws from the global generator: seed it, or A depends on test order
    attach_lora(model, targets, r=4, alpha=8.0, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * scale)
    save_lora_adapter(model, out, base_model=str(base_dir))
    return out


@dataclass
class RunningServer:
    url: str
    app: object
    server: object
    thread: threading.Thread

    @property
    def state(self):
        return self.app.state.server

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def start_server(app) -> RunningServer:
    """Run `app` in uvicorn on a free local port in a background thread; returns once it accepts requests."""
    import uvicorn

    from slimtune.serve.server import bind

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return RunningServer(f"http://127.0.0.1:{sock.getsockname()[1]}", app, server, thread)


def make_engine(model_dir: Path, adapter_root: Path, max_batch: int = 8):
    """An engine (not started) on the model in `model_dir` with every adapter of `ADAPTERS` loaded from `adapter_root`."""
    from slimtune.methods.multi import AdapterSet
    from slimtune.serve.engine import Engine

    model, tokenizer, _ = load_model(str(model_dir))
    adapters = AdapterSet(model.eval())
    for name in ADAPTERS:
        adapters.load(adapter_root / name, name)
    return Engine(model, tokenizer, adapters, max_batch=max_batch)
