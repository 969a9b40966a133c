"""HTTP errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Every request that fails for a reason the client can fix gets one of these with a 4xx status and a
message naming the bad value and the fix; the server itself keeps serving.
"""

from __future__ import annotations

from typing import Any

# OpenAI's `type` for each status the server sends.
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
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
