"""Fast decode paths (static padded decode layout, CUDA graphs) against the reference path.

The static path also runs uncaptured on CPU (``cuda_graphs=True`` without CUDA), so its padding and
bucketing logic is checked everywhere; the ``gpu`` tests capture real CUDA graphs.
"""
from __future__ import annotations

import random

import pytest
import torch

from hexgen.config import EngineConfig, KernelConfig, Layout, preset
from hexgen.engine.offline import run_offline
from hexgen.engine.runner import ModelSpec
from hexgen.engine.types import Request, SamplingParams
from hexgen.model.attention import build_meta, decode_meta

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _requests(vocab: int, n: int, new_tokens: int, seed: int = 0) -> list[Request]:
    rng = random.Random(seed)
    return [Request(str(i), [rng.randrange(3, vocab) for _ in range(rng.randint(3, 40))],
                    SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)) for i in range(n)]


def _run(engine: EngineConfig, hetero=(1,), preset_name="tiny", n=5, new_tokens=12, part=None):
    model = ModelSpec(preset=preset_name, random_weights=True)
    layout = Layout.build(preset(preset_name), list(hetero), part)
    reqs = _requests(preset(preset_name).vocab_size, n, new_tokens)
    return run_offline(layout, model, engine, reqs)


def compare_for_dtype(ref, fast, dtype: str) -> None:
    """float32: every greedy token identical and every logit within 2e-3. bfloat16/float16, where one rounding
    step apart can flip a near-tied greedy token of a tiny random model and the runs then diverge: the first
    token's logits within 5e-2."""
    if dtype == "float32":
        _compare(ref, fast, atol=2e-3)
        return
    for rid, r in ref.items():
        diff = (r.logits[0] - fast[rid].logits[0]).abs().max()
        assert diff < 5e-2, f"request {rid}: first-token logits differ by {diff}"


def _compare(ref, fast, atol: float) -> None:
    for rid, r in ref.items():
        f = fast[rid]
        assert f.token_ids == r.token_ids, f"request {rid}: greedy tokens differ"
        for a, b in zip(r.logits, f.logits):
            assert torch.allclose(a, b, atol=atol, rtol=0), f"request {rid}: max diff {(a - b).abs().max()}"


def test_decode_meta_matches_build_meta():
    bs, tables, ctx = 4, [[5, 2, 7], [1], [3, 0]], [11, 3, 5]
    ref = build_meta([c - 1 for c in ctx], [1, 1, 1], ctx, tables, bs, torch.device("cpu"))
    padded = torch.tensor([t + [9] * (4 - len(t)) for t in tables])  # [batch, 4 blocks], 9 = padding
    fast = decode_meta(padded, torch.tensor(ctx), bs)
    assert torch.equal(fast.slot_mapping, ref.slot_mapping)
    width = ref.decode_slots.shape[1]
    assert torch.equal(fast.decode_slots[:, :width][ref.decode_mask[:, 0, 0]],
                       ref.decode_slots[ref.decode_mask[:, 0, 0]])
    assert torch.equal(fast.decode_mask[..., :width], ref.decode_mask)
    assert not fast.decode_mask[..., width:].any()


