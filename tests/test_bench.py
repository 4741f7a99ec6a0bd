"""Tests for hexgen.bench (sweep, serve, memory, workload) and the `hexgen bench` CLI. Performance numbers are
never asserted: only that the modes run and report every field."""
from __future__ import annotations

import json
import statistics
import time

import pytest

from hexgen.bench.memory import memory_summary
from hexgen.bench.modes import BenchSetup, format_table, throughput
from hexgen.bench.sweep import SweepOptions, format_sweep, max_rate_under_slo, sweep
from hexgen.bench.workload import T_OFFERED, TimedSource, poisson_offsets
from hexgen.cli import bench as bench_cli
from hexgen.config import EngineConfig, Layout
from hexgen.engine.report import CPU_PEAK, CUDA_PEAK, RankReport
from hexgen.engine.runner import ModelSpec
from hexgen.engine.types import Request, SamplingParams
from hexgen.errors import ConfigError

RATE_KEYS = ("rate", "offered_rate", "output_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms",
             "tpot_p99_ms", "tpot_p99_under_slo")
RANK_KEYS = ("rank", "stage", "device", "peak_memory_MiB", "peak_memory_kind", "weights_MiB", "kv_tokens", "kv_MiB",
             "kv_tokens_memory_allows")


def tiny_setup(hetero=(1,), kv_tokens: int = 4096) -> BenchSetup:
    model = ModelSpec(preset="tiny", random_weights=True)
    layout = Layout.build(model.config(), list(hetero))
    return BenchSetup(model, layout, EngineConfig(cpu_kv_tokens=kv_tokens), "test", skip_hf=True)


# --- Poisson arrivals ------------------------------------------------------------------------------------

def test_poisson_offsets_are_seeded():
    assert poisson_offsets(50, 4.0, seed=3) == poisson_offsets(50, 4.0, seed=3)
    assert poisson_offsets(50, 4.0, seed=3) != poisson_offsets(50, 4.0, seed=4)
    # the same seed at another rate is the same process, stretched
    a, b = poisson_offsets(20, 2.0, seed=1), poisson_offsets(20, 8.0, seed=1)
    assert all(x == pytest.approx(4 * y) for x, y in zip(a, b))


@pytest.mark.parametrize("rate", [0.5, 3.0, 40.0])
def test_poisson_offsets_have_the_right_mean_gap(rate):
    t = poisson_offsets(20000, rate, seed=0)
    gaps = [b - a for a, b in zip(t, t[1:])]
    assert t[0] == 0.0 and all(g >= 0 for g in gaps)
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.03)
    assert statistics.pstdev(gaps) == pytest.approx(1 / rate, rel=0.05)  # exponential: sd = mean


@pytest.mark.parametrize("rate", [0.0, -1.0, float("inf"), float("nan")])
def test_poisson_offsets_refuse_bad_rates(rate):
    with pytest.raises(ValueError, match="rate"):
        poisson_offsets(3, rate)


def _req(rid: str) -> Request:
    return Request(rid, [5, 6, 7], SamplingParams(max_new_tokens=2))


def test_timed_source_releases_each_request_at_its_arrival():
    src = TimedSource([[(0.0, _req("a")), (0.15, _req("b"))], [(0.0, _req("c"))]])
    t0 = time.monotonic()
    (a,) = src.poll(8, 0.0)
    assert a.request_id == "a" and src.poll(8, 0.0) == [] and not src.exhausted()
    (b,) = src.poll(8, 1.0)  # an idle engine waits: the source sleeps until b arrives
    assert b.request_id == "b" and time.monotonic() - t0 >= 0.14
    assert b.meta[T_OFFERED] == pytest.approx(a.meta[T_OFFERED] + 0.15)  # the scheduled arrival
    assert src.poll(8, 0.0) == []  # the next phase waits for this one to finish
    src.finished("a")
    src.finished("b")
    (c,) = src.poll(8, 0.0)
    assert c.request_id == "c" and src.exhausted()


