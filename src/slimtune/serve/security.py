"""What keeps the server safe to expose: the API key, the adapter root, and request limits.

- API key: with a key set (`--api-key` or `SLIMTUNE_API_KEY`), every route but `/health` needs
  `Authorization: Bearer <key>`, compared in constant time (`hmac.compare_digest`), else 401.
- Adapter root: adapters load only from directories inside one root directory (default: the working
  directory the server starts in). A path is taken relative to the root; `..` components are refused
  outright, and the path, its adapter_config.json and its safetensors file are resolved (symlinks
  followed) and must all stay inside the root. Adapter names are short plain words, so a name can
  never act as a path. Weights are read from safetensors only (`read_lora_adapter` refuses pickles).
- Limits: generated tokens, prompt tokens, request body bytes and requests in flight are bounded;
  going over one is a 400, 413 or 429 that says which limit and how to stay under it.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass, fields
from pathlib import Path

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from slimtune.adapters import CONFIG_NAME, WEIGHTS_NAME
from slimtune.errors import ConfigError
from slimtune.serve.errors import APIError, error_body

OPEN_PATHS = frozenset({"/health"})  # routes that answer without the API key
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


@dataclass(frozen=True)
class ServeLimits:
    """Bounds on what one request may ask for and on how much the server takes on at once."""

    max_tokens: int = 1024  # the largest `max_tokens` a request may ask for
    default_max_tokens: int = 256  # used when a request gives no `max_tokens`
    max_prompt_tokens: int = 4096  # longer prompts are refused (the model's context may bound them further)
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    max_concurrent: int = 256  # prompts queued or being generated; more get 429
    max_batch: int = 64  # sequences decoded together in one forward pass
    prefill_tokens: int = 4096  # prompt tokens prefilled together in one forward pass
    max_stop: int = 16  # stop strings per request

    def __post_init__(self) -> None:
        bad = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
               if not isinstance(getattr(self, f.name), int) or getattr(self, f.name) < 1]
        if bad:
            raise ConfigError(f"server limits must be positive integers, got {', '.join(bad)}")
        if self.default_max_tokens > self.max_tokens:
            raise ConfigError(f"default_max_tokens={self.default_max_tokens} exceeds max_tokens={self.max_tokens}: "
                              "lower it or raise max_tokens")


def check_adapter_name(name: object, base_name: str) -> str:
    """`name` if it is a usable adapter name, else a 400 naming the rule."""
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise APIError(400, f"adapter name {name!r} is not allowed: use 1-64 letters, digits, '_' or '-', "
                            "starting with a letter or digit", param="lora_name")
    if name == base_name:
        raise APIError(400, f"adapter name {name!r} is the base model's name: choose another", param="lora_name")
    return name


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def confine_adapter_dir(root: Path, path_text: object) -> Path:
    """The resolved adapter directory `path_text` names inside `root` (itself resolved), or an APIError:
    400 for a path that is absolute outside the root, uses '..', or leaves the root through a symlink;
    404 for one that does not exist."""
    if not isinstance(path_text, str) or not path_text or "\x00" in path_text:
        raise APIError(400, f"lora_path {path_text!r} must be a non-empty path inside the adapter root '{root}'",
                       param="lora_path")
    given = Path(path_text)
    if ".." in given.parts:
        raise APIError(400, f"lora_path {path_text!r} contains '..': give a directory inside the adapter root "
                            f"'{root}', relative to it", param="lora_path")
    path = (root / given).resolve()  # an absolute `given` replaces root here; the check below still applies
    if not _inside(path, root):
        raise APIError(400, f"lora_path {path_text!r} resolves to '{path}', outside the adapter root '{root}': "
                            "adapters load only from inside it (start the server with --adapter-root to change it)",
                       param="lora_path")
    if not path.is_dir():
        raise APIError(404, f"lora_path {path_text!r}: no directory '{path}' inside the adapter root",
                       param="lora_path", code="adapter_not_found")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        file = (path / name).resolve()
        if (path / name).exists() and not _inside(file, root):
            raise APIError(400, f"lora_path {path_text!r}: {name} is a link to '{file}', outside the adapter root "
                                f"'{root}'", param="lora_path")
    return path


async def _send_error(scope: Scope, receive: Receive, send: Send, status: int, message: str,
                      headers: dict[str, str] | None = None, code: str | None = None) -> None:
    await JSONResponse(error_body(status, message, code=code), status_code=status, headers=headers)(scope, receive, send)


class APIKeyMiddleware:
    """401 unless `Authorization: Bearer <key>` matches the key (constant-time); `/health` stays open."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        # compare_digest takes time independent of where the strings differ: no key recovery by timing.
        if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.key):
            return await self.app(scope, receive, send)
        message = ("missing API key: send the header 'Authorization: Bearer <key>'" if not header else
                   "invalid API key: the 'Authorization: Bearer <key>' header does not hold the server's key")
        await _send_error(scope, receive, send, 401, message, {"WWW-Authenticate": "Bearer"}, code="invalid_api_key")


class BodyLimitMiddleware:
    """413 for a request body over `limit` bytes, judged by Content-Length or, without it, while reading.

    The body is read here (at most `limit` bytes are held) and handed on whole, so the app never sees
    a truncated request.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        too_big = (f"request body exceeds the server's limit of {self.limit} bytes: send a shorter prompt, "
                   "or start the server with a larger --max-body-bytes")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _send_error(scope, receive, send, 413, too_big, code="request_too_large")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await _send_error(scope, receive, send, 413, too_big, code="request_too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body_sent = False

        async def replay() -> Message:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later calls wait for the disconnect, as the server's own receive does

        await self.app(scope, replay, send)
