"""``GET /openapi.json``: the OpenAPI 3.1 schema of the HTTP API, every answer each route can give.

The request bodies list the parameters the routes accept (:mod:`hexgen.head.http.openai_api`); the ranges
are the Redis path's validation's, so the schema gives types and leaves the ranges to the 400 answers, which
name the parameter. Each route declares every status it can answer, each error in OpenAI's shape.
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from hexgen.head.http.context import HttpContext

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_WHY = {
    "400": "a parameter is missing, of the wrong type or out of range (param names it)",
    "401": "missing or incorrect API key (when the server has one)",
    "404": "unknown model or route",
    "405": "method not allowed",
    "413": "request body too large",
    "415": "Content-Type is not application/json",
    "429": "the work queue is full; retry later",
    "499": "the client closed the request",
    "500": "internal error",
    "503": "no ready pipeline, the deadline passed, or Redis unavailable; retry later",
}
_NUM = {"type": "number"}
_INT = {"type": "integer"}
_STOP = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}, {"type": "null"}]}
_COMMON_PARAMS: dict[str, Any] = {
    "model": {"type": "string"},
    "max_tokens": {"type": ["integer", "null"], "minimum": 1},
    "temperature": {"type": ["number", "null"]},
    "top_p": {"type": ["number", "null"]},
    "top_k": {"type": ["integer", "null"]},
    "seed": {"type": ["integer", "null"]},
    "stop": _STOP,
    "stream": {"type": ["boolean", "null"]},
    "stream_options": {"type": ["object", "null"], "properties": {"include_usage": {"type": ["boolean", "null"]}}},
    "ignore_eos": {"type": ["boolean", "null"]},
    "deadline_s": {"type": ["number", "null"], "exclusiveMinimum": 0},
    "n": {"type": ["integer", "null"]},
    "user": {"type": ["string", "null"]},
}
_MESSAGE = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {"type": "string"},
    },
}
_COMPLETION_ANSWER = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {"id": {"type": "string"}, "object": {"type": "string"}, "choices": {"type": "array"}},
}


def _errors(*codes: str) -> dict[str, Any]:
    return {c: {"description": _WHY[c], "content": {"application/json": {"schema": _ERROR}}} for c in codes}


def _generation(summary: str, body: dict[str, Any]) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
            "responses": {
                "200": {
                    "description": "the answer (JSON), or server-sent events with stream: true",
                    "content": {
                        "application/json": {"schema": _COMPLETION_ANSWER},
                        "text/event-stream": {"schema": {"type": "string"}},
                    },
                },
                **_errors("400", "401", "404", "405", "413", "415", "429", "499", "500", "503"),
            },
        }
    }


def _json_get(summary: str, schema: dict[str, Any], *codes: str) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "responses": {
                "200": {"description": "ok", "content": {"application/json": {"schema": schema}}},
                **_errors(*codes),
            },
        }
    }


def schema() -> dict[str, Any]:
    """The OpenAPI document."""
    chat = {
        "type": "object",
        "required": ["messages"],
        "properties": {
            **_COMMON_PARAMS,
            "messages": {"type": "array", "items": _MESSAGE, "minItems": 1},
            "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1},
        },
    }
    completion = {
        "type": "object",
        "required": ["prompt"],
        "properties": {
            **_COMMON_PARAMS,
            "prompt": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        },
    }
    model = {
        "type": "object",
        "required": ["id", "object"],
        "properties": {"id": {"type": "string"}, "object": {"type": "string"}},
    }
    probe = {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}}
    probe_503 = {"description": "not ready or Redis down", "content": {"application/json": {"schema": probe}}}
    models = _json_get(
        "the served models",
        {"type": "object", "required": ["data"], "properties": {"data": {"type": "array", "items": model}}},
        "401",
        "405",
    )
    one_model = _json_get("one served model", model, "401", "404", "405")
    one_model["get"]["parameters"] = [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}]
    health = _json_get("liveness: the head and its Redis", probe, "405")
    health["get"]["responses"]["503"] = probe_503
    ready = _json_get("readiness: some pipeline is ready", probe, "405")
    ready["get"]["responses"]["503"] = probe_503
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "HexGen HTTP API",
            "version": "1",
            "description": "OpenAI-compatible generation over HexGen pipelines",
        },
        "paths": {
            "/v1/chat/completions": _generation("chat completion", chat),
            "/v1/completions": _generation("text completion", completion),
            "/v1/models": models,
            "/v1/models/{model}": one_model,
            "/health": health,
            "/ready": ready,
            "/openapi.json": {
                "get": {
                    "summary": "this schema",
                    "responses": {
                        "200": {
                            "description": "the OpenAPI document",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
        },
    }


def install(app: Starlette, ctx: HttpContext) -> None:
    """Add ``GET /openapi.json``."""
    doc = schema()

    async def openapi(request: Request) -> Response:
        return JSONResponse(doc)

    app.add_route("/openapi.json", openapi, methods=["GET"])
