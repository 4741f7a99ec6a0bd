"""`hexgen bench`: engine latency / throughput against Hugging Face generate and the memory roofline; a Poisson
request-rate sweep (`sweep`, or `throughput --rates ...`); the Redis and HTTP serving paths against the engine
(`serve`); the FP8 KV cache's greedy agreement and logit error against the model-dtype cache (`kv-accuracy`);
FP8 weights' top-1 agreement and mean KL against the checkpoint's weights (`weight-accuracy`)."""

from __future__ import annotations

import argparse
import json
import sys

from hexgen.bench.modes import BenchSetup, format_table, latency, throughput
from hexgen.bench.serve import ServeOptions, serve
from hexgen.bench.serve_report import format_serve
from hexgen.bench.sweep import SweepOptions, format_sweep, sweep
from hexgen.cli.generate import add_layout_args, resolve_engine, resolve_model
from hexgen.config import Layout
from hexgen.errors import ConfigError, HexGenError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hexgen bench", description=__doc__)
    p.add_argument("mode", choices=("latency", "throughput", "sweep", "serve", "kv-accuracy", "weight-accuracy"))
    add_layout_args(p)
    p.add_argument("--out", help="write the result as JSON here")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face baseline")
    p.add_argument("--cuda-graphs", action="store_true", help="capture decode steps in CUDA graphs")
    p.add_argument(
        "--no-async-steps",
        action="store_true",
        help="one-stage layouts: wait for each step's ids before enqueueing the next (the old loop)",
    )
    p.add_argument(
        "--async-steps-tp",
        action="store_true",
        help="one-stage TP > 1 layouts: asynchronous steps too (off by default: not yet shown faster under load)",
    )
    p.add_argument(
        "--profile-loop",
        default="",
        metavar="FILE",
        help="run the stage-0 leader's loop under cProfile and write its profile to FILE",
    )
    p.add_argument(
        "--device-trace",
        default="",
        metavar="FILE",
        help="CUDA: record the device's kernel timeline over the engine run and write its summary (JSON) to FILE",
    )
    p.add_argument("--gpu-memory-fraction", type=float, default=0.9)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--prompt-len", type=int, default=128, help="latency: prompt tokens")
    p.add_argument(
        "--new-tokens",
        type=int,
        default=None,
        help="latency: tokens to generate (default 256); kv-accuracy, weight-accuracy: greedy tokens per prompt (32)",
    )
    p.add_argument("--reps", type=int, default=3, help="latency: measured requests, one after another")
    p.add_argument("--kv-tokens", type=int, default=65536, help="KV cache capacity in tokens per rank on CPU")
    p.add_argument(
        "--num-requests",
        type=int,
        default=None,
        help="throughput: requests offered at once (default 1000); sweep: requests per rate (64); "
        "serve: requests (32); kv-accuracy, weight-accuracy: prompts of the fixed set (8)",
    )
    p.add_argument(
        "--prompt-range",
        type=int,
        nargs=2,
        default=None,
        metavar=("MIN", "MAX"),
        help="prompt tokens (default 64 1024; sweep 64 512; serve 64 256)",
    )
    p.add_argument(
        "--output-range",
        type=int,
        nargs=2,
        default=None,
        metavar=("MIN", "MAX"),
        help="tokens to generate (default 32 512; sweep 32 128; serve 16 64)",
    )
    p.add_argument("--seed", type=int, default=0, help="workload and arrival seed")
    p.add_argument("--rates", type=float, nargs="+", help="sweep: Poisson request rates (requests/s), e.g. 1 2 4 8")
    p.add_argument("--tpot-slo-ms", type=float, default=100.0, help="sweep: p99 TPOT SLO in ms (default 100)")
    p.add_argument(
        "--rate",
        type=float,
        default=None,
        help="serve: Poisson request rate (requests/s); default: every request offered at once",
    )
    p.add_argument("--log-dir", help="serve: keep the deployment's logs here")
    p.add_argument("--no-http", action="store_true", help="serve: skip the HTTP path (the head's OpenAI API)")
    p.add_argument(
        "--tokenizer", help="serve: the head's tokenizer directory (default: the model's; needed with --preset)"
    )
    p.add_argument(
        "--direct-input",
        default=None,
        metavar="{text,ids}",
        help="serve: what the direct engine is given: the token ids the head would make (ids, the default), "
        "or the prompt texts, tokenized on arrival in the engine's loop as the head tokenizes them (text)",
    )
    p.add_argument("--hf-batch-size", type=int, default=64, help="throughput: HF static batch size")
    p.add_argument(
        "--hf-max-batches",
        type=int,
        default=None,
        help="throughput: run only the first N HF batches (a subsample, reported as such)",
    )
    p.add_argument(
        "--hf-cb-requests",
        type=int,
        default=300,
        help="throughput: HF continuous batching on the first N requests, all at once (0: skip)",
    )
    return p


