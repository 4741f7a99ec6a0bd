"""Hugging Face transformers continuous batching on the same requests: the paged-attention baseline.

``model.continuous_batching_context_manager`` (transformers 5.x): its own scheduler over a paged KV cache,
attention ``sdpa`` (paged), its CUDA graphs on by default. Every request is added at once, greedy, EOS ignored,
each with its own ``max_new_tokens``; token timestamps come from transformers (``record_timestamps``), and
TTFT counts from the moment the first request is added. Set-up and warm-up (cache allocation, graph capture)
happen before that moment and are reported apart.
"""

from __future__ import annotations

import inspect
import time

import torch

from hexgen.bench.stats import RequestTiming
from hexgen.engine.types import Request

RESULT_TIMEOUT_S = 5.0


def _config(graphs: bool, max_memory_percent: float, **extra):
    try:
        from transformers import ContinuousBatchingConfig
    except ImportError:  # older 5.x releases keep it here only
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
    return ContinuousBatchingConfig(max_memory_percent=max_memory_percent, use_cuda_graph=graphs, **extra)


def _hints(requests: list[Request]):
    try:
        from transformers.generation.continuous_batching.utils import WorkloadHints
    except ImportError:
        return None
    return WorkloadHints(
        max_prompt_length=max(len(r.prompt_ids) for r in requests),
        max_generated_length=max(r.params.max_new_tokens for r in requests),
        num_requests=len(requests),
    )


def _collect(
    manager, requests: list[Request], t0: float, deadline_s: float
) -> tuple[dict[str, RequestTiming | None], int, list[str]]:
    """Results until every request finished (or the deadline): timings by id (None: the request failed), how
    many came back short of their max_new_tokens, the failures' messages."""
    want = {r.request_id: r.params.max_new_tokens for r in requests}
    timings: dict[str, RequestTiming | None] = {}
    short, errors = 0, []
    while len(timings) < len(requests) and time.perf_counter() - t0 < deadline_s:
        out = manager.get_result(timeout=RESULT_TIMEOUT_S)
        if out is None:
            if not manager.is_running():
                break
            continue
        if not out.is_finished():
            continue
        if out.error or not out.generated_tokens:  # a failed request: counted, not timed
            errors.append(str(out.error or "no tokens").splitlines()[0][:200])
            timings[out.request_id] = None
            continue
        ts = list(out.timestamps or [])
        if len(ts) != len(out.generated_tokens):  # no per-token stamps: the finish time for every token
            ts = [time.perf_counter()] * len(out.generated_tokens)
        timings[out.request_id] = RequestTiming(t0, ts)
        short += len(out.generated_tokens) < want[out.request_id]
    return timings, short, errors


@torch.no_grad()  # not inference_mode: the manager's tensors are updated in place by its own thread, outside it
def run_continuous_batching(
    model,
    requests: list[Request],
    device: torch.device,
    graphs: bool = True,
    max_memory_percent: float = 0.75,
    deadline_s: float = 600.0,
) -> tuple[list[RequestTiming], dict]:
    """Every request offered at once to transformers' continuous batching. Returns their timings (only the
    finished ones) and what ran: transformers' version, the configuration, set-up seconds, finished count."""
    import transformers
    from transformers import GenerationConfig

    model.config._attn_implementation = "sdpa"  # the paged sdpa path of continuous batching
    model.generation_config.eos_token_id = None
    gen = GenerationConfig(
        max_new_tokens=max(r.params.max_new_tokens for r in requests), do_sample=False, eos_token_id=None
    )
    cm = model.continuous_batching_context_manager
    # on CPU (tests) a small cache: sized from "free memory" it would take most of the host's
    small = {} if device.type == "cuda" else {"num_blocks": 4 * len(requests), "max_batch_tokens": 256}
    kw = dict(
        generation_config=gen,
        continuous_batching_config=_config(graphs and device.type == "cuda", max_memory_percent, **small),
        block=True,
        timeout=30,
    )
    params = inspect.signature(cm).parameters
    hints = _hints(requests)
    if hints is not None and "workload_hints" in params:
        kw["workload_hints"] = hints
    if device.type != "cuda" and "warmup" in params:
        kw["warmup"] = False  # its warm-up captures graph sizes; on CPU it only costs time
    t_setup = time.perf_counter()
    with cm(**kw) as manager:
        setup_s = time.perf_counter() - t_setup
        extra = (
            {"record_timestamps": True}
            if "record_timestamps" in inspect.signature(manager.add_request).parameters
            else {}
        )
        t0 = time.perf_counter()
        for r in requests:
            manager.add_request(
                list(r.prompt_ids),
                request_id=r.request_id,
                max_new_tokens=r.params.max_new_tokens,
                eos_token_id=-1,
                **extra,
            )
        timings, short, errors = _collect(manager, requests, t0, deadline_s)
    info = {
        "baseline": f"transformers {transformers.__version__} continuous batching (paged sdpa)",
        "cuda_graphs": bool(kw["continuous_batching_config"].use_cuda_graph),
        "setup_s": round(setup_s, 1),
        "requests_run": len(requests),
        "requests_finished": sum(t is not None for t in timings.values()),
        "short_outputs": short,
        "max_memory_percent": max_memory_percent,
    }
    if errors:
        info["errors"] = len(errors)
        info["first_error"] = errors[0]
    return [t for t in (timings.get(r.request_id) for r in requests) if t is not None], info
