"""What the HTTP front does before and around the app to stay up under a hostile client.

:class:`GuardedHttpTools` is uvicorn's httptools protocol with caps checked on the raw bytes, before the
parser joins them: a request line longer than ``http.max_request_line_bytes`` gets 414 and a request head
longer than ``max_request_line_bytes + max_header_bytes`` gets 431; a connection must send a whole request
(head and body) within ``http.read_timeout_s`` of its first byte, or of its opening (408 and closed), and
one open beyond ``http.max_connections`` is answered 503 and closed at once. Idle keep-alive connections
close after ``http.keep_alive_s`` (uvicorn's ``timeout_keep_alive``).

:class:`Hardening` is ASGI middleware: every response gets ``X-Content-Type-Options: nosniff`` and a frame
policy (``X-Frame-Options: DENY``, ``Content-Security-Policy: frame-ancestors 'none'``); a POST to ``/v1/*``
whose ``Content-Type`` is not ``application/json`` is a 415, so a web page cannot start a generation with a
"simple" cross-site request (``text/plain`` forms and ``fetch`` with no preflight). The front sends no CORS
headers: a browser's preflight for a JSON POST from another origin fails.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, MutableMapping
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from hexgen.head.http.errors import APIError, error_response

log = logging.getLogger(__name__)

SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"frame-ancestors 'none'"),
)
_STATUS_TEXT = {
    408: "Request Timeout",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


def raw_error(status: int, message: str, code: str) -> bytes:
    """A complete HTTP/1.1 error answer in OpenAI's shape that closes the connection."""
    err = APIError(status, message, code=code)
    body = json.dumps(err.body()).encode("utf-8")
    head = [
        f"HTTP/1.1 {status} {_STATUS_TEXT.get(status, 'Error')}".encode("ascii"),
        b"content-type: application/json",
        b"content-length: " + str(len(body)).encode("ascii"),
        b"connection: close",
        *(k + b": " + v for k, v in SECURITY_HEADERS),
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class GuardLimits:
    """The caps :class:`GuardedHttpTools` enforces (from ``[http]``; set on the class by :func:`protocol_for`)."""

    def __init__(self, max_request_line: int, max_header: int, read_timeout_s: float, max_connections: int) -> None:
        self.max_request_line = max_request_line
        self.max_head = max_request_line + max_header
        self.read_timeout_s = read_timeout_s
        self.max_connections = max_connections


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with byte caps before parsing, a read timeout and a connection cap."""

    limits: GuardLimits

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # reading a request head (from the connection's opening or the message's start)
        self._line_done = False
        self._head_bytes = 0
        self._read_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            msg = f"the server holds {self.limits.max_connections} connections (http.max_connections); retry later"
            self._refuse(503, msg, "too_many_connections")
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_head and not self.transport.is_closing():
            if self._read_timer is None:
                self._arm()
            end = data.find(b"\r\n\r\n")
            head = data if end < 0 else data[: end + 4]
            if not self._line_done:
                nl = head.find(b"\n")
                line = self._head_bytes + (nl if nl >= 0 else len(head))
                if line > self.limits.max_request_line:
                    self._refuse(414, f"request line: exceeds {self.limits.max_request_line} bytes", "uri_too_long")
                    return
                self._line_done = nl >= 0
            self._head_bytes += len(head)
            if self._head_bytes > self.limits.max_head:
                msg = f"request headers: exceed {self.limits.max_head - self.limits.max_request_line} bytes"
                self._refuse(431, msg, "headers_too_large")
                return
        elif self.transport.is_closing():
            return
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._line_done, self._head_bytes = True, False, 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._in_head, self._line_done, self._head_bytes = True, False, 0  # keep-alive: idle, timed by uvicorn

    def _arm(self) -> None:
        self._disarm()
        self._read_timer = self.loop.call_later(self.limits.read_timeout_s, self._read_timeout)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timeout(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is None or self._in_head:  # no complete request head yet: answer 408
            msg = f"request: not received within {self.limits.read_timeout_s:g} s (http.read_timeout_s)"
            self._refuse(408, msg, "request_timeout")
        else:  # the body stalled: the app sees a disconnect
            self.transport.close()

    def _refuse(self, status: int, message: str, code: str) -> None:
        self._disarm()
        if self.cycle is not None and not self.cycle.response_complete and not self._in_head:
            self.transport.close()
            return
        self.transport.write(raw_error(status, message, code))
        self.transport.close()


def protocol_for(limits: GuardLimits) -> type[GuardedHttpTools]:
    """A :class:`GuardedHttpTools` subclass bound to ``limits`` (uvicorn instantiates the class itself)."""
    return type("BoundGuardedHttpTools", (GuardedHttpTools,), {"limits": limits})


class Hardening:
    """ASGI middleware: security headers on every response; ``application/json`` required on ``/v1/*`` POSTs."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_hardened(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in names]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        if scope["method"] == "POST" and scope["path"].startswith("/v1/"):
            ctype = b""
            for name, value in scope["headers"]:
                if name == b"content-type":
                    ctype = value
                    break
            media = ctype.split(b";", 1)[0].strip().lower()
            if media != b"application/json":
                shown = ctype.decode("latin-1")[:80] if ctype else "missing"
                err = APIError(
                    415,
                    f"Content-Type: {shown!r} is not allowed; send the body as application/json",
                    param="Content-Type",
                    code="unsupported_media_type",
                )
                await error_response(err)(scope, receive, send_hardened)
                return
        await self.app(scope, receive, send_hardened)