_DEFAULTS = {
    "throughput": (1000, (64, 1024), (32, 512)),
    "sweep": (64, (64, 512), (32, 128)),
    "serve": (32, (64, 256), (16, 64)),
}


def _workload(args: argparse.Namespace) -> tuple[int, tuple[int, int], tuple[int, int]]:
    n, prompt, output = _DEFAULTS.get(args.mode, _DEFAULTS["throughput"])
    return (
        args.num_requests if args.num_requests is not None else n,
        tuple(args.prompt_range or prompt),
        tuple(args.output_range or output),
    )


def _run(args: argparse.Namespace, setup: BenchSetup) -> tuple[dict, str]:
    n, prompt, output = _workload(args)
    if args.mode == "latency":
        res = latency(setup, args.prompt_len, args.new_tokens or 256, args.reps)
    elif args.mode == "kv-accuracy":
        from hexgen.bench.kv_accuracy import format_accuracy, kv_accuracy, prompt_ids

        prompts = prompt_ids(setup.model, setup.model.config().vocab_size, args.num_requests or 8, args.seed)
        res = kv_accuracy(setup.layout, setup.model, setup.engine, prompts, args.new_tokens or 32)
        res["command"] = setup.command
        return res, format_accuracy(res)
    elif args.mode == "weight-accuracy":
        from hexgen.bench.kv_accuracy import prompt_ids
        from hexgen.bench.weight_accuracy import format_weight_accuracy, weight_accuracy

        prompts = prompt_ids(setup.model, setup.model.config().vocab_size, args.num_requests or 8, args.seed)
        res = weight_accuracy(setup.layout, setup.model, setup.engine, prompts, args.new_tokens or 32)
        res["command"] = setup.command
        return res, format_weight_accuracy(res)
    elif args.mode == "sweep":
        res = sweep(setup, SweepOptions(tuple(args.rates or ()), n, prompt, output, args.seed, args.tpot_slo_ms))
        return res, format_sweep(res)
    elif args.mode == "serve":
        res = serve(
            setup,
            ServeOptions(
                n,
                prompt,
                output,
                args.seed,
                args.rate,
                log_dir=args.log_dir,
                tokenizer=args.tokenizer,
                direct_input=args.direct_input or "ids",
                http=not args.no_http,
            ),
            say=lambda m: print(m, file=sys.stderr, flush=True),
        )
        return res, format_serve(res)
    else:
        res = throughput(
            setup,
            n,
            prompt,
            output,
            args.seed,
            args.hf_batch_size,
            args.hf_max_batches,
            args.hf_cb_requests,
            checkpoint=lambda r: _save(args.out, r),
        )
    return res, format_table(res)


def _save(path: str | None, res: dict) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.mode == "throughput" and args.rates:
        args.mode = "sweep"  # `throughput --rates ...` is the rate sweep
    try:
        if args.mode != "sweep" and (args.rates or args.tpot_slo_ms != 100.0):
            raise ConfigError("--rates/--tpot-slo-ms: only for sweep (or throughput --rates)")
        if args.hf_cb_requests < 0:
            raise ConfigError(f"--hf-cb-requests: {args.hf_cb_requests} must be ≥ 0 (0: skip)")
        if args.mode != "serve" and (
            args.rate is not None or args.log_dir or args.tokenizer or args.direct_input or args.no_http
        ):
            raise ConfigError("--rate/--log-dir/--tokenizer/--direct-input/--no-http: only for serve")
        model = resolve_model(args)
        layout = Layout.build(model.config(), args.hetero_config, args.pp_partition)
        engine = resolve_engine(
            args,
            layout,
            cuda_graphs=args.cuda_graphs,
            gpu_memory_fraction=args.gpu_memory_fraction,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            cpu_kv_tokens=args.kv_tokens,
            async_steps=not args.no_async_steps,
            async_steps_tp=args.async_steps_tp,
            profile_loop=args.profile_loop,
            device_trace=args.device_trace,
        )
        setup = BenchSetup(model, layout, engine, "hexgen bench " + " ".join(argv), skip_hf=args.no_hf)
        res, table = _run(args, setup)
    except HexGenError as e:
        print(f"hexgen bench: {e}", file=sys.stderr)
        return 2
    print(table)
    _save(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
