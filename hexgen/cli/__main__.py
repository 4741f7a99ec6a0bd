"""`hexgen <command>`: dispatch to the subcommand modules."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "generate": ("hexgen.cli.generate", "offline generation on a local asymmetric pipeline"),
    "demo": ("hexgen.cli.demo", "private redis-server + head + pipeline, streamed chat answers"),
    "head": ("hexgen.cli.head", "validate requests from Redis and feed the work streams"),
    "worker": ("hexgen.cli.worker", "start the TP ranks of one pipeline stage"),
    "status": ("hexgen.cli.status", "workers, pipelines and queue depths"),
    "redis-acl": ("hexgen.cli.redis_acl", "write a Redis ACL file: one least-privilege user per role"),
    "fetch-model": ("hexgen.cli.fetch_model", "fetch and convert the embedded default model"),
    "bench": ("hexgen.cli.bench", "latency / throughput / serve benchmarks"),
    "plan": ("hexgen.cli.plan", "validate a layout and show each stage's ranks and layers"),
    "profile": ("hexgen.cli.profile", "time one decoder layer on this device; write a planner calibration"),
    "simulate": ("hexgen.cli.simulate", "simulate a request stream through a deployment plan"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: hexgen <command> [options]\n\ncommands:")
        for name, (_, what) in COMMANDS.items():
            print(f"  {name:<12} {what}")
        return 0 if argv else 2
    name = argv[0]
    if name not in COMMANDS:
        print(f"hexgen: unknown command {name!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
