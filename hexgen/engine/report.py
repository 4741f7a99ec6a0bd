"""What one rank reports when its pipeline finishes: peak memory and KV-cache capacity (benchmarks).

On CUDA the peak is ``torch.cuda.max_memory_allocated`` of the rank's device; on CPU it is the rank process's
peak resident set (``ru_maxrss``), which holds the interpreter and torch as well as weights and KV cache.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch

from hexgen.engine.emulation import memory_cap

CUDA_PEAK = "cuda max_memory_allocated"
CPU_PEAK = "cpu peak RSS (ru_maxrss)"


@dataclass(frozen=True)
class RankReport:
    """One rank's memory and KV figures; ``to_dict``/``from_dict`` carry it between processes.

    ``kv_tokens`` is the cache this rank allocated: every stage holds the same number of blocks (the
    pipeline-wide minimum). ``kv_tokens_memory_allows`` (CUDA only) is what the budget
    ``memory_total_bytes × gpu_memory_fraction`` would hold if every byte of it not taken by this rank's
    weights went to KV: the activation reserve, the CUDA context and other ranks' smaller budgets are the gap.
    """

    rank: int
    stage: int
    device: str
    peak_memory_bytes: int
    peak_memory_kind: str
    weight_bytes: int
    kv_tokens: int
    kv_bytes: int
    kv_bytes_per_token: int
    memory_total_bytes: int | None = None
    memory_budget_bytes: int | None = None
    kv_tokens_memory_allows: int | None = None
    kv_cache_dtype: str = "auto"  # EngineConfig.kv_cache_dtype: fp8 halves kv_bytes_per_token against bf16
    preemptions: int | None = None  # the scheduler's preemptions (stage-0 leader only; None on other ranks)
    kv_tokens_fit: int = 0  # what this rank alone would hold (its own free memory and bytes per token)
    kv_heads: int = 0  # KV heads this rank holds (uneven TP shards: in proportion to its share)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RankReport:
        return cls(**d)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured) for this process on ``device``."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), CUDA_PEAK
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), CPU_PEAK  # Linux reports KiB


def rank_report(rank: int, runner: Any, preemptions: int | None = None) -> RankReport:
    """The report of ``runner`` (a StageRunner) on global ``rank``, taken after its pipeline has finished;
    ``preemptions`` is the scheduler's count on the stage-0 leader."""
    device = runner.device
    weights = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    weights += sum(b.numel() * b.element_size() for b in runner.model.buffers())
    kv = runner.kv
    slots = kv.shape[2]  # [layers, 2, slots, n_kv_local, head_dim]
    per_token = kv.numel() * kv.element_size() // max(1, slots)
    kv_tokens = runner.num_blocks * runner.engine.block_size
    peak, kind = peak_memory(device)
    total = budget = allows = None
    if device.type == "cuda":
        total = memory_cap(device) or int(torch.cuda.get_device_properties(device).total_memory)  # emulated cap
        budget = int(total * runner.engine.gpu_memory_fraction)
        allows = max(0, (budget - weights) // max(1, per_token))
    return RankReport(
        rank=rank,
        stage=runner.groups.stage.index,
        device=str(device),
        peak_memory_bytes=peak,
        peak_memory_kind=kind,
        weight_bytes=int(weights),
        kv_tokens=int(kv_tokens),
        kv_bytes=int(kv_tokens * per_token),
        kv_bytes_per_token=int(per_token),
        memory_total_bytes=total,
        memory_budget_bytes=budget,
        kv_tokens_memory_allows=allows,
        kv_cache_dtype=runner.engine.kv_cache_dtype,
        preemptions=preemptions,
        kv_tokens_fit=int(getattr(runner, "blocks_fit", runner.num_blocks) * runner.engine.block_size),
        kv_heads=int(runner.n_kv_local),
    )
