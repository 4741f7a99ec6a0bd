"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``, with their HTTP status.

:class:`APIError` is raised anywhere in a route; the app's exception handler turns it into a JSON response
(:func:`error_response`). :func:`from_request_error` maps the Redis path's error codes
(:mod:`hexgen.wire.protocol`) onto HTTP: ``invalid_request`` 400, ``not_found`` 404, ``overloaded`` 429
(with ``Retry-After``), ``internal`` 500, ``timeout`` and ``no_ready_pipeline`` 503 (with ``Retry-After``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from starlette.responses import JSONResponse

from hexgen.wire.protocol import (
    INTERNAL,
    INVALID_REQUEST,
    NO_READY_PIPELINE,
    NOT_FOUND,
    OVERLOADED,
    TIMEOUT,
    RequestError,
)

RETRY_AFTER_S = 1  # what a 429 or 503 asks the client to wait

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    414: "invalid_request_error",
    415: "invalid_request_error",
    431: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}
_FIELD_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_.\[\]]*(?:, [A-Za-z_][A-Za-z0-9_.\[\]]*)*): ")


class APIError(Exception):
    """An error answer: HTTP ``status``, OpenAI ``message`` / ``type`` / ``param`` / ``code``, extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def sse(self) -> str:
        """The error as one server-sent event (a stream that already started sends this, then [DONE])."""
        return f"data: {json.dumps(self.body(), ensure_ascii=False)}\n\n"


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def invalid(message: str, param: str | None) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def unsupported(param: str, why: str) -> APIError:
    return APIError(400, f"{param}: {why}", param=param, code="unsupported_parameter")


def overloaded(message: str) -> APIError:
    return APIError(429, message, code="overloaded", headers={"Retry-After": str(RETRY_AFTER_S)})


def not_ready(model: str) -> APIError:
    return APIError(
        503,
        f"model {model!r} has no ready pipeline (no pipeline in state ready with live heartbeats); retry later",
        code="no_ready_pipeline",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def unknown_model(model: str, served: tuple[str, ...]) -> APIError:
    return APIError(
        404,
        f"model: {model!r} is not served here; available: {', '.join(served)}",
        param="model",
        code="model_not_found",
    )


def field_of(message: str) -> str | None:
    """The field a Redis-path error message names (``"temperature: 3 is out of range"`` -> temperature)."""
    m = _FIELD_RE.match(message)
    return m.group(1).split(", ")[-1] if m else None


def from_request_error(e: RequestError, rename: Mapping[str, str] | None = None) -> APIError:
    """The HTTP error for a Redis-path RequestError; ``rename`` maps wire field names to the request's own
    (``max_new_tokens`` -> ``max_tokens``), in the message and in ``param``."""
    message = e.message
    for wire, name in (rename or {}).items():
        message = re.sub(rf"\b{re.escape(wire)}\b", name, message)
    if e.code == INVALID_REQUEST:
        return invalid(message, field_of(message))
    if e.code == NOT_FOUND:
        return APIError(404, message, param="model", code="model_not_found")
    if e.code == OVERLOADED:
        return overloaded(message)
    if e.code == INTERNAL:
        return APIError(500, message, code="internal_error")
    if e.code in (TIMEOUT, NO_READY_PIPELINE):
        return APIError(503, message, code=e.code, headers={"Retry-After": str(RETRY_AFTER_S)})
    return APIError(500, f"{e.code}: {message}", code=e.code)
