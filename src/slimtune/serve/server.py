"""Start a server: load the base model and the adapters, build the app, listen with uvicorn.

`build_app` gives the ASGI app without listening (tests run it in their own uvicorn); `serve` is what
`slimtune serve` calls. The base model is `model` if given, else the one every adapter records (they
must agree). Startup adapters go through the same checks as ones loaded at run time, so they too must
lie inside the adapter root.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import socket
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape

from slimtune.adapters import read_adapter_config
from slimtune.errors import AdapterError, SlimtuneError
from slimtune.methods.multi import AdapterSet
from slimtune.methods.base import load_base
from slimtune.serve.app import ServerState, create_app
from slimtune.serve.engine import Engine, ModelThread
from slimtune.serve.errors import APIError
from slimtune.serve.images import ImageLimits
from slimtune.serve.registry import AdapterRegistry
from slimtune.serve.route import ServeRouter
from slimtune.serve.security import ServeLimits, confine_adapter_dir, loopback_hosts
from slimtune.train.precision import resolve_device


def base_model_of(adapters: dict[str, str], root: Path) -> str:
    """The base model the adapters were trained on (their run config's `model`, else adapter_config.json's)."""
    from slimtune.runs import run_config

    if not adapters:
        raise SlimtuneError("no base model: pass --model NAME_OR_DIR, or at least one --adapter NAME=RUN_DIR")
    recorded: dict[str, str] = {}
    for name, path_text in adapters.items():
        path = _startup_path(name, path_text, root)
        cfg = run_config(path)
        base = (cfg.model if cfg else None) or read_adapter_config(path).get("base_model_name_or_path")
        if not base:
            raise AdapterError(f"adapter '{name}' ({path_text}) does not name its base model: pass --model")
        recorded[name] = base
    if len(set(recorded.values())) > 1:
        listed = ", ".join(f"{name}: {base}" for name, base in recorded.items())
        raise AdapterError(f"the adapters name different base models ({listed}): pass --model to choose one")
    return next(iter(recorded.values()))


def _startup_path(name: str, path_text: str, root: Path) -> Path:
    try:
        return confine_adapter_dir(root, path_text)
    except APIError as exc:
        raise AdapterError(f"--adapter {name}={path_text}: {exc.message}") from None


def trained_on_nf4(adapters: dict[str, str], root: Path) -> bool:
    """True when every startup adapter is a run trained on the NF4 base (QLoRA) and there is at least one."""
    from slimtune.runs import run_config

    configs = [run_config(_startup_path(name, path_text, root)) for name, path_text in adapters.items()]
    return bool(configs) and all(cfg is not None and cfg.quantized for cfg in configs)


def build_app(model: str | None = None, adapters: dict[str, str] | None = None, adapter_root: str | Path | None = None,
              api_key: str | None = None, limits: ServeLimits | None = None, device: str = "auto",
              quantize: str = "auto", allowed_hosts: frozenset[str] | None = None,
              route_name: str | None = "auto", route_threshold: float | None = None,
              image_root: str | Path | None = None, dtype: str = "auto"):
    """The FastAPI app serving `model` with `adapters` (name -> run directory inside `adapter_root`,
    default: the working directory). The engine thread starts and stops with the app. With
    `allowed_hosts`, requests with any other Host header are refused (403).

    `quantize`: 'nf4' freezes the base's linear layers in NF4 (the base QLoRA adapters were trained on),
    'none' keeps them as loaded, 'auto' picks nf4 when every startup adapter is a QLoRA run.
    `route_name` (None: no routing) is the model name that routes each request to the closest adapter
    (slimtune.routing); `route_threshold` overrides each signature's own threshold.
    `image_root`: the only directory local image paths of a vision-language model's requests may name.
    `dtype`: 'auto' keeps the base's weights as loaded, 'float32' / 'bfloat16' casts them (an explicit choice:
    bf16 halves the weights' memory and speeds up decode steps where bf16 matmuls are fast, but greedy replies
    can differ from fp32's)."""
    adapters = dict(adapters or {})
    limits = limits or ServeLimits()
    root = Path(adapter_root if adapter_root is not None else Path.cwd()).expanduser()
    if not root.is_dir():
        raise SlimtuneError(f"adapter root '{root}' is not a directory: pass an existing directory with --adapter-root")
    root = root.resolve()
    base_name = model or base_model_of(adapters, root)
    if quantize not in ("auto", "none", "nf4"):
        raise SlimtuneError(f"--quantize {quantize!r}: use auto, none or nf4")
    quantized = quantize == "nf4" or (quantize == "auto" and trained_on_nf4(adapters, root))
    weights_dtype = _weights_dtype(dtype, quantized)
    def load() -> tuple:
        # As load_run rebuilds a QLoRA run's base (streamed, one layer at a time), so replies equal
        # `slimtune generate`'s.
        base, tokenizer = load_base(base_name, quantized)
        base.to(resolve_device(device), dtype=weights_dtype).eval()
        adapter_set = AdapterSet(base)
        registry = AdapterRegistry(adapter_set, root, base_name, quantized, limits.max_adapters)
        for name, path_text in adapters.items():
            try:
                registry.load(name, path_text)
            except APIError as exc:
                raise AdapterError(f"--adapter {name}={path_text}: {exc.message}") from None
        return base, tokenizer, adapter_set, registry

    # Loaded on the thread the engine will decode on (engine.ModelThread says why).
    model_thread = ModelThread()
    try:
        base, tokenizer, adapter_set, registry = model_thread.run(load)
        try:
            engine = Engine(base, tokenizer, adapter_set, limits.max_batch, limits.prefill_tokens,
                            limits.max_kv_tokens, thread=model_thread)
        except ValueError as exc:
            raise SlimtuneError(f"cannot serve '{base_name}': {exc}") from None
    except BaseException:
        model_thread.hand_over(lambda: None)  # nothing to serve: the thread ends
        raise
    context = int(getattr(base.config, "max_position_embeddings", 0) or limits.max_prompt_tokens + limits.max_tokens)
    state = ServerState(engine, registry, tokenizer, base_name, limits, context, processor=_processor(base_name),
                        image_limits=ImageLimits(root=Path(image_root).expanduser() if image_root else None))
    if route_name:
        if route_name in (base_name, *adapters):
            raise SlimtuneError(f"--route-name {route_name!r} is also the name of a served model: choose another")
        state.router = ServeRouter(route_name, registry, base, tokenizer, route_threshold)
    return create_app(state, api_key, allowed_hosts)


