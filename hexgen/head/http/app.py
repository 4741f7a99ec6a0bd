"""The head's HTTP app (Starlette) and its server (uvicorn, run inside the head's event loop).

:func:`create_app` adds the OpenAI routes and probes (:mod:`hexgen.head.http.openai_api`) and vLLM's
``/tokenize``, ``/detokenize`` and ``/version`` (:mod:`hexgen.head.http.tokens_api`), then the metrics
and dashboard modules through their ``install(app, ctx)`` hooks. With an API key, every ``/v1/*`` request
needs ``Authorization: Bearer <key>`` (compared in constant time; the key is never logged); the probes,
``/metrics`` and ``/`` stay open. Every error, including unknown routes, is in OpenAI's shape.
:mod:`hexgen.head.http.guards` caps what a client can hold (header bytes, read and idle timeouts,
connections) and adds the security headers and the JSON content-type rule; ``GET /openapi.json`` serves the
API's schema (:mod:`hexgen.head.http.openapi`). The front's Redis pool is bounded by ``http.redis_pool``
(a request waits up to ``http.redis_pool_wait_s`` for a connection) and connections idle for
``http.redis_idle_s`` are closed (:mod:`hexgen.head.http.pool`).

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
from hexgen.head.http.guards import GuardLimits, Hardening, protocol_for

log = logging.getLogger(__name__)

HOOKS = (  # optional modules with install(app, ctx)
    "hexgen.head.http.metrics",
    "hexgen.head.http.dashboard",
    "hexgen.head.http.openapi",
)


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
    from hexgen.head.http import openai_api, tokens_api

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
    tokens_api.install(app, ctx)
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
    app.add_middleware(Hardening)  # outermost: its headers go on the 401s too
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
    h = ctx.settings.http
    guard = GuardLimits(h.max_request_line_bytes, h.max_header_bytes, h.read_timeout_s, h.max_connections)
    config = uvicorn.Config(
        app,
        loop="none",
        http=protocol_for(guard),
        lifespan="on",
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=10,
        timeout_keep_alive=max(1, round(h.keep_alive_s)),
        h11_max_incomplete_event_size=h.max_request_line_bytes + h.max_header_bytes,
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

    def __init__(
        self,
        settings: Any,
        host: str,
        port: int,
        api_key: str = "",
        hooks: tuple[str, ...] = HOOKS,
        tokenizer: Any = None,
    ) -> None:
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
        self.tokenizer = tokenizer
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
        from hexgen.head.http.pool import IdleReaper, bounded_redis

        s = self.settings
        redis = bounded_redis(s)
        ctx = HttpContext(settings=s, redis=redis, models=(s.model.name,), tokenizer=self.tokenizer)
        reaper = asyncio.create_task(IdleReaper(redis, s.http.redis_idle_s).run(), name="hexgen-http-pool-reaper")
        log.info("head: HTTP API on %s (%s)", self.url, "API key required on /v1/*" if self.api_key else "no API key")
        try:
            await serve_http(ctx, self.sock, stop, api_key=self.api_key, hooks=self.hooks)
        finally:
            reaper.cancel()
            await asyncio.gather(reaper, return_exceptions=True)
            await redis.aclose()
            self.sock.close()
