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
