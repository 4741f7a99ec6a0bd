"""Tests for hexgen.model.loader (and the parallel layers' weight loaders): a stage reads only its own
tensors, a TP rank's shard equals the right rows/columns of the full tensor, stages are built on the meta
device with local shapes only, sharded and tied checkpoints load, and loaded stages reproduce Hugging Face.

Tensor parallelism is exercised in-process: one thread per TP rank, all-reduce through a shared buffer.
"""
from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable

import pytest
import torch

import hexgen.model.loader as loader_mod
from hexgen.config import Layout, ModelConfig
from hexgen.errors import LoadError
from hexgen.model.attention import build_meta
from hexgen.model.loader import CheckpointReader, build_stage, load_stage
from hexgen.model.rope import RotaryCache
from hexgen.parallel.groups import TPContext
from hexgen.parallel.layers import split_sizes
from tests.models import LLAMA3_ROPE, hf_logits, llama_config, load_hf, make_prompts, save_llama

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory):
    """8 q / 2 kv heads, 4 layers, intermediate 90 (uneven over 4), sharded into several files."""
    return save_llama(str(tmp_path_factory.mktemp("gqa")), llama_config(intermediate_size=90), seed=1,
                      max_shard_size="100KB")


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    return save_llama(str(tmp_path_factory.mktemp("tied")),
                      llama_config(tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE), seed=2)


@pytest.fixture(scope="module")
def mqa_dir(tmp_path_factory):
    """6 q / 1 kv head (TP 3 replicates it), intermediate 100 (uneven over 3)."""
    return save_llama(str(tmp_path_factory.mktemp("mqa")),
                      llama_config(hidden_size=48, num_attention_heads=6, num_key_value_heads=1), seed=3)


def full_tensors(model_dir: str) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(model_dir)
    return {name: reader.full(name) for name in reader.weight_map}


def stage_names(cfg: ModelConfig, start: int, end: int, first: bool, head: bool) -> set[str]:
    names = {"model.embed_tokens.weight"} if first else set()
    for i in range(start, end):
        p = f"model.layers.{i}."
        names |= {p + n for n in ("input_layernorm.weight", "post_attention_layernorm.weight",
                                  "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                                  "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                                  "mlp.down_proj.weight")}
    if head:
        names |= {"model.norm.weight", "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"}
    return names


def load_rank(model_dir: str, layout: Layout, rank: int, dtype=torch.float32):
    stage = layout.stage_of_rank(rank)
    tp = TPContext(rank - stage.first_rank, stage.tp, None)
    model = build_stage(layout_cfg(model_dir), stage, tp, dtype, CPU, with_head=rank == stage.leader)
    return model, load_stage(model, model_dir, progress=False)


def layout_cfg(model_dir: str) -> ModelConfig:
    return ModelConfig.from_dir(model_dir)


# --- what is read ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("hetero", "part"), [((1,), (4,)), ((2, 1), (3, 1)), ((1, 2, 1), (1, 2, 1)),
                                              ((4, 2), (1, 3))])
def test_each_rank_reads_only_its_stage_tensors(gqa_dir, hetero, part):
    cfg = layout_cfg(gqa_dir)
    layout = Layout.build(cfg, hetero, part)
    for rank in range(layout.world_size):
        stage = layout.stage_of_rank(rank)
        _, read = load_rank(gqa_dir, layout, rank)
        want = stage_names(cfg, stage.layer_start, stage.layer_end, stage.is_first,
                           stage.is_last and rank == stage.leader)
        assert len(read) == len(set(read)), "a tensor was read twice"
        assert set(read) == want, f"rank {rank}: read {sorted(set(read) ^ want)} unexpectedly / missed"


