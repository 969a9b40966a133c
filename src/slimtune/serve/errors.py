"""HTTP errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Every request that fails for a reason the client can fix gets one of these with a 4xx status and a
message naming the bad value and the fix; the server itself keeps serving. Anything else that goes
wrong is a server fault: `FaultBoundary` answers it with a 500 in the same shape that names the
request id (every response carries it in `x-request-id`) and nothing else: no exception class, no
path, no traceback; those go to the server's log under the same id.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("slimtune.serve")
REQUEST_ID_HEADER = "x-request-id"

# OpenAI's `type` for each status the server sends.
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          409: "conflict_error", 413: "invalid_request_error", 429: "rate_limit_error", 500: "internal_server_error",
          503: "service_unavailable_error"}


class APIError(Exception):
    """A request failed with `status`; `param` names the request field at fault, when there is one."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The JSON body of an error response, as OpenAI's API writes it."""
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def new_fault_id() -> str:
    """A short random id tying a 500's message to its traceback in the server's log."""
    return f"req_{uuid.uuid4().hex[:16]}"


def server_fault(fault_id: str, what: str = "the request failed") -> APIError:
    """The 500 a client sees for a server fault: the id to quote, never the exception itself."""
    return APIError(500, f"{what} because of an error inside the server (request id {fault_id}); the server's log "
                         "has the details under that id: retry, or report it with the id", code="internal_error")


class FaultBoundary:
    """Outermost middleware: gives each HTTP request an id (scope['state']['request_id'], and the
    `x-request-id` response header), and turns any exception the app lets through into a logged 500 in
    OpenAI's shape (or, once a response has started, ends that response)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = new_fault_id()
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:  # noqa: BLE001 - the boundary: whatever escaped is logged here, the client gets a 500
            log.exception("request %s %s failed (request id %s)", scope.get("method"), scope.get("path"), request_id)
            if started:
                raise  # the status line has gone out: the server can only cut the response short
            error = server_fault(request_id)
            await JSONResponse(error.body(), status_code=500)(scope, receive, send_with_id)
