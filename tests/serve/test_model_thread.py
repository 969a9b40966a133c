"""The served model is loaded on the thread its engine decodes on (engine.ModelThread): one OpenMP team."""

from __future__ import annotations

import threading

import pytest

from slimtune.serve import server as server_module
from slimtune.serve.engine import Engine, ModelThread
from tests.serve.support import start_server


def test_model_thread_runs_jobs_then_the_loop_on_one_thread():
    worker = ModelThread()
    first = worker.run(threading.get_ident)
    assert first != threading.get_ident()
    with pytest.raises(ZeroDivisionError):
        worker.run(lambda: 1 / 0)  # the exception comes back to the caller; the thread goes on
    seen = []
    worker.hand_over(lambda: seen.append(threading.get_ident()))
    worker.join(5)
    assert seen == [first] and not worker.is_alive()


def test_server_loads_and_decodes_on_the_same_thread(tiny_model_dir, adapter_root, monkeypatch):
    threads: dict[str, int] = {}
    original_load, original_loop = server_module.load_base, Engine._loop

    def load_base(*args, **kwargs):
        threads["load"] = threading.get_ident()
        return original_load(*args, **kwargs)

    def loop(self):
        threads["loop"] = threading.get_ident()
        return original_loop(self)

    monkeypatch.setattr(server_module, "load_base", load_base)
    monkeypatch.setattr(Engine, "_loop", loop)
    app = server_module.build_app(str(tiny_model_dir), {"alpha": "alpha"}, adapter_root=adapter_root, device="cpu")
    running = start_server(app)
    try:
        assert threads["load"] == threads["loop"] != threading.get_ident()
    finally:
        running.stop()
