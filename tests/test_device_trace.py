"""The device-timeline summary (hexgen.engine.device_trace.summarize): busy time counts overlapping kernels
once, idle gaps land in their length buckets, kernels are sorted into kinds."""

from __future__ import annotations

import gc

from hexgen.engine.device_trace import GcPauses, kind_of, summarize

US = 1_000  # ns


def test_busy_time_merges_overlaps_and_gaps_fall_in_their_buckets():
    kernels = [
        ("nvjet_sm90_tst_192x192", 0, 100 * US),
        ("decode_stage1", 50 * US, 150 * US),  # overlaps the GEMM by 50 us
        ("silu_mul", 155 * US, 160 * US),  # a 5 us gap before it
        ("Memcpy DtoD", 2_160 * US, 2_170 * US),  # a 2 ms gap
        ("rotary_kv_write", 20_170 * US, 20_180 * US),  # an 18 ms gap
    ]
    s = summarize(kernels, wall_s=0.03)
    assert s["kernels"] == 5
    assert abs(s["first_to_last_kernel_s"] - 0.02018) < 1e-9
    assert abs(s["busy_s"] - 175e-6) < 1e-9  # 150 + 5 + 10 + 10 us
    assert abs(s["busy_s"] + s["idle_s"] - s["first_to_last_kernel_s"]) < 1e-9
    counts = {(g["from_us"], g["to_us"]): g["count"] for g in s["idle_gaps"]}
    assert counts == {(0, 10): 1, (10, 100): 0, (100, 1000): 0, (1000, 10000): 1, (10000, None): 1}
    assert s["longest_gaps"][0] == {"at_s": 0.0022, "ms": 18.0}
    assert set(s["kernel_s_by_kind"]) == {"gemm", "attention", "other", "copy"}
    assert s["top_kernels"][0]["name"] == "nvjet_sm90_tst_192x192"


def test_kinds_and_gc_pauses():
    assert kind_of("prefill_fwd") == "attention" and kind_of("gemv_kernel") == "gemv"
    assert kind_of("ncclDevKernel_AllReduce") == "nccl" and kind_of("add_rms_norm") == "other"
    pauses = GcPauses()
    gc.callbacks.append(pauses)
    try:
        gc.collect()
    finally:
        gc.callbacks.remove(pauses)
    assert pauses.summary()["gen2"]["count"] >= 1
