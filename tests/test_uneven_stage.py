"""Uneven TP shards in one process: each rank's weights are the right safetensors slices for its share, and a
stage run rank by rank in threads (all-reduce through a shared buffer) reproduces Hugging Face, on the CPU
reference path and, on a CUDA GPU, through the Triton attention, fused and GEMV kernels."""
from __future__ import annotations

import threading

import pytest
import torch

from hexgen.config import KernelConfig, Layout, ModelConfig
from hexgen.model.attention import build_meta
from hexgen.model.loader import CheckpointReader, build_stage, load_stage
from hexgen.model.rope import RotaryCache
from hexgen.shards import kv_head_bounds, mlp_bounds, q_head_bounds
from tests.models import hf_logits, llama_config, load_hf, make_prompts, save_llama
from tests.test_loader import ThreadGroup, ThreadTP


@pytest.fixture(scope="module")
def gqa6(tmp_path_factory) -> str:
    """12 query / 6 KV heads, intermediate 200."""
    config = llama_config(hidden_size=96, num_attention_heads=12, num_key_value_heads=6, intermediate_size=200)
    return save_llama(str(tmp_path_factory.mktemp("gqa6")), config, seed=5, max_shard_size="200KB")


@pytest.fixture(scope="module")
def mha(tmp_path_factory) -> str:
    config = llama_config(num_attention_heads=4, num_key_value_heads=4, intermediate_size=90)
    return save_llama(str(tmp_path_factory.mktemp("mha")), config, seed=6)


def test_each_rank_holds_its_shares_slices(gqa6):
    cfg = ModelConfig.from_dir(gqa6)
    reader = CheckpointReader(gqa6)
    d, shares = cfg.head_dim, (3, 2, 1)
    layout = Layout.build(cfg, (3,), (cfg.num_layers,), [shares])
    for r in range(3):
        stage = layout.stage_of_rank(r)
        model = build_stage(cfg, stage, ThreadTP(r, 3, None, shares=stage.shares), torch.float32,
                            torch.device("cpu"))
        load_stage(model, gqa6, progress=False)
        q0, q1 = q_head_bounds(cfg.num_heads, cfg.num_kv_heads, 3, r, shares)
        k0, k1 = kv_head_bounds(cfg.num_kv_heads, 3, r, shares)
        i0, i1 = mlp_bounds(cfg.intermediate_size, 3, r, shares)
        assert (q1 - q0, k1 - k0) == (2 * shares[r], shares[r])  # 6 KV heads at 3:2:1, query groups of 2
        attn = model.layers[1].attn
        assert (attn.n_q, attn.n_kv) == (q1 - q0, k1 - k0)
        p = "model.layers.1."
        full = {n: reader.full(p + n) for n in ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                                                "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")}
        qkv = torch.cat([full["self_attn.q_proj.weight"][q0 * d:q1 * d], full["self_attn.k_proj.weight"][k0 * d:k1 * d],
                         full["self_attn.v_proj.weight"][k0 * d:k1 * d]])
        torch.testing.assert_close(attn.qkv_proj.weight, qkv, rtol=0, atol=0)
        torch.testing.assert_close(attn.o_proj.weight, full["self_attn.o_proj.weight"][:, q0 * d:q1 * d], rtol=0, atol=0)
        mlp = model.layers[1].mlp
        gate_up = torch.cat([full["mlp.gate_proj.weight"][i0:i1], full["mlp.up_proj.weight"][i0:i1]])
        torch.testing.assert_close(mlp.gate_up.weight, gate_up, rtol=0, atol=0)
        torch.testing.assert_close(mlp.down.weight, full["mlp.down_proj.weight"][:, i0:i1], rtol=0, atol=0)
    assert [mlp_bounds(200, 3, r, shares) for r in range(3)] == [(0, 96), (96, 168), (168, 200)]


