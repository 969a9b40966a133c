"""`model: "auto"` (the name is configurable): the server picks, per request, the loaded adapter whose routing
signature is closest to the prompt (slimtune.routing), or the base model below the threshold.

Only adapters whose directory holds a `routing_signature.safetensors` are candidates; adapters loaded or
unloaded at run time join or leave at once. Routing runs the base model over the prompt text once, on the
engine thread between two decode steps (it owns the model), with the adapters switched off.
"""

from __future__ import annotations

import logging
from pathlib import Path

from slimtune.errors import AdapterError
from slimtune.routing import SIGNATURE_NAME, Route, Router, Signature
from slimtune.serve.registry import AdapterRegistry

log = logging.getLogger("slimtune.serve")


class ServeRouter:
    """The route name, and the signatures of the registry's adapters (read once per file version)."""

    def __init__(self, name: str, registry: AdapterRegistry, model, tokenizer, threshold: float | None = None) -> None:
        self.name, self.registry, self.model, self.tokenizer, self.threshold = name, registry, model, tokenizer, threshold
        self._cache: dict[Path, tuple[float, Signature]] = {}

    def _signature(self, adapter: str, path: Path) -> Signature | None:
        file = path / SIGNATURE_NAME
        if not file.is_file():
            return None
        stamp = file.stat().st_mtime
        cached = self._cache.get(path)
        if cached is None or cached[0] != stamp:
            try:
                cached = self._cache[path] = (stamp, Signature.load(path))
            except AdapterError as exc:
                log.warning("adapter '%s' is left out of routing: %s", adapter, exc)
                return None
        return cached[1]

    def offered(self) -> bool:
        """Whether some loaded adapter has a signature (only then is the route name listed in /v1/models)."""
        return any((path / SIGNATURE_NAME).is_file() for path in self.registry.paths.values())

    def pick(self, text: str) -> Route:
        """The route for `text` (call on the engine thread)."""
        signatures = {name: sig for name, path in self.registry.paths.items()
                      if (sig := self._signature(name, path)) is not None}
        with self.registry.adapters.disabled():
            chosen = Router(self.model, self.tokenizer, signatures, self.threshold).route(text)
        log.info("%s: routed to %s (score %.3f; %s)", self.name, chosen.name or f"the base model",
                 chosen.score, ", ".join(f"{n} {s:.3f}" for n, s in chosen.scores.items()) or "no signatures")
        return chosen