def test_timed_source_hands_out_at_most_max_requests():
    src = TimedSource([[(0.0, _req(str(i))) for i in range(5)]])
    assert [r.request_id for r in src.poll(2, 0.0)] == ["0", "1"]
    assert [r.request_id for r in src.poll(8, 0.0)] == ["2", "3", "4"]


# --- the SLO search ----------------------------------------------------------------------------------------

def _rows(*pairs):
    return [{"rate": r, "tpot_p99_ms": p} for r, p in pairs]


@pytest.mark.parametrize(("rows", "best"), [
    (_rows((1, 40.0), (2, 70.0), (4, 99.9), (8, 180.0)), 4),
    (_rows((8, 180.0), (1, 40.0), (4, 130.0), (2, 70.0)), 2),  # any order
    (_rows((1, 40.0), (2, 120.0), (4, 90.0)), 1),  # a lucky higher rate after a miss is not credited
    (_rows((1, 100.0), (2, 50.0)), None),  # the SLO is strict: exactly 100 ms misses
    (_rows((1, 40.0), (2, None), (4, 50.0)), 1),  # no TPOT sample: cannot show the SLO
    (_rows((0.5, 10.0), (1, 20.0)), 1),
])
def test_max_rate_under_slo(rows, best):
    assert max_rate_under_slo(rows, 100.0) == best


@pytest.mark.parametrize(("kw", "flag"), [
    ({"rates": ()}, "--rates"), ({"rates": (1, 0)}, "--rates"), ({"rates": (1, float("inf"))}, "--rates"),
    ({"rates": (1, 1)}, "--rates"), ({"rates": (1,), "num_requests": 0}, "--num-requests"),
    ({"rates": (1,), "tpot_slo_ms": 0}, "--tpot-slo-ms"), ({"rates": (1,), "prompt_range": (9, 3)}, "--prompt-range"),
    ({"rates": (1,), "output_range": (1, 4)}, "--output-range"),
])
def test_sweep_options_name_the_bad_flag(kw, flag):
    with pytest.raises(ConfigError, match=flag):
        SweepOptions(**kw)


# --- memory and KV -------------------------------------------------------------------------------------------

def test_memory_summary_cuda_checks_the_kv_target():
    gib = 2**30
    ranks = [RankReport(r, s, f"cuda:{r}", 70 * gib, CUDA_PEAK, 13 * gib, kv, kv * 2**19, 2**19, 80 * gib, 72 * gib,
                        allows) for r, s, kv, allows in [(0, 0, 100_000, 110_000), (1, 1, 100_000, 105_000)]]
    mem = memory_summary(ranks)
    assert [s["kv_vs_memory_allows"] for s in mem["stages"]] == [0.909, 0.952]
    assert mem["kv_target_met"] is True and mem["ranks"][0]["peak_vs_device"] == 0.875
    assert memory_summary([ranks[0], RankReport(**{**ranks[1].to_dict(), "kv_tokens_memory_allows": 200_000})]
                          )["kv_target_met"] is False


def test_memory_summary_cpu_says_na():
    mem = memory_summary([RankReport(0, 0, "cpu", 2**29, CPU_PEAK, 2**20, 4096, 2**22, 1024)])
    assert mem["stages"] == [{"stage": 0, "kv_tokens": 4096, "kv_tokens_memory_allows": None,
                              "kv_vs_memory_allows": None, "kv_cache_dtype": "auto", "kv_bytes_per_token": 1024}]
    assert mem["kv_target_met"] is None and "CPU" in mem["note"]


# --- modes end to end (tiny preset, CPU) ------------------------------------------------------------------------

def test_sweep_end_to_end_reports_rates_slo_and_memory():
    res = sweep(tiny_setup(), SweepOptions((30.0, 60.0), num_requests=4, prompt_range=(4, 8), output_range=(2, 4)))
    assert [r["rate"] for r in res["rates"]] == [30.0, 60.0]
    for row in res["rates"]:
        assert set(RATE_KEYS) <= set(row) and row["requests"] == 4
    assert "max_rate_under_slo" in res and res["tpot_slo_ms"] == 100.0
    (rank,) = res["memory"]["ranks"]
    assert set(RANK_KEYS) <= set(rank) and rank["kv_tokens"] == 4096 and rank["peak_memory_MiB"] > 0
    assert "highest rate" in format_sweep(res)