def run_uneven(model_dir: str, shares: tuple[int, ...], prompt: list[int], chunks: list[int], device: torch.device,
               kernels: KernelConfig, dtype=torch.float32) -> torch.Tensor:
    """Logits [len(prompt), vocab] of one TP stage with ``shares``, a thread per rank, prefilled in ``chunks``
    then decoded token by token (teacher-forced along the prompt)."""
    cfg = ModelConfig.from_dir(model_dir)
    tp = len(shares)
    layout = Layout.build(cfg, (tp,), (cfg.num_layers,), [shares])
    group = ThreadGroup(tp)
    out: list[torch.Tensor | None] = [None] * tp
    errors: list[BaseException] = []
    block = 16
    fast = device.type == "cuda"

    def rank_main(r: int) -> None:
        try:
            stage = layout.stage_of_rank(r)
            model = build_stage(cfg, stage, ThreadTP(r, tp, group, shares=stage.shares), dtype, device, kernels=kernels)
            load_stage(model, model_dir, progress=False)
            n_kv = model.layers[0].attn.n_kv
            blocks = -(-len(prompt) // block)
            kv = torch.zeros(cfg.num_layers, 2, blocks * block, n_kv, cfg.head_dim, dtype=dtype, device=device)
            rotary = RotaryCache(cfg, 128, device)
            table = list(reversed(range(blocks)))
            rows, done = [], 0
            steps = chunks + [1] * (len(prompt) - sum(chunks))
            with torch.no_grad():
                for n in steps:
                    pos = list(range(done, done + n))
                    meta = build_meta(pos, [n], [done + n], [table], block, device, kernel=fast, prefill_kernel=fast)
                    cos, sin = rotary.lookup(torch.tensor(pos, device=device), dtype)
                    h = model(torch.tensor(prompt[done:done + n], device=device), cos, sin, kv, meta)
                    rows.append(model.logits(h).cpu())
                    done += n
            out[r] = torch.cat(rows)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)
            group.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(tp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    return out[0]


@pytest.mark.parametrize(("fixture", "shares"), [
    ("gqa6", (2, 1)), ("gqa6", (5, 1)), ("gqa6", (1, 2, 3)), ("gqa6", (3, 1, 1, 1)), ("mha", (1, 3)),
    ("mha", (2, 1, 1)),
])
def test_uneven_stage_matches_hugging_face(request, fixture, shares):
    model_dir = request.getfixturevalue(fixture)
    prompt = make_prompts(320, [20], seed=len(shares))[0]
    got = run_uneven(model_dir, shares, prompt, [7, 9], torch.device("cpu"), KernelConfig())
    want = hf_logits(load_hf(model_dir), prompt[:1], prompt[1:])
    torch.testing.assert_close(got[:-1], want, rtol=1e-4, atol=2e-4)


def test_fp8_checkpoint_scales_follow_the_uneven_rows(tmp_path):
    """A per-channel FP8 checkpoint at 2:1: each rank's QKV and gate/up rows carry their own rows' scales
    (sliced with the same bounds as the weights), and the stage reproduces the dequantized HF model."""
    from hexgen.kernels import fp8_linear
    from tests.fp8_models import save_fp8_llama

    config = llama_config(hidden_size=96, num_attention_heads=12, num_key_value_heads=6, intermediate_size=200)
    path = str(tmp_path / "fp8")
    ref = save_fp8_llama(path, config, seed=8, strategy="channel")
    cfg = ModelConfig.from_dir(path)
    assert cfg.quantization == "fp8"
    for r in range(2):
        stage = Layout.build(cfg, (2,), (cfg.num_layers,), ["2:1"]).stages()[0]
        model = build_stage(cfg, stage, ThreadTP(r, 2, None, shares=stage.shares), torch.float32, torch.device("cpu"))
        load_stage(model, path, progress=False)
        i0, i1 = mlp_bounds(200, 2, r, (2, 1))
        up = model.layers[0].mlp.gate_up
        got = fp8_linear.dequantize(up.weight, up.weight_scale, torch.float32)[i1 - i0:]  # the up section
        assert torch.equal(got, ref.model.layers[0].mlp.up_proj.weight[i0:i1])
    prompt = make_prompts(320, [20], seed=9)[0]
    got = run_uneven(path, (2, 1), prompt, [7, 9], torch.device("cpu"), KernelConfig())
    torch.testing.assert_close(got[:-1], hf_logits(ref, prompt[:1], prompt[1:]), rtol=1e-4, atol=2e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_uneven_stage_kernels(gqa6):
    """One GPU, one thread per rank: the Triton paged prefill/decode, fused norm/rotary/SiLU and GEMV kernels
    on uneven shards (ranks of 4 and 2 KV heads, 128 and 72 MLP columns). At 1:1 the shares normalize to the
    even path, so its logits equal the even stage's bit for bit; at 2:1 they equal Hugging Face's (float32,
    within GPU float32 rounding) and the CPU reference path's."""
    cuda = torch.device("cuda")
    prompt = make_prompts(320, [40], seed=3)[0]
    kernels = KernelConfig()
    even = run_uneven(gqa6, (1, 1), prompt, [17, 11], cuda, kernels)
    assert Layout.build(ModelConfig.from_dir(gqa6), (2,), (4,), ["1:1"]).tp_ratio == ()
    again = run_uneven(gqa6, (3, 3), prompt, [17, 11], cuda, kernels)
    torch.testing.assert_close(again, even, rtol=0, atol=0)
    uneven = run_uneven(gqa6, (2, 1), prompt, [17, 11], cuda, kernels)
    want = hf_logits(load_hf(gqa6), prompt[:1], prompt[1:])
    torch.testing.assert_close(uneven[:-1], want, rtol=1e-3, atol=1e-3)
    cpu = run_uneven(gqa6, (2, 1), prompt, [17, 11], torch.device("cpu"), kernels)
    torch.testing.assert_close(uneven, cpu, rtol=1e-3, atol=1e-3)
    bf16 = run_uneven(gqa6, (2, 1), prompt, [17, 11], cuda, kernels, dtype=torch.bfloat16)
    assert torch.nn.functional.cosine_similarity(bf16[:-1].float(), want, dim=-1).min() > 0.97
