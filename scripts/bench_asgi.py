"""Server CPU time per request of the ASGI stacks the HTTP front could use (uvicorn + uvloop + httptools).

Each candidate app serves the shape of ``/v1/chat/completions``: a JSON body with messages is parsed and
checked, then either one JSON answer or an SSE stream of ``--chunks`` ``data:`` lines and ``[DONE]``. The
server runs in a child process; the figure is the server's CPU seconds (user + system, from /proc) per
request, which a busy shared machine disturbs far less than wall-clock throughput. Run::

    python scripts/bench_asgi.py --requests 2000 --concurrency 16
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

APPS = {
    "starlette": '''
import json
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

async def chat(request):
    body = await request.json()
    if not isinstance(body.get("messages"), list):
        return JSONResponse({"error": {"message": "messages", "type": "invalid_request_error",
                                       "param": "messages", "code": None}}, status_code=400)
    n = int(body.get("max_tokens", 16))
    if body.get("stream"):
        async def gen():
            for i in range(n):
                chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
                         "choices": [{"index": 0, "delta": {"content": "tok"}, "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\\n\\n"
            yield "data: [DONE]\\n\\n"
        return StreamingResponse(gen(), media_type="text/event-stream")
    return JSONResponse({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": "tok" * n},
                                      "finish_reason": "length"}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}})

app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
''',
    "fastapi": '''
import json
from typing import Optional
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

class Message(BaseModel):
    role: str
    content: str

class ChatRequest(BaseModel):
    model: str
    messages: list[Message]
    max_tokens: int = 16
    stream: bool = False
    temperature: Optional[float] = None

app = FastAPI()

@app.post("/v1/chat/completions")
async def chat(req: ChatRequest):
    n = req.max_tokens
    if req.stream:
        async def gen():
            for i in range(n):
                chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
                         "choices": [{"index": 0, "delta": {"content": "tok"}, "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\\n\\n"
            yield "data: [DONE]\\n\\n"
        return StreamingResponse(gen(), media_type="text/event-stream")
    return JSONResponse({"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": "tok" * n},
                                      "finish_reason": "length"}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}})
''',
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


async def _load(port: int, n: int, conc: int, stream: bool, chunks: int) -> float:
    import httpx

    body = {"model": "m", "messages": [{"role": "user", "content": "hello " * 20}], "max_tokens": chunks,
            "stream": stream}
    sem = asyncio.Semaphore(conc)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30,
                                 limits=httpx.Limits(max_connections=conc)) as c:
        async def one() -> None:
            async with sem:
                if stream:
                    async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                        async for _ in r.aiter_lines():
                            pass
                else:
                    r = await c.post("/v1/chat/completions", json=body)
                    r.raise_for_status()
        await asyncio.gather(*(one() for _ in range(50)))  # warm-up
        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--chunks", type=int, default=32, help="SSE chunks per streamed answer")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = []
    for rep in range(args.repeats):
        for name, src in APPS.items():
            port = _free_port()
            code = src + f"\nimport uvicorn\nuvicorn.run(app, host='127.0.0.1', port={port}, loop='uvloop', " \
                         "http='httptools', log_level='warning', access_log=False)\n"
            proc = subprocess.Popen([sys.executable, "-c", code])
            try:
                deadline = time.monotonic() + 30
                while True:
                    try:
                        socket.create_connection(("127.0.0.1", port), 0.2).close()
                        break
                    except OSError:
                        if time.monotonic() > deadline or proc.poll() is not None:
                            raise RuntimeError(f"{name}: server did not start")
                        time.sleep(0.05)
                for stream in (False, True):
                    c0 = _cpu_s(proc.pid)
                    wall = asyncio.run(_load(port, args.requests, args.concurrency, stream, args.chunks))
                    cpu = _cpu_s(proc.pid) - c0
                    rows.append({"stack": name, "stream": stream, "repeat": rep,
                                 "server_cpu_us_per_request": round(1e6 * cpu / args.requests),
                                 "requests_per_s": round(args.requests / wall)})
                    print(json.dumps(rows[-1]), flush=True)
            finally:
                proc.terminate()
                proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
