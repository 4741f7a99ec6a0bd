"""The planner's cost model (hexgen/planner/costmodel.py): hand-computed cases."""
from __future__ import annotations

import pytest

from hexgen.config import PRESETS, ModelConfig
from hexgen.errors import ConfigError
from hexgen.planner.cluster import Link
from hexgen.planner.costmodel import (BANDWIDTH_EFFICIENCY, CPU_OP_MIN_S, FLOPS_EFFICIENCY, GPU_RUNTIME_BYTES,
                                      KERNEL_MIN_S, KERNELS_PER_LAYER, LAYER_OVERHEAD_S, LM_HEAD_MAX_ROWS, CostModel,
                                      attention_pairs)
from hexgen.planner.devices import DEVICE_SPECS

H100 = DEVICE_SPECS["H100"]


@pytest.fixture
def cost7b() -> CostModel:
    return CostModel(PRESETS["llama-2-7b"])


@pytest.fixture
def cost70b() -> CostModel:
    return CostModel(PRESETS["llama-2-70b"])


def test_7b_layer_weight_bytes_tp1_tp2(cost7b):
    # hidden 4096, intermediate 11008, 32 heads x 128 = 4096, 32 KV heads.
    # TP 1: q, k, v, o 4 * 4096 * 4096 = 67_108_864; gate, up, down 3 * 4096 * 11008 = 135_266_304;
    #       2 RMSNorm weights 8_192 -> 202_383_360 params, 404_766_720 bytes in bf16.
    assert cost7b.layer_weight_bytes(1) == 404_766_720
    # TP 2: attention 4 * 4096 * 2048 = 33_554_432; MLP 3 * 4096 * 5504 = 67_633_152; norms replicated 8_192
    #       -> 101_195_776 params, 202_391_552 bytes.
    assert cost7b.layer_weight_bytes(2) == 202_391_552


def test_uneven_intermediate_costs_the_largest_shard():
    cfg = ModelConfig(vocab_size=100, hidden_size=64, intermediate_size=10, num_layers=2, num_heads=4,
                      num_kv_heads=4)
    cost = CostModel(cfg, dtype_bytes=4)
    # TP 4: attention 4 * 64 * 16 = 4096, MLP shard ceil(10 / 4) = 3 -> 3 * 64 * 3 = 576, norms 128.
    assert cost.layer_params(4) == 4096 + 576 + 128
    assert cost.layer_weight_bytes(4) == 4 * (4096 + 576 + 128)


def test_embedding_and_head_bytes(cost7b):
    assert cost7b.first_extra_bytes() == 32000 * 4096 * 2  # 262_144_000
    assert cost7b.last_extra_bytes() == (32000 * 4096 + 4096) * 2
    assert cost7b.embed_bytes() == 524_296_192
    # replicated on every rank of the first/last stage: independent of TP
    assert cost7b.weight_bytes(4, 10, True, False) == 10 * cost7b.layer_weight_bytes(4) + 262_144_000
    assert cost7b.weight_bytes(2, 1, False, False) == cost7b.layer_weight_bytes(2)


def test_kv_bytes_sharded_and_replicated(cost70b, cost7b):
    # 70B: 8 KV heads of 128; K and V, bf16: 2 * heads * 128 * 2 bytes.
    assert cost70b.kv_bytes_per_token(1) == 4096  # 8 heads
    assert cost70b.kv_bytes_per_token(4) == 1024  # 2 heads a rank
    assert cost70b.kv_bytes_per_token(8) == 512  # 1 head a rank
    assert cost70b.kv_bytes_per_token(16) == 512  # tp 16 > 8 KV heads: 1 replicated head a rank
    assert cost70b.local_heads(16) == (4, 1)
    assert cost7b.kv_bytes_per_token(1) == 2 * 32 * 128 * 2  # 16_384


def test_invalid_tp_names_valid_degrees(cost7b, cost70b):
    with pytest.raises(ConfigError, match=r"tp: 3 .*valid: 1, 2, 4, 8, 16, 32"):
        cost7b.layer_weight_bytes(3)
    with pytest.raises(ConfigError, match="tp"):
        cost70b.kv_bytes_per_token(0)


def test_decode_batch1_is_weight_bandwidth_bound(cost7b):
    t = cost7b.layer_time(H100, 1, 1, 1)
    roof = 404_766_720 / (3.35e12 * BANDWIDTH_EFFICIENCY)  # ~151 us
    assert t == pytest.approx(roof, rel=0.03)
    assert t > roof


def test_decode_reads_kv_of_every_context(cost7b):
    short = cost7b.layer_time(H100, 1, 32, 32 * 128)
    long = cost7b.layer_time(H100, 1, 32, 32 * 4096)
    extra_kv = 32 * (4096 - 128) * 16_384  # bytes more KV read
    assert long - short == pytest.approx(extra_kv / (3.35e12 * BANDWIDTH_EFFICIENCY), rel=0.02)


def test_long_prefill_is_compute_bound(cost7b):
    tokens = 4096
    t = cost7b.layer_time(H100, 1, tokens, tokens)
    flops = 2 * 202_383_360 * tokens + 4 * 32 * 128 * tokens * tokens / 2
    assert t == pytest.approx(flops / (989.4e12 * FLOPS_EFFICIENCY), rel=0.02)


