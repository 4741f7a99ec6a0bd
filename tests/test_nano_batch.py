"""A decode step as two nano-batches (hexgen.engine.nano_batch) against the same step as one batch: on CPU the
split and the phase order run on one stream; on a GPU the two streams inside the captured decode graphs."""

from __future__ import annotations

import random

import pytest
import torch

from hexgen.config import EngineConfig, KernelConfig, Layout, preset
from hexgen.engine import nano_batch
from hexgen.engine.kv_cache import allocate_cache
from hexgen.engine.offline import run_offline
from hexgen.engine.runner import ModelSpec
from hexgen.engine.types import Request, SamplingParams
from hexgen.kernels.choice import REFERENCE
from hexgen.model.attention import decode_meta
from hexgen.model.loader import build_stage, init_random
from hexgen.model.rope import RotaryCache
from hexgen.parallel.groups import TPContext

CPU = torch.device("cpu")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("n", [16, 40, 128, 130, 1024])
def test_split_rows_makes_two_halves_of_whole_row_tiles(n):
    a = nano_batch.split_rows(n)
    assert a % 8 == 0 and 0 < a < n and abs(n - 2 * a) <= 8


@pytest.mark.parametrize("first", [True, False])
def test_two_nano_batches_equal_one_batch_on_cpu(first):
    """Hidden states of a 40-row decode step (contexts 1-70 in blocks of 4), split 24 + 16, against the step
    as one batch; the K/V each writes is the same too."""
    cfg = preset("tiny")
    layout = Layout.build(cfg, [1, 1], [cfg.num_layers // 2, cfg.num_layers - cfg.num_layers // 2])
    stage = build_stage(cfg, layout.stages()[0 if first else 1], TPContext(0, 1), torch.float32, CPU,
                        kernels=REFERENCE)
    init_random(stage, 0, 0)
    rng = random.Random(1)
    rows, bs, width = 40, 4, 18
    ctx = torch.tensor([rng.randint(1, width * bs) for _ in range(rows)])  # [rows]
    perm = torch.randperm(rows * width, generator=torch.Generator().manual_seed(2))
    tables = perm.view(rows, width)  # [rows, width]: disjoint blocks
    kv = allocate_cache(len(stage.layers), rows * width, bs, cfg.num_kv_heads, cfg.head_dim, torch.float32, CPU)
    kv.normal_(generator=torch.Generator().manual_seed(3))
    kv_split = kv.clone()
    rotary = RotaryCache(cfg, width * bs, CPU)
    x = (torch.randint(3, cfg.vocab_size, (rows,)) if first
         else torch.randn(rows, cfg.hidden_size, generator=torch.Generator().manual_seed(4)))

    def meta_of(t, c):
        return decode_meta(t, c, bs, kernel=False)

    def rot(pos):
        return rotary.lookup(pos, torch.float32)

    with torch.inference_mode():
        cos, sin = rot(ctx - 1)
        want = stage(x, cos, sin, kv, meta_of(tables, ctx))  # [rows, hidden]
        halves = nano_batch.halves_of(x, tables, ctx, meta_of, rot)
        got = nano_batch.forward(stage, halves, kv_split, None, side=None)
    assert [h.x.shape[0] for h in halves] == [24, 16]
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kv_split, kv, atol=1e-6, rtol=0)


def _requests(vocab: int, n: int, new_tokens: int) -> list[Request]:
    rng = random.Random(0)
    return [Request(str(i), [rng.randrange(3, vocab) for _ in range(rng.randint(3, 60))],
                    SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)) for i in range(n)]


@pytest.mark.gpu
@requires_cuda
def test_overlapped_decode_graphs_match_one_stream():
    """160 sequences decoding together (steps of 128+ rows take the two streams inside the captured graphs),
    float32: every greedy token and logit against the same engine with ``overlap`` off."""
    cfg = preset("tiny")
    base = dict(dtype="float32", device="cuda", block_size=16, collect_logits=True, max_num_seqs=160,
                gpu_memory_fraction=0.3, num_kv_blocks=1024, cuda_graphs=True)
    reqs = _requests(cfg.vocab_size, 160, 10)
    model = ModelSpec(preset="tiny", random_weights=True)
    layout = Layout.build(cfg, [1])
    ref = run_offline(layout, model, EngineConfig(**base, kernels=KernelConfig(overlap=False)), reqs)
    got = run_offline(layout, model, EngineConfig(**base, kernels=KernelConfig(overlap=True)), reqs)
    for rid, r in ref.items():
        assert got[rid].token_ids == r.token_ids, f"request {rid}: greedy tokens differ"
        for a, b in zip(r.logits, got[rid].logits):
            assert torch.allclose(a, b, atol=2e-3, rtol=0), f"request {rid}: max diff {(a - b).abs().max()}"