@pytest.mark.slow
def test_static_decode_path_on_cpu_matches_reference():
    base = dict(dtype="float32", device="cpu", block_size=4, cpu_kv_tokens=2048, collect_logits=True,
                max_num_seqs=6)
    ref = _run(EngineConfig(**base))
    fast = _run(EngineConfig(**base, cuda_graphs=True))
    _compare(ref, fast, atol=1e-4)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cuda_graph_decode_matches_reference(dtype):
    base = dict(dtype=dtype, device="cuda", block_size=16, collect_logits=True, max_num_seqs=8,
                gpu_memory_fraction=0.3, num_kv_blocks=256)
    ref = _run(EngineConfig(**base), n=6, new_tokens=16)
    fast = _run(EngineConfig(**base, cuda_graphs=True), n=6, new_tokens=16)
    _compare(ref, fast, atol=5e-2)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_kernels_and_graphs_match_unfused_reference(dtype):
    """Fused norm/rotary/SiLU kernels, the tuned GEMV and CUDA graphs (LM head inside) against the unfused
    eager path. float32: every token and logit; bfloat16, where one rounding step apart can flip a greedy
    token of this tiny random model and the runs then diverge: the first token's logits."""
    base = dict(dtype=dtype, device="cuda", block_size=16, collect_logits=True, max_num_seqs=8,
                gpu_memory_fraction=0.3, num_kv_blocks=256)
    ref = _run(EngineConfig(**base, kernels=KernelConfig(fused=False, gemv="cublas")), n=6, new_tokens=16)
    fast = _run(EngineConfig(**base, cuda_graphs=True, kernels=KernelConfig(fused=True, gemv="triton")), n=6,
                new_tokens=16)
    compare_for_dtype(ref, fast, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("hetero,part", [((2,), None), ((1, 1), (3, 3))])
def test_cuda_graph_decode_multi_gpu_matches_reference(hetero, part):
    """float32 graphs with fused kernels and (TP 2) the symmetric-memory all-reduce, against the unfused
    eager path with NCCL all-reduces: every greedy token and logit."""
    base = dict(dtype="float32", device="cuda", block_size=16, collect_logits=True, max_num_seqs=8,
                gpu_memory_fraction=0.3, num_kv_blocks=256)
    ref = _run(EngineConfig(**base, kernels=KernelConfig(fused=False, all_reduce="nccl")), hetero=hetero, part=part,
               n=4, new_tokens=12)
    fast = _run(EngineConfig(**base, cuda_graphs=True, kernels=KernelConfig(fused=True, all_reduce="symm")),
                hetero=hetero, part=part, n=4, new_tokens=12)
    _compare(ref, fast, atol=2e-3)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_async_steps_with_graphs_match_synchronous_steps(dtype):
    """The asynchronous loop (step N+1 launched on step N's ids still on the device, hexgen/engine/pipeline.py)
    against the synchronous one, both in CUDA graphs: same greedy tokens; outputs of different lengths so
    sequences leave while others run ahead."""
    base = dict(dtype=dtype, device="cuda", block_size=16, max_num_seqs=8, gpu_memory_fraction=0.3,
                num_kv_blocks=256, cuda_graphs=True)
    model = ModelSpec(preset="tiny", random_weights=True)
    layout = Layout.build(preset("tiny"), [1], None)
    reqs = _requests(preset("tiny").vocab_size, 7, 16)
    for i, r in enumerate(reqs):
        r.params = SamplingParams(max_new_tokens=4 + 3 * i, ignore_eos=True)
    sync = run_offline(layout, model, EngineConfig(**base, async_steps=False), reqs)
    fast = run_offline(layout, model, EngineConfig(**base), reqs)
    assert {k: v.token_ids for k, v in fast.items()} == {k: v.token_ids for k, v in sync.items()}
    assert [len(fast[r.request_id].token_ids) for r in reqs] == [4 + 3 * i for i in range(7)]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_async_steps_tp2_with_graphs_match_synchronous_steps():
    """TP 2 in CUDA graphs (one-shot all-reduce): the follower takes each step's sampled ids from the leader's
    device broadcast; the tokens must equal the synchronous loop's."""
    base = dict(dtype="float32", device="cuda", block_size=16, max_num_seqs=8, gpu_memory_fraction=0.3,
                num_kv_blocks=256, cuda_graphs=True)
    model = ModelSpec(preset="tiny", random_weights=True)
    layout = Layout.build(preset("tiny"), [2], None)
    reqs = _requests(preset("tiny").vocab_size, 7, 16)
    for i, r in enumerate(reqs):
        r.params = SamplingParams(max_new_tokens=4 + 3 * i, ignore_eos=True)
    sync = run_offline(layout, model, EngineConfig(**base, async_steps=False), reqs)
    fast = run_offline(layout, model, EngineConfig(**base, async_steps_tp=True), reqs)
    assert {k: v.token_ids for k, v in fast.items()} == {k: v.token_ids for k, v in sync.items()}


def _mixed_requests(vocab: int, n: int, seed: int = 1) -> list[Request]:
    """Prompts of 3-40 tokens and 2-20 outputs: rows of the static decode buffers change owner and width."""
    rng = random.Random(seed)
    return [Request(str(i), [rng.randrange(3, vocab) for _ in range(rng.randint(3, 40))],
                    SamplingParams(max_new_tokens=rng.randint(2, 20), ignore_eos=True)) for i in range(n)]


@pytest.mark.slow
def test_static_decode_path_with_changing_rows_matches_reference():
    """More requests than max_num_seqs, outputs of different lengths: each step stages only its live table
    columns, so what earlier steps left in the static buffers must never be read as context."""
    base = dict(dtype="float32", device="cpu", block_size=4, cpu_kv_tokens=2048, collect_logits=True,
                max_num_seqs=4)
    model = ModelSpec(preset="tiny", random_weights=True)
    layout = Layout.build(preset("tiny"), [1])
    reqs = _mixed_requests(preset("tiny").vocab_size, 10)
    ref = run_offline(layout, model, EngineConfig(**base), reqs)
    fast = run_offline(layout, model, EngineConfig(**base, cuda_graphs=True), reqs)
    _compare(ref, fast, atol=1e-4)


@pytest.mark.parametrize("max_batch", [1, 7, 64, 256, 300, 512, 1024, 2048])
def test_batch_buckets_cover_every_batch_with_little_padding(max_batch):
    from hexgen.engine.cuda_graph import batch_buckets, bucket_of
    buckets = batch_buckets(max_batch)
    assert buckets == sorted(set(buckets)) and buckets[-1] == max_batch
    for n in range(1, max_batch + 1):
        b = bucket_of(n, buckets)
        assert n <= b <= max_batch
        if n > 128:  # above 128 rows no step pads by more than a quarter
            assert b <= 1.25 * n, (n, b)
    assert bucket_of(max_batch + 1, buckets) is None


def test_graph_outputs_are_reserved_in_the_kv_budget():
    """Each captured graph keeps hidden [b, hidden] and float32 logits [b, vocab]: the budget counts them all."""
    from hexgen.engine.cuda_graph import batch_buckets, graph_output_bytes
    assert graph_output_bytes(1024, 4096, 2, 128256, True) == sum(batch_buckets(1024)) * (4096 * 2 + 128256 * 4)
    assert graph_output_bytes(64, 4096, 2, 128256, False) == sum(batch_buckets(64)) * 4096 * 2


def test_simulated_padding_on_the_default_workload_is_small():
    """The scheduler on the 1,000-request workload at max_num_seqs 1024 (scripts/sim_decode_buckets.py):
    the decode graphs replay under 1.10x the rows the steps carry (the buckets that jumped from 512 to
    1024 replayed 1.30x)."""
    import importlib.util
    from pathlib import Path
    from hexgen.engine.cuda_graph import batch_buckets, bucket_of
    path = Path(__file__).resolve().parent.parent / "scripts" / "sim_decode_buckets.py"
    spec = importlib.util.spec_from_file_location("sim_decode_buckets", path)
    sim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sim)
    steps, rows = sim.decode_steps(1024, 16384, 54732)
    buckets = batch_buckets(1024)
    assert len(rows) > 400 and steps >= 512  # the longest request needs 512 steps
    assert sum(bucket_of(n, buckets) for n in rows) < 1.10 * sum(rows)