def test_tp_halves_the_decode_time(cost7b):
    t1 = cost7b.layer_time(H100, 1, 1, 100)
    t2 = cost7b.layer_time(H100, 2, 1, 100)
    assert t2 == pytest.approx(t1 / 2, rel=0.05)


def test_slower_device_is_slower(cost7b):
    assert cost7b.layer_time(DEVICE_SPECS["A4000"], 1, 8, 800) > cost7b.layer_time(DEVICE_SPECS["A6000"], 1, 8, 800)


def test_attention_pairs():
    assert attention_pairs(8, 8 * 500) == 4000  # decode: every row attends to its context
    assert attention_pairs(512, 512) == 512 * 512 / 2  # one causal prefill
    assert attention_pairs(1, 0) == 1


def test_allreduce_ring_formula(cost7b):
    link = Link(100e9, 10e-6)
    nbytes = 8 * 4096 * 2
    assert cost7b.allreduce_time(link, 4, 8) == pytest.approx(2 * 3 / 4 * nbytes / 100e9 + 2 * 3 * 10e-6)
    assert cost7b.allreduce_time(link, 1, 8) == 0.0


def test_transfer_time(cost7b):
    link = Link(1.25e9, 50e-6)
    assert cost7b.transfer_time(link, 16) == pytest.approx(16 * 4096 * 2 / 1.25e9 + 50e-6)


def test_stage_time_composition(cost7b):
    link = Link(300e9, 5e-6)
    lt = cost7b.layer_time(H100, 2, 16, 1600)
    ar = cost7b.allreduce_time(link, 2, 16)
    assert cost7b.stage_time(H100, 2, 10, link, 16, 1600, True, False) == pytest.approx(10 * (lt + 2 * ar))
    head = cost7b.lm_head_time(H100, 16)
    assert cost7b.stage_time(H100, 2, 10, link, 16, 1600, False, True) == pytest.approx(10 * (lt + 2 * ar) + head)
    # prefill: the head runs for at most LM_HEAD_MAX_ROWS rows
    t = cost7b.stage_time(H100, 1, 1, None, 4096, 4096, False, True)
    assert t == pytest.approx(cost7b.layer_time(H100, 1, 4096, 4096) + cost7b.lm_head_time(H100, LM_HEAD_MAX_ROWS))
    with pytest.raises(ConfigError, match="link"):
        cost7b.stage_time(H100, 2, 1, None, 1, 1, False, False)


def test_lm_head_time_is_bandwidth_bound_at_batch1(cost7b):
    assert cost7b.lm_head_time(H100, 1) == pytest.approx(262_144_000 / (3.35e12 * BANDWIDTH_EFFICIENCY), rel=0.05)


def test_stage_memory_and_kv_capacity(cost7b):
    act = cost7b.activation_bytes(1)
    weights = cost7b.weight_bytes(1, 32, True, True)
    assert cost7b.stage_memory(1, 32, 1000, True, True) == weights + 1000 * 32 * 16_384 + act
    cap = cost7b.kv_capacity_tokens(H100, 1, 32, True, True, memory_fraction=0.9)
    budget = int(H100.memory_bytes * 0.9) - GPU_RUNTIME_BYTES - weights - act
    assert cap == budget // (32 * 16_384)
    assert 100_000 < cap < 130_000  # ~60 GB of KV at 0.5 MiB a token
    assert cost7b.stage_memory(1, 32, cap, True, True) <= H100.memory_bytes * 0.9 - GPU_RUNTIME_BYTES


def test_70b_does_not_fit_one_a4000(cost70b):
    assert cost70b.kv_capacity_tokens(DEVICE_SPECS["A4000"], 1, 80, True, True) == 0
    assert cost70b.kv_capacity_tokens(DEVICE_SPECS["H100"], 8, 80, True, True) > 0


def test_cpu_capacity_has_no_gpu_runtime():
    cost = CostModel(PRESETS["tiny"], dtype_bytes=4)
    cpu = DEVICE_SPECS["CPU"]
    cap = cost.kv_capacity_tokens(cpu, 1, 6, True, True, memory_fraction=0.5)
    free = int(cpu.memory_bytes * 0.5) - cost.stage_memory(1, 6, 0, True, True)
    assert cap == free // (6 * cost.kv_bytes_per_token(1))


def test_tiny_layers_hit_the_kernel_floor():
    cost = CostModel(PRESETS["tiny"], dtype_bytes=4)
    gpu = cost.layer_time(H100, 1, 1, 10)
    assert gpu == pytest.approx(KERNELS_PER_LAYER * KERNEL_MIN_S + LAYER_OVERHEAD_S)
    cpu = cost.layer_time(DEVICE_SPECS["CPU"], 1, 1, 10)
    assert cpu == pytest.approx(KERNELS_PER_LAYER * CPU_OP_MIN_S + LAYER_OVERHEAD_S)


def test_validation():
    with pytest.raises(ConfigError, match="dtype_bytes"):
        CostModel(PRESETS["tiny"], dtype_bytes=3)
    cost = CostModel(PRESETS["tiny"])
    with pytest.raises(ConfigError, match="tokens"):
        cost.layer_time(H100, 1, 0, 5)
    with pytest.raises(ConfigError, match="memory_fraction"):
        cost.kv_capacity_tokens(H100, 1, 1, False, False, memory_fraction=1.5)