def test_throughput_reports_memory_and_kv_per_stage():
    res = throughput(tiny_setup((1, 1), kv_tokens=2048), num_requests=3, prompt_range=(4, 8), output_range=(2, 3))
    mem = res["memory"]
    assert [r["rank"] for r in mem["ranks"]] == [0, 1] and [s["stage"] for s in mem["stages"]] == [0, 1]
    for r in mem["ranks"]:
        assert set(RANK_KEYS) <= set(r) and r["peak_memory_kind"] == CPU_PEAK and r["kv_tokens"] == 2048
    assert "KV capacity 2048 tokens" in format_table(res)


@pytest.mark.slow
def test_serve_end_to_end_against_the_direct_engine(tmp_path, capsys):
    from tests.redis_server import redis_server_binary
    from tests.serving_harness import make_tiny_model

    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed")
    model = make_tiny_model(str(tmp_path / "model"))
    out = tmp_path / "serve.json"
    code = bench_cli.main(["serve", "--model", model, "--hetero-config", "1", "1", "--num-requests", "3",
                           "--prompt-range", "4", "8", "--output-range", "2", "4", "--kv-tokens", "1024",
                           "--out", str(out)])
    assert code == 0
    res = json.loads(out.read_text())
    assert res["workload"]["direct_input"] == "ids"  # the default
    for path in ("direct", "redis", "http"):
        assert res[path]["requests"] == 3 and res[path]["output_tokens"] == res["workload"]["output_tokens"]
    assert set(res["overhead"]) >= {"throughput_ratio", "ttft_p50_diff_ms", "targets"}
    assert set(res["http_overhead"]) == {"vs_direct", "vs_redis"}
    assert set(res["http_overhead"]["vs_redis"]) >= {"throughput_ratio", "ttft_p50_diff_ms", "ttft_paired_diff_p50_ms"}
    assert [r["kv_tokens"] for r in res["memory"]["ranks"]] == [1024, 1024]
    out = capsys.readouterr().out
    assert "Redis path:" in out and "HTTP path:" in out


@pytest.mark.slow
def test_serve_a_preset_with_the_heads_tokenizer(tmp_path):
    """Random weights (as on the GPU runs): the head tokenizes with --tokenizer, the workers load the preset."""
    from tests.redis_server import redis_server_binary
    from tests.tiny_tokenizer import save_tiny_tokenizer

    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed")
    tok = save_tiny_tokenizer(str(tmp_path / "tok"))
    out = tmp_path / "serve.json"
    code = bench_cli.main(["serve", "--preset", "tiny", "--random-weights", "--tokenizer", tok,
                           "--num-requests", "3", "--prompt-range", "4", "8", "--output-range", "2", "4",
                           "--kv-tokens", "1024", "--rate", "20", "--direct-input", "text", "--no-http",
                           "--out", str(out)])
    assert code == 0
    res = json.loads(out.read_text())
    assert res["workload"]["direct_input"] == "text"  # the direct engine tokenized each text on arrival
    assert "http" not in res and "http_overhead" not in res
    for path in ("direct", "redis"):
        assert res[path]["requests"] == 3 and res[path]["output_tokens"] == res["workload"]["output_tokens"]


