"""The throughput ceiling's counts (hexgen.bench.ceiling) against a token-by-token recount, and the bench's
report of it on a tiny model on CPU. Rates are measured, never asserted beyond being positive."""
from __future__ import annotations

import pytest
import torch

from hexgen.bench.ceiling import ceiling, count_workload, matmul_rate
from hexgen.bench.modes import format_table, throughput
from hexgen.bench.roofline import weight_bytes
from hexgen.bench.workload import Shape
from hexgen.config import preset

from tests.test_bench import tiny_setup


def _recount(cfg, shapes, elem):
    """Walk every request step by step as an engine without waste would run it: one prefill of the whole
    prompt, then one decode step per further output token."""
    h, d, L = cfg.hidden_size, cfg.head_dim, cfg.num_layers
    per_token_linear = 2 * L * (h * (cfg.num_heads + 2 * cfg.num_kv_heads) * d + cfg.num_heads * d * h
                                + 3 * h * cfg.intermediate_size)
    kv_token = 2 * L * cfg.num_kv_heads * d * elem
    flops = attn = writes = reads = 0
    for s in shapes:
        ctx = 0
        fed = list(range(s.prompt)) + [s.prompt + j - 1 for j in range(1, s.output)]  # positions fed
        for k, pos in enumerate(fed):
            flops += per_token_linear
            attn += 4 * L * cfg.num_heads * d * (pos + 1)
            writes += kv_token
            ctx = pos + 1
            if k >= s.prompt:  # a decode step reads its whole context
                reads += kv_token * ctx
        flops += 2 * cfg.vocab_size * h * s.output  # LM head per sampled token
    return flops, attn, writes, reads


@pytest.mark.parametrize("name", ["tiny", "llama-2-7b"])
def test_counts_match_a_token_by_token_recount(name):
    cfg = preset(name)
    shapes = [Shape(5, 3), Shape(1, 1), Shape(9, 4), Shape(2, 7)]
    c = count_workload(cfg, shapes, 2)
    flops, attn, writes, reads = _recount(cfg, shapes, 2)
    assert c.linear_flops == flops
    assert c.attention_flops == attn
    assert (c.kv_write_bytes, c.kv_read_bytes) == (writes, reads)
    assert c.min_steps == 7 and c.weight_read_bytes == 7 * weight_bytes(cfg, torch.bfloat16)
    assert c.fed_tokens == sum(s.prompt + s.output - 1 for s in shapes)
    assert c.sampled_tokens == 15


def test_llama_2_7b_default_workload_is_memory_heavy_and_fp8_halves_its_kv():
    """Known figures: Llama-2-7B bf16 holds 0.5 MiB of K/V a token; a 1,000-token prompt with 3 outputs
    reads 1,001 + 1,002 tokens of it in its two decode steps."""
    cfg = preset("llama-2-7b")
    c = count_workload(cfg, [Shape(1000, 3)], 2)
    assert c.kv_read_bytes == (1001 + 1002) * 2 * 32 * 4096 * 2
    fp8 = count_workload(cfg, [Shape(1000, 3)], 2, kv_elem_bytes=1)
    assert fp8.kv_read_bytes == c.kv_read_bytes / 2 and fp8.linear_flops == c.linear_flops


def test_ceiling_takes_the_larger_time_and_the_sum():
    c = count_workload(preset("tiny"), [Shape(8, 4)] * 3, 4)
    flops_s, bytes_s = c.linear_flops / 2.0, c.memory_bytes / 0.5  # 2 s of arithmetic, 0.5 s of traffic
    r = ceiling(c, flops_s, bytes_s)
    assert (r["compute_s"], r["memory_s"], r["bound"]) == (2.0, 0.5, "compute")
    assert (r["bound_s"], r["no_overlap_s"]) == (2.0, 2.5)
    assert r["tokens_per_s"] == 12 / 2.0 and r["tokens_per_s_no_overlap"] == 12 / 2.5
    r = ceiling(c, flops_s * 8, bytes_s)  # now memory-bound
    assert r["bound"] == "memory" and r["bound_s"] == 0.5


def test_matmul_rate_is_measured():
    assert matmul_rate(torch.device("cpu"), torch.float32, n=128, reps=2) > 0


def test_throughput_prints_the_ceiling_and_the_ratio():
    res = throughput(tiny_setup(), num_requests=3, prompt_range=(4, 8), output_range=(2, 3))
    c = res["ceiling"]
    assert c["matmul_TFLOPs"] > 0 and c["copy_TBps"] > 0 and c["bound"] in ("compute", "memory")
    assert c["tokens_per_s"] >= c["tokens_per_s_no_overlap"] > 0
    assert res["engine_vs_ceiling"] == round(res["engine"]["output_tokens_per_s"] / c["tokens_per_s"], 3)
    assert res["engine_vs_no_overlap"] >= res["engine_vs_ceiling"]
    table = format_table(res)
    assert "ceiling:" in table and "engine_vs_ceiling" in table


def test_throughput_runs_both_hf_baselines_on_the_same_requests():
    """HF static batches and transformers' continuous batching (a subset), each reported with its ratio."""
    import dataclasses
    setup = dataclasses.replace(tiny_setup(), skip_hf=False)
    res = throughput(setup, num_requests=4, prompt_range=(4, 8), output_range=(2, 4), hf_batch_size=2,
                     hf_max_batches=1, hf_cb_requests=3)
    cb = res["hf_cb"]
    assert "error" not in cb, cb
    assert cb["requests_run"] == cb["requests_finished"] == 3 and cb["short_outputs"] == 0
    assert cb["output_tokens"] == sum(r for r in _outputs(res)[:3])
    assert res["engine_vs_hf_cb"] > 0 and res["engine_vs_hf"] > 0
    assert "hf_cb" in format_table(res)


def _outputs(res):
    from hexgen.bench.workload import mixed_shapes
    w = res["workload"]
    return [s.output for s in mixed_shapes(w["requests"], tuple(w["prompt_range"]), tuple(w["output_range"]),
                                           w["seed"])]


def test_cli_writes_the_engine_figures_before_the_baselines(tmp_path, monkeypatch):
    """--out holds the engine's figures and the ceiling as soon as they exist: a baseline that then fails
    (here: HF's model cannot be built) loses only itself."""
    import json

    from hexgen.bench import modes
    from hexgen.cli import bench as bench_cli

    def broken(*a, **k):
        raise RuntimeError("no HF here")

    monkeypatch.setattr(modes, "_hf_model", broken)
    out = tmp_path / "t.json"
    argv = ["throughput", "--preset", "tiny", "--random-weights", "--device", "cpu", "--num-requests", "2",
            "--prompt-range", "4", "6", "--output-range", "2", "2", "--out", str(out)]
    with pytest.raises(RuntimeError, match="no HF here"):
        bench_cli.main(argv)
    res = json.loads(out.read_text())
    assert res["engine"]["output_tokens"] == 4 and res["ceiling"]["tokens_per_s"] > 0 and "hf" not in res
