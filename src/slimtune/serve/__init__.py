"""An OpenAI-compatible HTTP server: one base model, many adapters, mixed in every decode batch.

    slimtune serve --adapter docs=runs/docstrings --adapter sql=runs/sql

Modules: `server` (load + listen), `app` (routes), `engine` (the batched decode loop), `kvbatch` (the
left-padded KV cache it decodes), `sampling`, `detokenize` (reply text and stop strings), `registry`
(adapters by name), `security` (API key, adapter root, limits), `schemas` (request and response
bodies), `errors` (OpenAI's error shape).
"""

from slimtune.serve.security import ServeLimits
from slimtune.serve.server import build_app, serve

__all__ = ["ServeLimits", "build_app", "serve"]
