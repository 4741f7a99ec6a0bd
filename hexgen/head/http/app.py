"""The head's HTTP app (Starlette) and its server (uvicorn, run inside the head's event loop).

:func:`create_app` adds the OpenAI routes and probes (:mod:`hexgen.head.http.openai_api`, with the request, response and stream modules beside it), then the metrics
and dashboard modules through their ``install(app, ctx)`` hooks. With an API key, every ``/v1/*`` request
needs ``Authorization: Bearer <key>`` (compared in constant time; the key is never logged); the probes,
``/metrics`` and ``/`` stay open. Every error, including unknown routes, is in OpenAI's shape.

Starlette rather than FastAPI: less server CPU per request on uvicorn + uvloop + httptools, and the request
validation is ours anyway (the Redis path's, naming the parameter and its range, which FastAPI's 422 shape
does not).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib
import logging
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from hexgen.head.http.context import HttpContext
from hexgen.head.http.errors import APIError, error_response

log = logging.getLogger(__name__)

POOL_CONNECTIONS = 10_000  # the HTTP front's Redis pool (as hexgen.client's default)
HOOKS = ("hexgen.head.http.metrics", "hexgen.head.http.dashboard")  # optional modules with install(app, ctx)


class APIKeyAuth:
    """ASGI middleware: ``/v1/*`` requests need ``Authorization: Bearer <api_key>``, else a 401."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self._key = api_key.encode("utf-8")

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and (scope["path"] == "/v1" or scope["path"].startswith("/v1/")):
            given = b""
            for name, value in scope["headers"]:
                if name == b"authorization":
                    given = value
                    break
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._key):
                why = "missing" if not given else "incorrect"
                err = APIError(
                    401,
                    f"{why} API key: send the header 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, APIError):
        return await _internal_error(request, exc)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, HTTPException):
        return await _internal_error(request, exc)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    msg = f"{request.method} {request.url.path}: {exc.detail}"
    return error_response(APIError(exc.status_code, msg, code=code, headers=exc.headers))


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("http: %s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(APIError(500, f"internal error: {type(exc).__name__}", code="internal_error"))


def create_app(ctx: HttpContext, api_key: str = "", hooks: tuple[str, ...] = HOOKS) -> Starlette:
    """The Starlette app for ``ctx``: OpenAI routes and probes, then each importable hook's ``install``."""
    from hexgen.head.http import openai_api

    routes_box: list[Any] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        for r in routes_box:
            await r.aclose()

    app = Starlette(
        lifespan=lifespan,
        exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _internal_error},
    )
    app.state.ctx = ctx
    routes_box.append(openai_api.install(app, ctx))
    for name in hooks:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.install(app, ctx)
    if api_key:
        app.add_middleware(APIKeyAuth, api_key=api_key)
    return app


class _Server:
    """uvicorn's Server without its signal handlers (the head owns SIGTERM/SIGINT)."""

    def __init__(self, config: Any) -> None:
        import uvicorn

        class Quiet(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield

        self.server = Quiet(config)

    async def serve(self, sock: socket.socket) -> None:
        await self.server.serve(sockets=[sock])

    def stop(self) -> None:
        self.server.should_exit = True


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one); OSError (the socket closed) on failure."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_http(
    ctx: HttpContext, sock: socket.socket, stop: asyncio.Event, api_key: str = "", hooks: tuple[str, ...] = HOOKS
) -> None:
    """Serve the app on ``sock`` until ``stop`` is set, then finish open responses (uvicorn's graceful exit)."""
    import uvicorn

    app = create_app(ctx, api_key=api_key, hooks=hooks)
    config = uvicorn.Config(
        app,
        loop="none",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=10,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sock), name="hexgen-http")
    waiter = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        server.stop()
        waiter.cancel()
        await asyncio.gather(task, waiter, return_exceptions=True)
    if task.done() and not task.cancelled() and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]


class HttpFront:
    """The head's HTTP server for one deployment. The socket is bound here, so a busy port fails the head
    at start (ConfigError naming ``http.port``); :meth:`run` serves until its ``stop`` event is set."""

    def __init__(self, settings: Any, host: str, port: int, api_key: str = "", hooks: tuple[str, ...] = HOOKS) -> None:
        from hexgen.errors import ConfigError

        try:
            self.sock = bind(host, port)
        except OSError as e:
            raise ConfigError(f"http.host, http.port: cannot listen on {host}:{port}: {e.strerror or e}") from e
        except (socket.gaierror, UnicodeError) as e:
            raise ConfigError(f"http.host: {host!r} is not a usable address: {e}") from e
        self.settings = settings
        self.api_key = api_key
        self.hooks = hooks
        bound = self.sock.getsockname()
        self.host, self.port = host, bound[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, on_failure: Callable[[], None]) -> None:
        """Serve in a task of the running loop until :meth:`close`; ``on_failure`` is called if it ends first."""
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self.run(self._stop), name="hexgen-head-http")
        self._task.add_done_callback(lambda t: None if self._stop.is_set() else on_failure())

    async def close(self) -> None:
        """Stop serving (open responses get a few seconds) and wait; log the failure of one that died early."""
        task = getattr(self, "_task", None)
        if task is None:
            self.sock.close()
            return
        early = task.done()
        self._stop.set()
        await asyncio.gather(task, return_exceptions=True)
        if early and not task.cancelled() and task.exception() is not None:
            log.error("head: the HTTP server failed: %r", task.exception())

    async def run(self, stop: asyncio.Event) -> None:
        from hexgen.wire.settings import async_redis

        s = self.settings
        # every stream being read holds one pooled connection while it blocks: redis-py's default cap (100)
        # would refuse the 101st concurrent request
        redis = async_redis(s.redis.url, socket_timeout=s.limits.socket_timeout_s, max_connections=POOL_CONNECTIONS)
        ctx = HttpContext(settings=s, redis=redis, models=(s.model.name,))
        log.info("head: HTTP API on %s (%s)", self.url, "API key required on /v1/*" if self.api_key else "no API key")
        try:
            await serve_http(ctx, self.sock, stop, api_key=self.api_key, hooks=self.hooks)
        finally:
            await redis.aclose()
            self.sock.close()
