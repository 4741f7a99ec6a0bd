"""One host, one or two one-stage pipelines of the default model, a fixed request set through Redis: wall time
from the first submit until every request is done, for the thread settings of each case
(hexgen/engine/threads.py).

    PYTHONPATH=. python scripts/bench_host_threads.py [--requests 6] [--new-tokens 48] [--out FILE]
        [--cases 1:auto,2:auto,2:<cores>]

Cases, in this order, each a fresh redis-server + head + workers: one pipeline (automatic threads); two
pipelines (automatic: the host's cores shared by both ranks); two pipelines each given every core
(``--threads <cores>``, what each rank took before threads were sized by the host). Greedy requests, all
submitted at once once every pipeline is ready; each prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import redis

from hexgen.demo import Deployment, start_redis
from hexgen.engine.threads import host_cores
from hexgen.cli.fetch import ensure_default_model
from hexgen.wire import keys as C

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def _config(path: str, url: str, model_dir: str, pipelines: int) -> str:
    text = [f'dtype = "fp32"\ndevice = "cpu"\n\n[redis]\nurl = "{url}"\n\n[model]\nname = "{C.DEFAULT_MODEL}"\n'
            f'path = "{model_dir}"\n']
    for i in range(pipelines):
        text.append(f'[[pipelines]]\nid = "p{i}"\nhetero_config = [1]\npp_partition = [30]\n')
    text.append("[limits]\nheartbeat_ttl_s = 5\nheartbeat_interval_s = 1.0\nlease_s = 15.0\n")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(text))
    return path


def run_case(model_dir: str, pipelines: int, threads: int | None, requests: int, new_tokens: int) -> dict:
    work = tempfile.mkdtemp(prefix="hexgen-threads-")
    dep = Deployment(work)
    py = [sys.executable, "-m", "hexgen.cli"]
    try:
        start_redis(dep)
        cfg = _config(os.path.join(work, "deploy.toml"), dep.url, model_dir, pipelines)
        dep.spawn("head", py + ["head", "--config", cfg])
        for i in range(pipelines):
            extra = ["--threads", str(threads)] if threads else []
            dep.spawn(f"worker-p{i}", py + ["worker", "--config", cfg, "--pipeline", f"p{i}", "--stage", "0",
                                             *extra])
        r = redis.Redis(port=dep.port, socket_timeout=10)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:  # every pipeline ready
            states = [r.hget(C.pipeline_key(f"p{i}"), "state") for i in range(pipelines)]
            if all(s == b"ready" for s in states):
                break
            dep.check_alive()
            time.sleep(0.2)
        else:
            raise TimeoutError(f"pipelines not ready after 600 s; logs in {work}")
        t0 = time.monotonic()
        for n in range(requests):
            r.xadd(C.REQUESTS_STREAM, {"prompt": f"{PROMPT} ({n})", "max_new_tokens": str(new_tokens),
                                       "temperature": "0", "id": f"q{n}"})
        done: dict[str, float] = {}
        while len(done) < requests and time.monotonic() < t0 + 1800:
            for n in range(requests):
                if f"q{n}" in done:
                    continue
                last = r.xrevrange(C.result_stream(f"q{n}"), count=1)
                if last and last[0][1].get(b"event") in (b"done", b"error"):
                    done[f"q{n}"] = time.monotonic() - t0
            time.sleep(0.05)
            dep.check_alive()
        r.close()
        return {"pipelines": pipelines, "threads": threads or "auto", "cores": host_cores(), "requests": requests,
                "new_tokens": new_tokens, "finished": len(done), "wall_s": round(max(done.values()), 2),
                "load_avg_1m": round(os.getloadavg()[0], 2)}
    finally:
        dep.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--out", help="append the JSON lines here too")
    ap.add_argument("--cases", default=f"1:auto,2:auto,2:{host_cores()}",
                    help="comma-separated PIPELINES:THREADS (auto: sized by the host), default: the three above")
    args = ap.parse_args()
    model_dir = ensure_default_model()
    cases = []
    for case in args.cases.split(","):
        n, _, t = case.partition(":")
        cases.append((int(n), None if t in ("", "auto") else int(t)))
    for pipelines, threads in cases:
        res = run_case(model_dir, pipelines, threads, args.requests, args.new_tokens)
        line = json.dumps(res)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