def test_sharded_checkpoint_opens_only_needed_files(gqa_dir, monkeypatch):
    with open(os.path.join(gqa_dir, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    assert len(set(weight_map.values())) >= 3, "the fixture should be split into several shards"
    opened = []
    real = loader_mod.safe_open

    def spy(path, *args, **kwargs):
        opened.append(os.path.basename(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(loader_mod, "safe_open", spy)
    layout = Layout.build(layout_cfg(gqa_dir), (1, 1), (1, 3))
    for rank in range(2):
        opened.clear()
        _, read = load_rank(gqa_dir, layout, rank)
        assert sorted(opened) == sorted({weight_map[n] for n in read})
    assert set(opened) != set(weight_map.values())  # the last stage skips the first stage's shard


def test_tied_embeddings_load_lm_head_from_embedding(tied_dir):
    reader = CheckpointReader(tied_dir)
    assert not reader.has("lm_head.weight")  # transformers saves tied weights once
    cfg = layout_cfg(tied_dir)
    layout = Layout.build(cfg, (1, 1), (2, 2))
    last, read = load_rank(tied_dir, layout, 1)
    assert "model.embed_tokens.weight" in read
    full = full_tensors(tied_dir)
    torch.testing.assert_close(last.lm_head.weight, full["model.embed_tokens.weight"], rtol=0, atol=0)


# --- TP shards ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_tp_shards_are_the_right_rows_and_columns(gqa_dir, tp_size):
    cfg = layout_cfg(gqa_dir)
    full = full_tensors(gqa_dir)
    d, hq, hkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    layout = Layout.build(cfg, (tp_size,), (4,))
    inter = split_sizes(cfg.intermediate_size, tp_size)
    for r in range(tp_size):
        model, _ = load_rank(gqa_dir, layout, r)
        nq = hq // tp_size
        kv = r * hkv // tp_size if tp_size <= hkv else r // (tp_size // hkv)  # first local KV head
        nkv = max(1, hkv // tp_size)
        a = sum(inter[:r])
        b = a + inter[r]
        for i, layer in enumerate(model.layers):
            p = f"model.layers.{i}."
            q = full[p + "self_attn.q_proj.weight"][r * nq * d:(r + 1) * nq * d]
            k = full[p + "self_attn.k_proj.weight"][kv * d:(kv + nkv) * d]
            v = full[p + "self_attn.v_proj.weight"][kv * d:(kv + nkv) * d]
            torch.testing.assert_close(layer.attn.qkv_proj.weight, torch.cat([q, k, v]), rtol=0, atol=0)
            torch.testing.assert_close(layer.attn.o_proj.weight,
                                       full[p + "self_attn.o_proj.weight"][:, r * nq * d:(r + 1) * nq * d],
                                       rtol=0, atol=0)
            gate_up = torch.cat([full[p + "mlp.gate_proj.weight"][a:b], full[p + "mlp.up_proj.weight"][a:b]])
            torch.testing.assert_close(layer.mlp.gate_up.weight, gate_up, rtol=0, atol=0)
            torch.testing.assert_close(layer.mlp.down.weight, full[p + "mlp.down_proj.weight"][:, a:b],
                                       rtol=0, atol=0)
            torch.testing.assert_close(layer.input_norm.weight, full[p + "input_layernorm.weight"], rtol=0, atol=0)
            torch.testing.assert_close(layer.post_norm.weight, full[p + "post_attention_layernorm.weight"],
                                       rtol=0, atol=0)
        torch.testing.assert_close(model.embed.weight, full["model.embed_tokens.weight"], rtol=0, atol=0)
    assert sorted(set(inter)) == ([90 // tp_size] if 90 % tp_size == 0 else [22, 23])


def test_uneven_mlp_shards_cover_the_intermediate_exactly():
    for n, parts in ((1536, 9), (90, 4), (100, 3), (7, 7)):
        sizes = split_sizes(n, parts)
        assert sum(sizes) == n and max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


# --- meta-device construction ----------------------------------------------------------------------------

def test_build_stage_constructs_on_meta_and_allocates_local_shapes(mqa_dir, monkeypatch):
    devices_at_init: list[set[str]] = []

    class Recording(loader_mod.LlamaStage):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            devices_at_init.append({p.device.type for p in self.parameters()})

    monkeypatch.setattr(loader_mod, "LlamaStage", Recording)
    cfg = layout_cfg(mqa_dir)  # 6 q heads / 1 kv head, head_dim 8, hidden 48, intermediate 100
    layout = Layout.build(cfg, (3, 1), (3, 1))
    stage = layout.stage_of_rank(2)
    model = build_stage(cfg, stage, TPContext(2, 3, None), torch.bfloat16, CPU, with_head=False)
    assert devices_at_init == [{"meta"}]  # nothing was allocated whole while constructing
    params = dict(model.named_parameters())
    assert {p.device.type for p in params.values()} == {"cpu"}
    assert {p.dtype for p in params.values()} == {torch.bfloat16}
    assert params["layers.0.attn.qkv_proj.weight"].shape == ((2 + 1 + 1) * 8, 48)  # 2 q heads + 1 k + 1 v
    assert params["layers.0.attn.o_proj.weight"].shape == (48, 2 * 8)
    assert params["layers.0.mlp.gate_up.weight"].shape == (2 * 33, 48)  # rank 2 of 100 over 3: 33
    assert params["layers.0.mlp.down.weight"].shape == (48, 33)
    assert params["embed.weight"].shape == (320, 48)  # the embedding is replicated on every first-stage rank
    assert len(model.layers) == 3 and model.lm_head is None and model.norm is None
    full_layer = (6 + 1 + 1) * 8 * 48 + 48 * 6 * 8 + 3 * 100 * 48 + 2 * 48  # qkv, o, gate/up/down, norms
    local_layer = sum(p.numel() for n, p in params.items() if n.startswith("layers.0."))
    assert local_layer == (2 + 1 + 1) * 8 * 48 + 48 * 2 * 8 + 3 * 33 * 48 + 2 * 48 < full_layer / 2


def test_load_casts_to_the_stage_dtype(gqa_dir):
    layout = Layout.build(layout_cfg(gqa_dir), (1,), (4,))
    model, _ = load_rank(gqa_dir, layout, 0, dtype=torch.bfloat16)
    full = full_tensors(gqa_dir)
    assert model.layers[1].input_norm.weight.dtype == torch.bfloat16
    torch.testing.assert_close(model.lm_head.weight, full["lm_head.weight"].to(torch.bfloat16), rtol=0, atol=0)


# --- errors ------------------------------------------------------------------------------------------

def test_missing_checkpoint_files(tmp_path):
    with pytest.raises(LoadError, match=r"has neither model.safetensors nor model.safetensors.index.json"):
        CheckpointReader(str(tmp_path))


def test_missing_tensor_is_named(tmp_path, gqa_dir):
    import shutil

    from safetensors.torch import save_file

    d = tmp_path / "broken"
    shutil.copytree(gqa_dir, d)
    full = full_tensors(gqa_dir)
    del full["model.layers.2.mlp.up_proj.weight"]
    for f in os.listdir(d):
        if f.endswith(".safetensors") or f.endswith(".index.json"):
            os.remove(d / f)
    save_file(full, str(d / "model.safetensors"))
    layout = Layout.build(layout_cfg(str(d)), (1, 1), (2, 2))
    load_rank(str(d), layout, 0)  # stage 0 does not need layer 2
    with pytest.raises(LoadError, match=r"lacks 1 tensor\(s\) this stage needs, e.g. "
                                        r"'model.layers.2.mlp.up_proj.weight'"):
        load_rank(str(d), layout, 1)


def test_shape_mismatch_is_reported(tmp_path, gqa_dir):
    import shutil

    d = tmp_path / "wrong"
    shutil.copytree(gqa_dir, d)
    with open(d / "config.json") as f:
        cfg = json.load(f)
    cfg["intermediate_size"] = 96
    with open(d / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(LoadError, match=r"checkpoint slice has shape"):
        load_rank(str(d), Layout.build(layout_cfg(str(d)), (1,), (4,)), 0)


# --- loaded stages compute what Hugging Face computes --------------------------------------------------

class ThreadGroup:
    """All-reduce among ``n`` threads (one per TP rank) through a shared list."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.barrier = threading.Barrier(n)
        self.slots: list[torch.Tensor | None] = [None] * n


class ThreadTP(TPContext):
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        g: ThreadGroup = self.group
        g.slots[self.rank] = x.clone()
        g.barrier.wait()
        total = torch.stack(g.slots).sum(0)  # same order on every rank: identical results
        g.barrier.wait()
        x.copy_(total)
        return x


def run_stage_tp(model_dir: str, tp_size: int, prompt: list[int], chunks: list[int],
                 after_load: Callable[[torch.nn.Module], None] | None = None) -> torch.Tensor:
    """Logits [len(prompt), vocab] of a single-stage TP model run in threads, prefilled in ``chunks``;
    ``after_load(model)`` runs on each rank's loaded stage first."""
    cfg = layout_cfg(model_dir)
    layout = Layout.build(cfg, (tp_size,), (cfg.num_layers,))
    group = ThreadGroup(tp_size)
    out: list[torch.Tensor | None] = [None] * tp_size
    errors: list[BaseException] = []
    block = 4

    def rank_main(r: int) -> None:
        try:
            stage = layout.stage_of_rank(r)
            model = build_stage(cfg, stage, ThreadTP(r, tp_size, group), torch.float32, CPU)
            load_stage(model, model_dir, progress=False)
            if after_load is not None:
                after_load(model)
            n_kv = model.layers[0].attn.n_kv
            blocks = -(-len(prompt) // block)
            kv = torch.zeros(cfg.num_layers, 2, blocks * block, n_kv, cfg.head_dim)
            rotary = RotaryCache(cfg, 64, CPU)
            table = list(reversed(range(blocks)))
            rows, done = [], 0
            with torch.no_grad():
                for n in chunks:
                    pos = list(range(done, done + n))
                    meta = build_meta(pos, [n], [done + n], [table], block, CPU, kernel=False)
                    cos, sin = rotary.lookup(torch.tensor(pos), torch.float32)
                    h = model(torch.tensor(prompt[done:done + n]), cos, sin, kv, meta)
                    rows.append(model.logits(h))
                    done += n
            out[r] = torch.cat(rows)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)
            group.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(tp_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    for r in range(1, tp_size):
        torch.testing.assert_close(out[r], out[0], rtol=0, atol=0)
    return out[0]


@pytest.mark.parametrize(("fixture", "tp_size", "chunks"), [
    ("gqa_dir", 1, [13]),
    ("gqa_dir", 2, [5, 8]),  # chunked prefill: the second chunk attends to the cached first
    ("gqa_dir", 4, [1, 12]),  # KV heads replicated, uneven MLP shards 23/23/22/22
    ("mqa_dir", 3, [13]),  # one KV head replicated 3 times, MLP 34/33/33
    ("tied_dir", 2, [6, 1, 6]),  # tied embeddings, llama3 rope; a single-token step in the middle
])
def test_loaded_stage_matches_hugging_face(request, fixture, tp_size, chunks):
    model_dir = request.getfixturevalue(fixture)
    prompt = make_prompts(320, [13], seed=tp_size)[0]
    got = run_stage_tp(model_dir, tp_size, prompt, chunks)
    want = hf_logits(load_hf(model_dir), prompt[:1], prompt[1:])  # logits at every position but the last
    torch.testing.assert_close(got[:-1], want, rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize(("fixture", "tp_size", "chunks"), [
    ("gqa_dir", 1, [13]),
    ("gqa_dir", 2, [5, 1, 1, 6]),  # one-row steps: the shapes the CPU layout is chosen for
    ("tied_dir", 1, [6, 1, 6]),
])
def test_stage_with_column_major_linears_matches_hugging_face(request, fixture, tp_size, chunks):
    """hexgen.kernels.cpu_layout re-lays CPU weights column-major where batch-1 GEMV is faster: with every
    linear re-laid (min_bytes 0, a timer that always prefers column-major), logits still match HF."""
    from hexgen.kernels import cpu_layout

    def relay(model: torch.nn.Module) -> None:
        linears = [m for m in model.modules() if hasattr(m, "gemv")]
        got = cpu_layout.tune(linears, timer=lambda ws, x: 0.5 if cpu_layout.is_column_major(ws[0]) else 1.0,
                              min_bytes=0)
        assert got and set(got.values()) == {"column"}
        assert all(cpu_layout.is_column_major(m.weight) for m in linears)

    model_dir = request.getfixturevalue(fixture)
    prompt = make_prompts(320, [13], seed=tp_size)[0]
    got = run_stage_tp(model_dir, tp_size, prompt, chunks, after_load=relay)
    want = hf_logits(load_hf(model_dir), prompt[:1], prompt[1:])
    torch.testing.assert_close(got[:-1], want, rtol=1e-4, atol=2e-4)
    assert torch.equal(got[:-1].argmax(-1), want.argmax(-1))
