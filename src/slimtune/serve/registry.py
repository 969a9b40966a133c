"""The adapters a server offers by name, loaded onto its one base model.

Loading and unloading change the model, so they run on the engine thread (`Engine.call`), between
decode steps. A load is checked completely (name, path inside the adapter root, config, every tensor's
shape, rank) before the model changes; any failure is a 4xx naming the problem, and the adapters
already loaded keep serving.
"""

from __future__ import annotations

import logging
from pathlib import Path

from safetensors import SafetensorError

from slimtune.runs import run_config
from slimtune.errors import SlimtuneError
from slimtune.methods.multi import AdapterSet
from slimtune.serve.errors import APIError
from slimtune.serve.security import check_adapter_name, confine_adapter_dir

log = logging.getLogger("slimtune.serve")


class AdapterRegistry:
    """Adapter name -> directory, for the adapters loaded into `adapters` (see the module docstring)."""

    def __init__(self, adapters: AdapterSet, root: Path, base_name: str, quantized: bool = False) -> None:
        self.adapters = adapters
        self.root = root.resolve()
        self.base_name = base_name
        self.quantized = quantized  # the base's linear layers are NF4 (QLoRA's base)
        # Replaced, never mutated, so the web server's thread can read it while the engine thread writes.
        self.paths: dict[str, Path] = {}

    def load(self, name: str, path_text: str) -> Path:
        """Load the LoRA / DoRA adapter in `path_text` (inside the root) as `name`; returns its directory."""
        check_adapter_name(name, self.base_name)
        if name in self.paths:
            raise APIError(400, f"an adapter named '{name}' is already loaded: unload it first or choose another name",
                           param="lora_name")
        path = confine_adapter_dir(self.root, path_text)
        try:
            self.adapters.load(path, name)
        except SlimtuneError as exc:  # malformed config, wrong shapes, bad rank, a pickle instead of safetensors
            raise APIError(400, f"cannot load adapter '{name}' from {path_text!r}: {exc}", param="lora_path") from None
        except (SafetensorError, OSError, ValueError) as exc:
            raise APIError(400, f"cannot load adapter '{name}' from {path_text!r}: unreadable weights ({exc})",
                           param="lora_path") from None
        try:
            cfg = run_config(path)
        except SlimtuneError:
            cfg = None  # a config.yaml slimtune cannot read: the adapter files themselves were fine
        if cfg is not None and cfg.quantized != self.quantized:
            trained, served = ("the NF4-quantized", "unquantized") if cfg.quantized else ("the unquantized", "NF4")
            log.warning("adapter '%s' was trained on %s base; the server runs the %s base, so its replies can "
                        "differ slightly from `slimtune generate` (serve it with --quantize %s)", name, trained, served,
                        "nf4" if cfg.quantized else "none")
        self.paths = {**self.paths, name: path}
        return path

    def unload(self, name: str, users: int) -> None:
        """Remove adapter `name`; refused (409) while `users` requests still use it."""
        if name not in self.paths:
            raise APIError(404, f"no adapter named {name!r} is loaded; loaded: {', '.join(self.paths) or '(none)'}",
                           param="lora_name", code="model_not_found")
        if users:
            raise APIError(409, f"adapter '{name}' is in use by {users} request(s): unload it once they finish",
                           param="lora_name")
        self.adapters.delete(name)
        self.paths = {key: value for key, value in self.paths.items() if key != name}
