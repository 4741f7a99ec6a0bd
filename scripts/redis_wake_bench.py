#!/usr/bin/env python3
"""The floor of one hop through redis-server: a writer process XADDs a ``time.monotonic()`` stamp, a reader
process blocked in XREAD gets it; prints p50 / p90 of (reader has it - stamp) per way of reading:

- ``raw``: no client library, RESP written and read on plain sockets (the floor for redis-server itself);
- ``sync``: redis-py, blocking XREAD (the worker's prefetch thread and the sink read this way);
- ``unix``: as ``sync``, both clients on redis-server's unix socket rather than TCP on 127.0.0.1;
- ``asyncio`` / ``uvloop``: redis.asyncio XREAD on the default and on uvloop's event loop (the head, the client);
- ``spin``: redis-py, the XREAD sent, then the socket polled without sleeping until the reply is there (what a
  busy-polling reader would save: the reader's own wake-up);
- ``pipe``: no Redis, the stamp written to a pipe that the reader blocks on (the host's process wake-up).

CLOCK_MONOTONIC is host-wide, so the two processes' stamps compare. redis-server must be on PATH::

    python scripts/redis_wake_bench.py [--messages 300] [--gap-ms 5]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import select
import socket
import subprocess
import sys
import tempfile
import time

import redis

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hexgen.demo import Deployment, start_redis  # noqa: E402

MODES = ("raw", "sync", "unix", "asyncio", "uvloop", "spin", "pipe")
SOCK = "redis.sock"  # in the bench's temporary folder (--dir); the ``unix`` mode's writer and reader use it


def _client(mode: str, port: int) -> redis.Redis:
    return redis.Redis(unix_socket_path=os.path.join(os.environ["WAKE_DIR"], SOCK)) if mode == "unix" \
        else redis.Redis(port=port)


def _read_sync(r: redis.Redis, n: int, spin: bool) -> list[float]:
    out: list[float] = []
    last = "$"
    while len(out) < n:
        if spin:
            conn = r.connection_pool.get_connection()
            try:
                conn.send_command("XREAD", "COUNT", 10, "BLOCK", 5000, "STREAMS", "s", last)
                while not conn.can_read(timeout=0):
                    pass
                res = conn.read_response()
            finally:
                r.connection_pool.release(conn)
            # the raw reply: {stream: [[id, [field, value, ...]], ...]} (RESP3) or [[stream, [...]], ...]
            pairs = res.items() if isinstance(res, dict) else (res or [])
            res = [(k, [(eid, dict(zip(kv[::2], kv[1::2]))) for eid, kv in ents]) for k, ents in pairs]
        else:
            res = r.xread({"s": last}, block=5000, count=10)
        now = time.monotonic()
        for _stream, ents in res or []:
            for eid, fields in ents:
                last = eid
                out.append(now - float(fields[b"t"]))
    return out


def _resp(*args: object) -> bytes:
    out = b"*%d\r\n" % len(args)
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out += b"$%d\r\n%s\r\n" % (len(b), b)
    return out


def _raw_socket(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _read_raw(port: int, n: int) -> list[float]:
    s = _raw_socket(port)
    out: list[float] = []
    last = b"$"
    while len(out) < n:
        s.sendall(_resp("XREAD", "BLOCK", 5000, "STREAMS", "s", last))
        data = s.recv(65536)  # one small reply: [[s, [[id, [t, stamp]]]]]
        now = time.monotonic()
        parts = data.split(b"\r\n")
        out.append(now - float(parts[parts.index(b"t") + 2]))
        last = next(p for p in reversed(parts) if b"-" in p and p[:1].isdigit())
    return out


def _read_async(port: int, n: int) -> list[float]:
    import redis.asyncio as ra

    out: list[float] = []

    async def main() -> None:
        r = ra.Redis(port=port)
        last = "$"
        while len(out) < n:
            res = await r.xread({"s": last}, block=5000, count=10)
            now = time.monotonic()
            for _stream, ents in res or []:
                for eid, fields in ents:
                    last = eid
                    out.append(now - float(fields[b"t"]))
        await r.aclose()

    asyncio.run(main())
    return out


def reader(mode: str, port: int, n: int, fd: int) -> None:
    if mode == "pipe":
        out = []
        buf = b""
        while len(out) < n:
            select.select([fd], [], [])
            buf += os.read(fd, 4096)
            now = time.monotonic()
            *lines, buf = buf.split(b"\n")
            out += [now - float(x) for x in lines]
    elif mode == "raw":
        out = _read_raw(port, n)
    elif mode in ("sync", "spin", "unix"):
        out = _read_sync(_client(mode, port), n, spin=mode == "spin")
    else:
        if mode == "uvloop":
            import uvloop

            uvloop.install()
        out = _read_async(port, n)
    out.sort()
    print(f"{mode:<8} p50 {out[len(out) // 2] * 1e3:7.3f} ms   p90 {out[int(len(out) * 0.9)] * 1e3:7.3f} ms")


def writer(mode: str, port: int, n: int, gap_s: float, fd: int) -> None:
    r = _client(mode, port)
    s = _raw_socket(port) if mode == "raw" else None
    for _ in range(n):
        time.sleep(gap_s)
        if s is not None:
            s.sendall(_resp("XADD", "s", "*", "t", repr(time.monotonic())))
            s.recv(100)
        elif mode == "pipe":
            os.write(fd, repr(time.monotonic()).encode() + b"\n")
        else:
            r.xadd("s", {"t": repr(time.monotonic())})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=300)
    ap.add_argument("--gap-ms", type=float, default=5.0, help="the writer's sleep between messages")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--role", choices=("reader", "writer"), help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--fd", type=int, default=-1, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.role == "reader":
        reader(a.mode, a.port, a.messages, a.fd)
        return 0
    if a.role == "writer":
        writer(a.mode, a.port, a.messages, a.gap_ms / 1000, a.fd)
        return 0
    print(f"host: {os.cpu_count()} CPUs; python {sys.version.split()[0]}; redis-py {redis.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["WAKE_DIR"] = tmp
        dep = Deployment(tmp)
        try:
            start_redis(dep, extra_args=("--unixsocket", os.path.join(tmp, SOCK)))
            port = dep.port
            r = redis.Redis(port=port)
            for mode in a.modes:
                r.delete("s")
                rfd, wfd = os.pipe()
                common = [sys.executable, __file__, "--mode", mode, "--port", str(port),
                          "--messages", str(a.messages), "--gap-ms", str(a.gap_ms)]
                rd = subprocess.Popen(common + ["--role", "reader", "--fd", str(rfd)], pass_fds=(rfd,))
                time.sleep(1.0)  # the reader is blocked in its first read
                wr = subprocess.Popen(common + ["--role", "writer", "--fd", str(wfd)], pass_fds=(wfd,))
                wr.wait()
                rd.wait(timeout=30)
                os.close(rfd)
                os.close(wfd)
        finally:
            dep.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
