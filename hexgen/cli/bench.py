"""`hexgen bench`: engine latency / throughput against Hugging Face generate and the memory roofline."""
from __future__ import annotations

import argparse
import json
import sys

from hexgen.bench.modes import BenchSetup, format_table, latency, throughput
from hexgen.cli.generate import add_layout_args, resolve_engine, resolve_model
from hexgen.config import Layout
from hexgen.errors import HexGenError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hexgen bench", description=__doc__)
    p.add_argument("mode", choices=("latency", "throughput"))
    add_layout_args(p)
    p.add_argument("--out", help="write the result as JSON here")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face baseline")
    p.add_argument("--cuda-graphs", action="store_true", help="capture decode steps in CUDA graphs")
    p.add_argument("--gpu-memory-fraction", type=float, default=0.9)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--prompt-len", type=int, default=128, help="latency: prompt tokens")
    p.add_argument("--new-tokens", type=int, default=256, help="latency: tokens to generate")
    p.add_argument("--reps", type=int, default=3, help="latency: measured requests, one after another")
    p.add_argument("--num-requests", type=int, default=1000, help="throughput: requests offered at once")
    p.add_argument("--prompt-range", type=int, nargs=2, default=(64, 1024), metavar=("MIN", "MAX"))
    p.add_argument("--output-range", type=int, nargs=2, default=(32, 512), metavar=("MIN", "MAX"))
    p.add_argument("--seed", type=int, default=0, help="throughput: workload seed")
    p.add_argument("--hf-batch-size", type=int, default=64, help="throughput: HF static batch size")
    p.add_argument("--hf-max-batches", type=int, default=None,
                   help="throughput: run only the first N HF batches (a subsample, reported as such)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        model = resolve_model(args)
        layout = Layout.build(model.config(), args.hetero_config, args.pp_partition)
        engine = resolve_engine(args, layout, cuda_graphs=args.cuda_graphs,
                                gpu_memory_fraction=args.gpu_memory_fraction, max_num_seqs=args.max_num_seqs,
                                max_num_batched_tokens=args.max_num_batched_tokens)
    except HexGenError as e:
        print(f"hexgen bench: {e}", file=sys.stderr)
        return 2
    setup = BenchSetup(model, layout, engine, "hexgen bench " + " ".join(argv), skip_hf=args.no_hf)
    if args.mode == "latency":
        res = latency(setup, args.prompt_len, args.new_tokens, args.reps)
    else:
        res = throughput(setup, args.num_requests, tuple(args.prompt_range), tuple(args.output_range),
                         args.seed, args.hf_batch_size, args.hf_max_batches)
    print(format_table(res))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