def _weights_dtype(dtype: str, quantized: bool) -> torch.dtype | None:
    """The dtype `--dtype` asks for (None: as loaded); checked before the model loads."""
    choices = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}
    if dtype not in choices:
        raise SlimtuneError(f"--dtype {dtype!r}: use auto, float32 or bfloat16")
    if quantized and choices[dtype] is not None:
        raise SlimtuneError(f"--dtype {dtype} with an NF4 base: the NF4 base keeps its own dtypes; drop --dtype "
                            "or pass --quantize none")
    return choices[dtype]


def _processor(base_name: str):
    """A vision-language base's processor (image requests), else None."""
    from slimtune.models.loader import resolve_model
    from slimtune.models.vision import processor_for

    return processor_for(resolve_model(base_name), base_name)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free port), or a clear error."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET  # a host name such as 'localhost'
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SlimtuneError(f"cannot listen on {host}:{port} ({exc.strerror}): choose another --port or --host") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(model: str | None = None, adapters: dict[str, str] | None = None, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, adapter_root: str | Path | None = None, limits: ServeLimits | None = None,
          device: str = "auto", console: Console | None = None, quantize: str = "auto",
          allow_hosts: tuple[str, ...] = (), route_name: str | None = "auto",
          route_threshold: float | None = None, image_root: str | Path | None = None, dtype: str = "auto") -> None:
    """Serve until Ctrl-C or SIGTERM, which finish the open responses (up to 30 s) and return.

    On a loopback address only requests whose Host header names localhost, 127.0.0.1, [::1] or one of
    `allow_hosts` are answered (no DNS rebinding from a web page in the user's browser)."""
    import uvicorn

    console = console or Console(stderr=True)
    sock = bind(host, port)  # before loading the model: a taken port fails in a second, not after the load
    allowed = loopback_hosts(sock.getsockname()[1], allow_hosts) if _is_loopback(host) else None
    app = build_app(model, adapters, adapter_root, api_key, limits, device, quantize, allowed, route_name,
                    route_threshold, image_root, dtype)
    state: ServerState = app.state.server
    listen = f"http://{'[' + host + ']' if ':' in host else host}:{sock.getsockname()[1]}/v1"
    offered = ", ".join([state.base_name, *state.registry.paths])
    console.print(f"serving {escape(offered)} at {escape(listen)} (adapter root {escape(str(state.registry.root))})",
                  highlight=False, soft_wrap=True)
    if not api_key:
        exposure = "anyone who can reach this port" if not _is_loopback(host) else "any local process"
        console.print(f"[bold yellow]warning:[/bold yellow] no API key: {exposure} can use the server and load "
                      "adapters from the adapter root; set SLIMTUNE_API_KEY or pass --api-key", highlight=False)
    logger = logging.getLogger("slimtune.serve")  # adapter loads, failures: beside uvicorn's own lines
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=30))
    # uvicorn stops gracefully on SIGINT / SIGTERM, then raises the same signal again against the handler
    # it found. That handler is this no-op, so a requested stop ends with status 0, as `slimtune train` does.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    console.print("server stopped")
