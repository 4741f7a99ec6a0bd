"""Uneven tensor-parallel shards (hexgen.shards): the bounds per dimension, the valid ratios, every bad
ratio rejected before any process starts with a message naming the stage, the ratio and the valid choices,
and the ratio carried by the layout, the flags and the deployment TOML."""
from __future__ import annotations

import pytest

from hexgen import shards
from hexgen.cli.plan import main as plan_main
from hexgen.config import Layout, ModelConfig, preset
from hexgen.errors import ConfigError
from hexgen.wire.settings import PipelineSettings, settings_from_dict

SMOL = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                   num_kv_heads=3, tie_word_embeddings=True)  # SmolLM2-135M's shape


def test_kv_and_query_heads_follow_the_shares():
    # 9 query / 3 KV heads at 2:1: rank 0 two KV heads and their six query heads, rank 1 the third
    assert [shards.kv_head_bounds(3, 2, r, (2, 1)) for r in range(2)] == [(0, 2), (2, 3)]
    assert [shards.q_head_bounds(9, 3, 2, r, (2, 1)) for r in range(2)] == [(0, 6), (6, 9)]
    # 8 KV heads at 3:1 over Llama-3.1-8B's 32 query heads
    assert [shards.kv_head_bounds(8, 2, r, (3, 1)) for r in range(2)] == [(0, 6), (6, 8)]
    assert [shards.q_head_bounds(32, 8, 2, r, (3, 1)) for r in range(2)] == [(0, 24), (24, 32)]


def test_even_shares_are_the_even_split():
    for shares in ((), (3, 3, 3)):
        assert [shards.mlp_bounds(100, 3, r, shares) for r in range(3)] == [(0, 34), (34, 67), (67, 100)]
        assert [shards.kv_head_bounds(6, 3, r, shares) for r in range(3)] == [(0, 2), (2, 4), (4, 6)]
    # even with TP > KV heads: each group of ranks shares one replicated head
    assert [shards.kv_head_bounds(2, 4, r) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert [shards.q_head_bounds(8, 2, 4, r) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]


@pytest.mark.parametrize(("inter", "shares", "align"), [
    (14336, (3, 1), 128), (13824, (2, 1), 128), (1536, (2, 1), 128), (176, (2, 1), 8), (200, (3, 2, 1), 8),
    (100, (1, 3), 4), (20, (5, 1), 1),
])
def test_mlp_split_is_proportional_and_aligned(inter, shares, align):
    assert shards.mlp_alignment(inter, shares) == align
    sizes = shards.mlp_sizes(inter, len(shares), shares)
    assert sum(sizes) == inter and all(sizes)
    assert all(s % align == 0 for s in sizes[:-1])  # every boundary on the alignment; the last takes the rest
    for s, share in zip(sizes, shares):
        assert abs(s - inter * share / sum(shares)) <= align  # in proportion, to the nearest aligned boundary
    bounds = [shards.mlp_bounds(inter, len(shares), r, shares) for r in range(len(shares))]
    assert bounds[0][0] == 0 and bounds[-1][1] == inter and all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


def test_valid_ratios():
    assert shards.valid_ratios(3, 1536, 2) == [(2, 1), (1, 2)]
    assert shards.valid_ratios(8, 14336, 2) == [(7, 1), (3, 1), (5, 3), (3, 5), (1, 3), (1, 7)]
    assert (2, 1, 1) in shards.valid_ratios(4, 1000, 3) and (1, 1, 1) not in shards.valid_ratios(4, 1000, 3)
    assert shards.valid_ratios(2, 100, 4) == []  # uneven needs a whole KV head per rank
    assert shards.valid_ratios(8, 100, 1) == []


# --- the layout ------------------------------------------------------------------------------------------

def test_layout_carries_the_ratio_and_even_ratios_normalize_away():
    layout = Layout.build(SMOL, (2, 1), (20, 10), ["2:1", "1"])
    assert layout.tp_ratio == ((2, 1), ())
    assert [s.shares for s in layout.stages()] == [(2, 1), ()]
    assert layout.describe() == "hetero-config 2 1 / pp-partition 20 10 / tp-ratio 2:1 1"
    tiny = preset("tiny")
    even = Layout.build(tiny, (2, 1), (4, 2))
    for ratio in (None, [], ["1:1", "1"], [[3, 3], [7]]):
        got = Layout.build(tiny, (2, 1), (4, 2), ratio)
        assert got == even and got.describe() == even.describe() and got.stages() == even.stages()
    assert Layout.build(SMOL, (1, 2), (10, 20), [[1], [1, 2]]).tp_ratio == ((), (1, 2))  # TOML lists


@pytest.mark.parametrize(("hetero", "ratio", "message"), [
    ((2,), ["3:1"], "stage 0: tp-ratio 3:1 does not split 3 KV heads into whole heads; "
                    "valid ratios for TP 2: 2:1, 1:2"),
    ((2,), ["2:0"], "stage 0: tp-ratio 2:0: share 0 must be a positive integer (one share per rank); "
                    "valid ratios for TP 2: 2:1, 1:2"),
    ((2,), ["2:-1"], "stage 0: tp-ratio 2:-1: share -1 must be a positive integer"),
    ((2,), ["2:1:1"], "stage 0: tp-ratio 2:1:1 gives 3 share(s) but the stage has TP 2; give one share per rank "
                      "(e.g. 1:1); valid ratios for TP 2: 2:1, 1:2"),
    ((1, 2), ["1", "3:2"], "stage 1: tp-ratio 3:2 does not split 3 KV heads into whole heads; valid ratios for "
                           "TP 2: 2:1, 1:2"),
    ((2, 1), ["2:1"], "tp-ratio: 1 stage(s) given but hetero-config has 2; give one ratio per stage, "
                      "e.g. 1:1 1 (1 for a TP-1 stage)"),
    ((2,), ["2:x"], "stage 0: tp-ratio: '2:x' must be colon-separated positive integers, one share per rank"),
    ((4,), ["2:1:1:1"], "stage 0: tp-ratio 2:1:1:1 needs a whole KV head per rank but TP 4 exceeds the model's "
                        "3 KV heads"),
    ((2,), None, "hetero-config: TP degree 2 is not valid for this model (9 query heads, 3 KV heads); valid "
                 "degrees: 1, 3, 9; TP 2 runs with uneven shards: give --tp-ratio, valid ratios for TP 2: 2:1, 1:2"),
])
def test_bad_ratios_are_rejected_with_the_stage_ratio_and_choices(hetero, ratio, message):
    layers = (30,) if len(hetero) == 1 else (10, 20)
    with pytest.raises(ConfigError) as e:
        Layout.build(SMOL, hetero, layers, ratio)
    assert message in str(e.value)


def test_a_ratio_that_leaves_a_rank_no_mlp_columns_is_rejected():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=4, num_layers=2, num_heads=8, num_kv_heads=8)
    with pytest.raises(ConfigError, match=r"^stage 0: tp-ratio 7:1 leaves a rank no MLP columns \(4 split in "
                                          r"multiples of 1\); valid ratios for TP 2: 3:1, "):
        Layout.build(cfg, (2,), (2,), ["7:1"])


