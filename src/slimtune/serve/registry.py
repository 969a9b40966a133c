"""The adapters a server offers by name, loaded onto its one base model.

Loading and unloading change the model, so they run on the engine thread (`Engine.call`), between
decode steps. A load is checked completely (name, the number of adapters, path inside the adapter root, the run's
config.yaml, adapter config, every tensor's shape, rank and finiteness) before the model changes; any
failure is a 4xx naming the problem (paths relative to the adapter root), and the adapters already
loaded keep serving.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from safetensors import SafetensorError

from slimtune.config import Config
from slimtune.runs import RUN_CONFIG, run_config
from slimtune.errors import SlimtuneError
from slimtune.methods.multi import AdapterSet
from slimtune.serve.errors import APIError
from slimtune.serve.security import check_adapter_name, confine_adapter_dir

log = logging.getLogger("slimtune.serve")


class AdapterRegistry:
    """Adapter name -> directory, for the adapters loaded into `adapters` (see the module docstring)."""

    def __init__(self, adapters: AdapterSet, root: Path, base_name: str, quantized: bool = False,
                 max_adapters: int = 64) -> None:
        self.adapters = adapters
        self.root = root.resolve()
        self.base_name = base_name
        self.quantized = quantized  # the base's linear layers are NF4 (QLoRA's base)
        self.max_adapters = max_adapters
        # Replaced, never mutated, so the web server's thread can read it while the engine thread writes.
        self.paths: dict[str, Path] = {}

    def load(self, name: str, path_text: str) -> Path:
        """Load the LoRA / DoRA adapter in `path_text` (inside the root) as `name`; returns its directory.

        All or nothing: every file the load reads (the run's config.yaml included) is read and checked
        before the model changes, so a refused adapter leaves neither the model nor the registry touched."""
        check_adapter_name(name, self.base_name)
        if name in self.paths:
            raise APIError(400, f"an adapter named '{name}' is already loaded: unload it first or choose another name",
                           param="lora_name")
        if len(self.paths) >= self.max_adapters:
            raise APIError(409, f"{len(self.paths)} adapters are loaded, this server's limit (--max-adapters): unload "
                                "one first", param="lora_name", code="too_many_adapters")
        path = confine_adapter_dir(self.root, path_text)
        cfg = self._run_config(name, path, path_text)
        try:
            self.adapters.load(path, name)
        except SlimtuneError as exc:  # malformed config, wrong shapes, bad rank, a pickle instead of safetensors
            raise APIError(400, f"cannot load adapter '{name}' from {path_text!r}: {self._relative(exc)}",
                           param="lora_path") from None
        except (SafetensorError, OSError, ValueError) as exc:
            raise APIError(400, f"cannot load adapter '{name}' from {path_text!r}: unreadable weights "
                                f"({self._relative(exc)})", param="lora_path") from None
        if cfg is not None and cfg.quantized != self.quantized:
            trained, served = ("the NF4-quantized", "unquantized") if cfg.quantized else ("the unquantized", "NF4")
            log.warning("adapter '%s' was trained on %s base; the server runs the %s base, so its replies can "
                        "differ slightly from `slimtune generate` (serve it with --quantize %s)", name, trained, served,
                        "nf4" if cfg.quantized else "none")
        self.paths = {**self.paths, name: path}
        return path

    def _run_config(self, name: str, path: Path, path_text: str) -> Config | None:
        """The run's saved config (None for a bare PEFT adapter), or a 400 if the file cannot be read."""
        try:
            return run_config(path)
        except SlimtuneError as exc:
            reason = self._relative(exc)
        except Exception:  # noqa: BLE001 - whatever the file does to the YAML reader, the load is refused whole
            log.exception("reading the run config of adapter '%s' failed", name)
            reason = f"{RUN_CONFIG} cannot be read"
        raise APIError(400, f"cannot load adapter '{name}' from {path_text!r}: {reason} (the run's {RUN_CONFIG} "
                            "must be a readable slimtune run config, or be absent for a bare PEFT adapter)",
                       param="lora_path")

    def _relative(self, exc: Exception) -> str:
        """`exc`'s message with the adapter root's absolute path taken out: clients see paths relative to it."""
        return str(exc).replace(f"{self.root}{os.sep}", "").replace(str(self.root), ".")

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
