"""What keeps the server safe to expose: the API key, the adapter root, and request limits.

- API key: with a key set (`--api-key` or `SLIMTUNE_API_KEY`), every route but `/health` needs
  `Authorization: Bearer <key>`, compared in constant time (`hmac.compare_digest`), else 401.
- Adapter root: adapters load only from directories inside one root directory (default: the working
  directory the server starts in). A path is taken relative to the root; `..` components are refused
  outright, and the path and every entry of the directory (adapter_config.json, the safetensors
  file, the run's config.yaml ...) are resolved (symlinks followed) and must all stay inside the
  root. Adapter names are short plain words, so a name can never act as a path. Weights are read
  from safetensors only (`read_lora_adapter` refuses pickles).
- Limits: generated tokens, prompt tokens, request body bytes, stop strings, requests in flight,
  loaded adapters and KV-cache tokens are bounded; going over one is a 400, 409, 413 or 429 that says
  which limit and how to stay under it.
- Host header: on a loopback address the server answers only requests whose Host is localhost,
  127.0.0.1 or [::1] (with its port) or a host allowed with --allow-host, so a web page whose domain
  is rebound to 127.0.0.1 (DNS rebinding) cannot reach it from the user's browser.
"""

from __future__ import annotations

import hmac
import os
import re
from dataclasses import dataclass, fields
from collections.abc import Sequence
from pathlib import Path

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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
    max_stop_chars: int = 256  # characters per stop string (each decode step checks them all)
    max_adapters: int = 64  # adapters loaded at once; loading one more is refused (409)
    # Tokens the decode batch's KV cache may hold: rows x (longest prompt + max_tokens of any row) stays under
    # it. None: derived from the memory free when the server starts (`kvbudget.derive_kv_tokens`).
    max_kv_tokens: int | None = None

    def __post_init__(self) -> None:
        bad = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
               if not (f.name == "max_kv_tokens" and getattr(self, f.name) is None)
               and (not isinstance(getattr(self, f.name), int) or getattr(self, f.name) < 1)]
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


def _link_inside(link: Path, root: Path) -> bool:
    try:
        return _inside(link.resolve(), root)
    except (OSError, RuntimeError):  # a loop of links leads nowhere usable
        return False


def confine_adapter_dir(root: Path, path_text: object) -> Path:
    """The resolved adapter directory `path_text` names inside `root` (itself resolved), or an APIError:
    400 for a path that is absolute outside the root, uses '..', or leaves the root through a symlink
    (the directory itself or any entry in it: every file a load reads is one of those entries); 404 for
    one that does not exist. Messages name paths as the client gave them, never the server's own."""
    if not isinstance(path_text, str) or not path_text or "\x00" in path_text:
        raise APIError(400, f"lora_path {path_text!r} must be a non-empty path inside the adapter root",
                       param="lora_path")
    given = Path(path_text)
    if ".." in given.parts:
        raise APIError(400, f"lora_path {path_text!r} contains '..': give a directory inside the adapter root, "
                            "relative to it", param="lora_path")
    try:
        path = (root / given).resolve()  # an absolute `given` replaces root here; the check below still applies
        inside = _inside(path, root)
        is_dir = inside and path.is_dir()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a name too long for the filesystem
        raise APIError(400, f"lora_path {path_text!r} cannot be resolved to a directory", param="lora_path") from None
    if not inside:
        raise APIError(400, f"lora_path {path_text!r} resolves to a place outside the adapter root: adapters load "
                            "only from inside it (start the server with --adapter-root to change it)",
                       param="lora_path")
    if not is_dir:
        raise APIError(404, f"lora_path {path_text!r}: no directory of that name inside the adapter root",
                       param="lora_path", code="adapter_not_found")
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_symlink() and not _link_inside(Path(entry.path), root):
                raise APIError(400, f"lora_path {path_text!r}: {entry.name} is a link to a file outside the adapter "
                                    "root: copy the file into the adapter directory instead", param="lora_path")
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


LOOPBACK_HOST_NAMES = ("localhost", "127.0.0.1", "[::1]")


def loopback_hosts(port: int, extra: Sequence[str] = ()) -> frozenset[str]:
    """The Host header values a loopback server accepts: each loopback name and each of `extra`, bare or
    with `:port` (a client on the default port may leave the port out)."""
    names = [*LOOPBACK_HOST_NAMES, *(name.strip().lower() for name in extra)]
    return frozenset(value for name in names for value in (name, f"{name}:{port}"))


class HostCheckMiddleware:
    """403 for a request whose Host header is not one of `allowed` (lower-case, with or without port)."""

    def __init__(self, app: ASGIApp, allowed: frozenset[str]) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").strip().lower()
        if host in self.allowed:
            return await self.app(scope, receive, send)
        await _send_error(scope, receive, send, 403, f"Host header {host!r} is not served here: this server on a "
                          "loopback address answers only localhost, 127.0.0.1 and [::1] (start it with --allow-host "
                          "NAME to add a name)", code="invalid_host")