def test_layout_dataclass_checks_counts_and_signs_without_a_model():
    with pytest.raises(ConfigError, match="stage 0: tp-ratio 1:0: share 0 must be a positive integer"):
        Layout((2,), (30,), ((1, 0),))
    with pytest.raises(ConfigError, match="stage 0: tp-ratio 1 gives 1 share"):
        Layout((2,), (30,), ((1,),))


# --- flags and deployment files --------------------------------------------------------------------------

def test_plan_prints_each_ranks_shard(default_model_dir, capsys):
    assert plan_main(["--model", default_model_dir, "--hetero-config", "2", "1", "--pp-partition", "20", "10",
                      "--tp-ratio", "2:1", "1"]) == 0
    out = capsys.readouterr().out
    assert "tp-ratio 2:1 1" in out
    assert "rank 0: share 2/3, KV heads 0-1, query heads 0-5, MLP columns 0-1023" in out
    assert "rank 1: share 1/3, KV heads 2, query heads 6-8, MLP columns 1024-1535" in out
    assert plan_main(["--model", default_model_dir, "--hetero-config", "2", "--tp-ratio", "3:1"]) == 2
    assert "stage 0: tp-ratio 3:1 does not split 3 KV heads" in capsys.readouterr().err


def test_pipeline_settings_take_tp_ratio():
    base = {"model": {"preset": "tiny"}}
    s = settings_from_dict({**base, "pipelines": [{"id": "p0", "hetero_config": [2, 1], "tp_ratio": [[2, 1], [1]]}]})
    assert s.pipeline("p0").tp_ratio == ((2, 1), ())
    assert s.pipeline("p0").layout_text.endswith("/ tp-ratio 2:1 1")
    even = PipelineSettings("p1", (2, 1), (4, 2), tp_ratio=((1, 1), (1,)))
    assert even.tp_ratio == () and "tp-ratio" not in even.layout_text
    with pytest.raises(ConfigError, match=r"pipelines\['p0'\]: stage 0: tp-ratio 2:0: share 0 must be a positive"):
        settings_from_dict({**base, "pipelines": [{"id": "p0", "hetero_config": [2], "tp_ratio": [[2, 0]]}]})
    with pytest.raises(ConfigError, match=r"pipelines\['p0'\]: tp-ratio: 1 stage\(s\) given but hetero-config has 2"):
        settings_from_dict({**base, "pipelines": [{"id": "p0", "hetero_config": [2, 1], "pp_partition": [4, 2],
                                                   "tp_ratio": [[2, 1]]}]})


def test_dashboard_reads_an_uneven_layout_string():
    from hexgen.head.http.dashboard import parse_layout

    layout = Layout.build(SMOL, (2, 1), (20, 10), ["2:1", "1"])
    assert parse_layout(layout.describe()) == ([2, 1], [20, 10])


def test_generate_rejects_a_bad_ratio_before_starting_any_process(default_model_dir, capsys):
    from hexgen.cli.generate import main as generate_main

    assert generate_main(["--model", default_model_dir, "--hetero-config", "2", "1", "--tp-ratio", "2:0", "1",
                          "--prompt", "hi"]) != 0
    err = capsys.readouterr().err
    assert "stage 0: tp-ratio 2:0: share 0 must be a positive integer" in err and "Traceback" not in err


def test_demo_and_bench_deployment_files_carry_the_ratio(tmp_path):
    from hexgen.cli.demo import main as demo_main
    from hexgen.demo import DemoOptions, write_config
    from hexgen.wire.settings import load_settings

    path = write_config(str(tmp_path / "d.toml"), "redis://127.0.0.1:6379/0", str(tmp_path),
                        DemoOptions((2, 1), (20, 10), ((2, 1), ())))
    assert load_settings(path).pipelines[0].tp_ratio == ((2, 1), ())
    even = write_config(str(tmp_path / "e.toml"), "redis://127.0.0.1:6379/0", str(tmp_path), DemoOptions())
    assert "tp_ratio" not in (tmp_path / "e.toml").read_text(encoding="utf-8")
    assert demo_main(["--hetero-config", "2", "1", "--tp-ratio", "2:1"]) == 1  # refused before anything starts