def test_tokenizing_source_releases_the_heads_ids_at_the_scheduled_arrival(tmp_path):
    """--direct-input text: each request is tokenized when it arrives, into the ids the head makes of its text."""
    from hexgen.bench.serve import TokenizingSource, build_items
    from hexgen.bench.workload import mixed_shapes
    from tests.tiny_tokenizer import build_tiny_tokenizer, save_tiny_tokenizer

    tok_dir = save_tiny_tokenizer(str(tmp_path / "tok"))
    tok = build_tiny_tokenizer()
    items = build_items(tok, mixed_shapes(3, (8, 16), (2, 2), 0), len(tok), 0, [0.0, 0.0, 0.05], "r")
    blank = [(i.offset, Request(i.request.request_id, [1], i.request.params)) for i in items]  # ids to be made
    src = TokenizingSource([blank], {i.request.request_id: i.text for i in items}, tok_dir)
    assert src._tok is None  # loaded in the engine's process, at the first arrival
    t0 = time.monotonic()
    got = src.poll(8, 0.0)
    assert [r.request_id for r in got] == ["r0", "r1"]  # the third is not due yet
    while len(got) < 3:
        got += src.poll(8, 0.2)
    for r, item in zip(got, items):
        assert r.prompt_ids == item.request.prompt_ids and len(r.prompt_ids) > 1
        assert r.meta[T_OFFERED] >= t0 - 1.0
    assert got[2].meta[T_OFFERED] - got[0].meta[T_OFFERED] == pytest.approx(0.05, abs=1e-6)


# --- CLI validation (no processes) -----------------------------------------------------------------------------

@pytest.mark.parametrize(("argv", "flag"), [
    (["sweep", "--rates", "1", "-2"], "--rates"),
    (["sweep"], "--rates"),
    (["throughput", "--rates", "1", "--tpot-slo-ms", "-5"], "--tpot-slo-ms"),
    (["latency", "--rate", "2"], "--rate"),
    (["serve", "--rate", "0"], "--rate"),
    (["serve"], "--tokenizer"),  # a preset has no tokenizer for the head
    (["latency", "--tokenizer", "x"], "--tokenizer"),
    (["latency", "--direct-input", "ids"], "--direct-input"),
    (["serve", "--direct-input", "words"], "--direct-input"),
])
def test_cli_names_the_bad_flag(argv, flag, capsys):
    assert bench_cli.main(argv + ["--preset", "tiny", "--random-weights"]) == 2
    assert flag in capsys.readouterr().err


def test_serve_refuses_engine_flags_the_workers_do_not_take(tmp_path, capsys):
    from tests.serving_harness import make_tiny_model

    model = make_tiny_model(str(tmp_path / "model"))
    assert bench_cli.main(["serve", "--model", model, "--max-num-batched-tokens", "1024"]) == 2
    assert "max_num_batched_tokens" in capsys.readouterr().err


def test_serve_carries_cuda_graphs_and_a_preset_to_the_workers(tmp_path):
    """Workers take --cuda-graphs; a preset's deployment config names the preset and the head's tokenizer."""
    from hexgen.bench.serve import ServeOptions, serve_tokenizer, worker_engine_overrides
    from hexgen.cli.worker import build_parser, engine_overrides
    from hexgen.demo import DemoOptions, write_config
    from hexgen.wire.settings import load_settings
    from tests.tiny_tokenizer import save_tiny_tokenizer

    setup = tiny_setup()
    graphs = BenchSetup(setup.model, setup.layout, EngineConfig(cpu_kv_tokens=4096, cuda_graphs=True), "test")
    assert worker_engine_overrides(graphs) == {"max_num_seqs": 64, "cpu_kv_tokens": 4096, "cuda_graphs": True}
    assert "cuda_graphs" not in worker_engine_overrides(setup)
    flags = build_parser().parse_args(["--stage", "0", "--max-num-seqs", "8", "--cuda-graphs"])
    assert engine_overrides(flags) == {"max_num_seqs": 8, "cuda_graphs": True}
    assert engine_overrides(build_parser().parse_args(["--stage", "0"])) == {}

    with pytest.raises(ConfigError, match="--tokenizer"):
        serve_tokenizer(setup, ServeOptions())
    tok_dir = save_tiny_tokenizer(str(tmp_path / "tok"))
    assert serve_tokenizer(setup, ServeOptions(tokenizer=tok_dir)).decode([0, 40]).startswith("<s>")
    path = write_config(str(tmp_path / "d.toml"), "redis://127.0.0.1:1/0", None, DemoOptions((1,), (6,)),
                        preset="tiny", tokenizer=tok_dir)
    model = load_settings(path).model
    assert (model.preset, model.path, model.tokenizer) == ("tiny", "", tok_dir)
