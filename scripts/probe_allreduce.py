"""Time NCCL all-reduces between the GPUs of this machine (eager, the way prefill steps run them) and print
the effective bus bandwidth, for a cluster file's link_bandwidth_gbs / latency_us (docs/planner.md).

    python scripts/probe_allreduce.py [--gpus 2] [--dtype bf16]

Bus bandwidth = 2 (n-1)/n x bytes / time (NCCL's convention), median of 20 timed calls after 5 warm-ups.
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SIZES = [8 << 10, 1 << 20, 8 << 20, 32 << 20, 128 << 20]  # bytes


def _worker(rank: int, world: int, port: int, dtype: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    dt = getattr(torch, dtype)
    for size in SIZES:
        x = torch.ones(size // torch.empty(0, dtype=dt).element_size(), dtype=dt, device="cuda")
        times = []
        for i in range(25):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            dist.barrier()
            start.record()
            dist.all_reduce(x)
            end.record()
            end.synchronize()
            if i >= 5:
                times.append(start.elapsed_time(end) / 1e3)
        t = statistics.median(times)
        if rank == 0:
            bus = 2 * (world - 1) / world * size / t
            print(f"all-reduce {size / 2**20:8.3f} MiB over {world} GPUs: {t * 1e6:9.1f} us, bus {bus / 1e9:7.1f} GB/s",
                  flush=True)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--port", type=int, default=29611)
    a = p.parse_args()
    mp.spawn(_worker, args=(a.gpus, a.port, a.dtype), nprocs=a.gpus)


if __name__ == "__main__":
    main()
