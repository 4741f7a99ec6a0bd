"""vLLM's extra routes: ``POST /tokenize``, ``POST /detokenize`` and ``GET /version``.

``/tokenize`` takes ``{"prompt": str}`` (``add_special_tokens``, default true) or ``{"messages": [...]}``
(``add_generation_prompt``, default true; the chat template applied as the head applies it) and answers
``{"count", "max_model_len", "tokens"}``; ``/detokenize`` takes ``{"tokens": [ids]}`` and answers
``{"prompt": text}``. Both use the head's tokenizer; ``model`` is optional and must be served here.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

import hexgen
from hexgen.head.http.context import HttpContext
from hexgen.head.http.errors import APIError, invalid, unknown_model, unsupported
from hexgen.head.tokenizing import TOKENIZER_ERRORS, model_context_len

MAX_BODY = 1 << 22


class TokensRoutes:
    def __init__(self, ctx: HttpContext) -> None:
        self.ctx = ctx

    async def _body(self, request: Request, allowed: tuple[str, ...]) -> dict[str, Any]:
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise APIError(413, f"request body: exceeds the limit of {MAX_BODY} bytes", code="request_too_large")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise invalid(f"request body: not valid JSON ({e})", None) from None
        if not isinstance(body, dict):
            raise invalid("request body: must be a JSON object", None)
        for k in body:
            if k not in allowed:
                raise unsupported(k, f"unknown parameter for {request.url.path}")
        model = body.get("model")
        if model is not None and model not in self.ctx.models:
            raise unknown_model(str(model), self.ctx.models)
        if self.ctx.tokenizer is None:
            raise APIError(503, "this server has no tokenizer loaded", code="no_tokenizer")
        return body

    async def tokenize(self, request: Request) -> Response:
        body = await self._body(request, ("model", "prompt", "messages", "add_special_tokens", "add_generation_prompt"))
        tok = self.ctx.tokenizer
        try:
            if "messages" in body:
                msgs = body["messages"]
                if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
                    raise invalid("messages: must be a list of {role, content} objects", "messages")
                gen = body.get("add_generation_prompt", True)
                text = tok.apply_chat_template(msgs, add_generation_prompt=bool(gen), tokenize=False)
                ids = tok(text, add_special_tokens=False)["input_ids"]
            else:
                prompt = body.get("prompt")
                if not isinstance(prompt, str):
                    raise invalid("prompt: must be a string (or give messages)", "prompt")
                ids = tok(prompt, add_special_tokens=bool(body.get("add_special_tokens", True)))["input_ids"]
        except TOKENIZER_ERRORS as e:
            raise invalid(f"tokenizing failed: {type(e).__name__}: {e}", None) from None
        return JSONResponse(
            {"count": len(ids), "max_model_len": model_context_len(self.ctx.settings), "tokens": [int(i) for i in ids]}
        )

    async def detokenize(self, request: Request) -> Response:
        body = await self._body(request, ("model", "tokens"))
        ids = body.get("tokens")
        vocab = len(self.ctx.tokenizer)
        ok = isinstance(ids, list) and all(type(t) is int and 0 <= t < vocab for t in ids)
        if not ok:
            raise invalid(f"tokens: must be a list of token ids in [0, {vocab - 1}]", "tokens")
        text = self.ctx.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return JSONResponse({"prompt": text})

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": hexgen.__version__})


def install(app: Starlette, ctx: HttpContext) -> TokensRoutes:
    routes = TokensRoutes(ctx)
    app.add_route("/tokenize", routes.tokenize, methods=["POST"])
    app.add_route("/detokenize", routes.detokenize, methods=["POST"])
    app.add_route("/version", routes.version, methods=["GET"])
    return routes
