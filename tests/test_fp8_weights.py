"""FP8 weights: the compressed-tensors loader, load-time quantization (``quantization = "fp8"``), the
dequantizing CPU path of ``hexgen.kernels.fp8_linear`` and the engine across layouts against the Hugging Face
model on the dequantized weights. The FP8 tensor-core path (``torch._scaled_mm``) is covered by the gpu tests."""
from __future__ import annotations

import json
import os

import pytest
import torch

from hexgen.config import EngineConfig, Layout, ModelConfig, preset
from hexgen.engine.offline import run_offline
from hexgen.engine.runner import ModelSpec
from hexgen.errors import ConfigError, LoadError
from hexgen.kernels import fp8_linear
from hexgen.kernels.fp8_linear import FP8
from hexgen.model.loader import build_stage, init_random, load_stage
from hexgen.parallel.groups import TPContext
from hexgen.quantization import checkpoint_format
from tests.fp8_models import dequantized_copy, quantization_config, save_fp8_llama
from tests.models import (
    LENGTHS,
    N_NEW,
    check_against_hf,
    greedy_requests,
    hf_greedy,
    llama_config,
    make_prompts,
    save_llama,
)

from tests.test_paged_decode import KERNEL_DEVICE, requires_triton

BUDGET = 32


def test_quantize_rows_round_trip_and_scale_rows():
    w = torch.randn(48, 64) * torch.linspace(0.01, 3.0, 48)[:, None]
    q, s = fp8_linear.quantize_rows(w)
    assert q.dtype == FP8 and s.shape == (48,)
    assert torch.equal(s, w.abs().amax(dim=1) / 448.0)
    err = (fp8_linear.dequantize(q, s, torch.float32) - w).abs()
    assert (err <= w.abs() * 2**-4 + s[:, None] * 2**-9).all()  # e4m3: 3 mantissa bits, subnormals below 2^-6
    assert torch.equal(fp8_linear.scale_rows(torch.tensor([0.5]), 3, 7), torch.full((4,), 0.5))
    per_channel = torch.arange(10.0).reshape(10, 1)
    assert torch.equal(fp8_linear.scale_rows(per_channel, 2, 5), torch.tensor([2.0, 3.0, 4.0]))
    with pytest.raises(LoadError, match="weight_scale: 10 rows"):
        fp8_linear.scale_rows(per_channel, 8, 12)


def test_cpu_linear_is_the_dequantized_weight():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 64, generator=g), torch.randn(32, 64, generator=g)
    q, s = fp8_linear.quantize_rows(w)
    want = x @ fp8_linear.dequantize(q, s, torch.float32).t()
    torch.testing.assert_close(fp8_linear.linear(x, q, s), want, atol=1e-5, rtol=1e-5)
    gu = torch.randn(3, 128, generator=g)
    from hexgen.kernels.fused import silu_mul

    torch.testing.assert_close(fp8_linear.linear(gu, q, s, silu=True), fp8_linear.linear(silu_mul(gu), q, s))
    # the tensor-core path's math, emulated: per-token e4m3 activations within e4m3 rounding of the exact product
    ref = fp8_linear.reference(x, q, s)
    assert ((ref - want).abs() <= 0.1 * want.abs().max()).all()


def test_checkpoint_format_is_validated():
    assert checkpoint_format(None) == "none"
    assert checkpoint_format(quantization_config("channel")) == "fp8"
    assert checkpoint_format(quantization_config("tensor", dynamic=False)) == "fp8"
    with pytest.raises(ConfigError, match="quant_method: 'gptq' is not supported"):
        checkpoint_format({"quant_method": "gptq"})
    bad = quantization_config()
    bad["config_groups"]["group_0"]["weights"]["strategy"] = "group"
    with pytest.raises(ConfigError, match=r"group_0\.weights\.strategy: 'group' is not supported"):
        checkpoint_format(bad)
    bad["config_groups"]["group_0"]["weights"].update(strategy="channel", type="int", num_bits=4)
    with pytest.raises(ConfigError, match="type 'int' with num_bits 4 is not supported"):
        checkpoint_format(bad)
    with pytest.raises(ConfigError, match="quantization: 'int8' must be one of auto, fp8"):
        EngineConfig(quantization="int8")
    with pytest.raises(ConfigError, match="model config quantization"):
        ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1, num_kv_heads=1,
                    quantization="int4")


@pytest.fixture(scope="module")
def fp8_channel(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fp8_channel"))
    return path, save_fp8_llama(path, llama_config(intermediate_size=96), seed=5, strategy="channel")


@pytest.fixture(scope="module")
def fp8_tensor(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fp8_tensor"))
    return path, save_fp8_llama(path, llama_config(), seed=6, strategy="tensor", dynamic=False)


class _NoReduce(TPContext):
    """A TP rank outside any process group: the loader test looks at the shards, not the sums."""

    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.size = rank, size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.mark.parametrize("tp_size", [1, 2])
def test_fp8_checkpoint_shards_weights_with_their_scales(fp8_channel, tp_size):
    """Column-parallel shards keep their rows' scales, row-parallel shards the whole scale vector; the
    LM head and the embedding stay in the model dtype."""
    path, hf = fp8_channel
    cfg = ModelConfig.from_dir(path)
    assert cfg.quantization == "fp8"
    layout = Layout.build(cfg, [tp_size])
    for rank in range(tp_size):
        stage = build_stage(cfg, layout.stages()[0], _NoReduce(rank, tp_size), torch.float32, torch.device("cpu"))
        read = load_stage(stage, path, progress=False)
        assert "model.layers.0.self_attn.q_proj.weight_scale" in read
        assert stage.lm_head.weight.dtype == torch.float32 and stage.embed.weight.dtype == torch.float32
        layer, ref = stage.layers[1], hf.model.layers[1]
        up = layer.mlp.gate_up
        assert up.weight.dtype == FP8 and up.weight_scale.shape == (up.weight.shape[0],)
        start, local = up.sections[1][2], up.sections[1][1]
        got = fp8_linear.dequantize(up.weight, up.weight_scale, torch.float32)[local:]  # the up section
        assert torch.equal(got, ref.mlp.up_proj.weight[start : start + local])
        down = layer.mlp.down
        cols = slice(down.in_start, down.in_start + down.weight.shape[1])
        got = fp8_linear.dequantize(down.weight, down.weight_scale, torch.float32)
        assert torch.equal(got, ref.mlp.down_proj.weight[:, cols])


def test_a_float8_weight_without_its_scale_is_named(tmp_path, fp8_channel):
    import shutil

    from safetensors.torch import load_file, save_file

    path, _ = fp8_channel
    broken = str(tmp_path / "broken")
    shutil.copytree(path, broken)
    tensors = load_file(os.path.join(broken, "model.safetensors"))
    del tensors["model.layers.2.mlp.down_proj.weight_scale"]
    save_file(tensors, os.path.join(broken, "model.safetensors"))
    cfg = ModelConfig.from_dir(broken)
    stage = build_stage(cfg, Layout.build(cfg, [1]).stages()[0], _NoReduce(0, 1), torch.float32, torch.device("cpu"))
    with pytest.raises(LoadError, match="float8 but it has no weight_scale"):
        load_stage(stage, broken, progress=False)


def test_random_weights_are_quantized_per_row():
    cfg = preset("tiny")
    cfg = ModelConfig(**{**cfg.__dict__, "quantization": "fp8"})
    stage = build_stage(cfg, Layout.build(cfg, [1]).stages()[0], _NoReduce(0, 1), torch.bfloat16, torch.device("cpu"))
    init_random(stage, seed=3, tp_rank=0)
    qkv = stage.layers[0].attn.qkv_proj
    assert qkv.weight.dtype == FP8 and torch.isfinite(qkv.weight_scale).all()
    w = fp8_linear.dequantize(qkv.weight, qkv.weight_scale, torch.float32)
    assert 0.015 < w.std().item() < 0.025  # N(0, 0.02) drawn, then quantized


def _run(model_dir, requests, hetero, part, **engine_kw):
    layout = Layout.build(ModelConfig.from_dir(model_dir), hetero, part)
    engine = EngineConfig(**{"collect_logits": True, "cpu_kv_tokens": 2048, "max_num_batched_tokens": BUDGET,
                             **engine_kw})
    return run_offline(layout, ModelSpec(model_dir=model_dir), engine, requests)


def _requests(hf):
    requests = greedy_requests(make_prompts(hf.config.vocab_size, LENGTHS, seed=1), N_NEW)
    return requests, {r.request_id: hf_greedy(hf, r.prompt_ids, N_NEW) for r in requests}


@pytest.mark.slow
@pytest.mark.parametrize(("fixture", "hetero", "part"), [
    ("fp8_tensor", (1,), (4,)),  # per-tensor weight scales, static input scales in the checkpoint
    ("fp8_channel", (2,), (4,)),  # TP 2: per-channel scales sharded with the QKV / gate-up rows
    ("fp8_channel", (2, 1), (3, 1)),  # two stages, uneven
], ids=["tensor-1", "channel-2", "channel-2.1"])
def test_fp8_checkpoint_matches_the_dequantized_hugging_face_model(request, fixture, hetero, part):
    path, hf = request.getfixturevalue(fixture)
    requests, reference = _requests(hf)
    results = _run(path, requests, hetero, part)
    check_against_hf(results, requests, hf, reference)


@pytest.mark.slow
def test_load_time_quantization_matches_the_dequantized_model(tmp_path):
    """``quantization="fp8"`` on a bf16-free float32 checkpoint: per-row e4m3 weights, as the reference."""
    from tests.models import load_hf

    path = save_llama(str(tmp_path / "f32"), llama_config(), seed=7)
    ref = dequantized_copy(load_hf(path))
    requests, reference = _requests(ref)
    results = _run(path, requests, (1,), (4,), quantization="fp8")
    check_against_hf(results, requests, ref, reference)


def test_quantization_flag_reaches_the_engine_and_plan():
    from hexgen.cli import bench as bench_cli
    from hexgen.cli.generate import resolve_engine

    args = bench_cli._parser().parse_args(["throughput", "--preset", "tiny", "--random-weights",
                                           "--quantization", "fp8", "--device", "cpu"])
    assert resolve_engine(args, Layout.build(preset("tiny"), None)).quantization == "fp8"
    with pytest.raises(SystemExit):
        bench_cli._parser().parse_args(["throughput", "--quantization", "int4"])


def test_config_json_without_quantization_is_unquantized(tmp_path):
    d = {"model_type": "llama", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 8,
         "num_hidden_layers": 1, "num_attention_heads": 2}
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert ModelConfig.from_dir(str(tmp_path)).quantization == "none"


# --- the planner --------------------------------------------------------------------------------------------

def test_cost_model_counts_one_byte_per_linear_weight():
    from dataclasses import replace

    from hexgen.planner.costmodel import CostModel

    cfg = preset("llama-3.1-70b")
    bf16, fp8 = CostModel(cfg), CostModel(replace(cfg, quantization="fp8"))
    for tp in (1, 2, 8):
        params = bf16.layer_params(tp)
        assert bf16.layer_weight_bytes(tp) == 2 * params
        # linears at 1 byte, norms at 2, a 4-byte scale per output row: a little over half
        assert params < fp8.layer_weight_bytes(tp) < 0.51 * bf16.layer_weight_bytes(tp)
    assert fp8.first_extra_bytes() == bf16.first_extra_bytes()  # the embedding and LM head stay bf16


@pytest.mark.parametrize("cluster", ["h200x1", "h100x2"])
def test_plan_places_llama_70b_fp8_on_one_h200_or_two_h100s(cluster, capsys):
    from hexgen.cli.plan import main

    argv = ["--preset", "llama-3.1-70b", "--random-weights", "--cluster", f"config/clusters/{cluster}.toml",
            "--time-budget", "2", "--json"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main([*argv, "--quantization", "fp8"]) == 0
        plan = json.loads(capsys.readouterr().out)["plan"]
        assert plan["replicas"], plan
        gpus = sum(len(s["devices"]) for r in plan["replicas"] for s in r["stages"])
        assert gpus <= {"h200x1": 1, "h100x2": 2}[cluster]
        if cluster == "h200x1":  # 131 GiB of bf16 weights do not fit the one card
            assert main(argv) == 2
            assert "nothing fits" in capsys.readouterr().err
    finally:
        os.chdir(cwd)


def test_weight_accuracy_figures():
    from hexgen.bench.weight_accuracy import compare

    ref = [torch.tensor([2.0, 1.0, 0.0]), torch.tensor([0.0, 3.0, 1.0])]
    assert compare(ref, ref) == {"steps": 2, "top1_agreement": 1.0, "mean_kl_nats": 0.0, "max_kl_nats": 0.0}
    other = [torch.tensor([2.0, 1.0, 0.0]), torch.tensor([3.0, 0.0, 1.0])]
    res = compare(ref, other)
    p, q = torch.softmax(ref[1].double(), -1), torch.softmax(other[1].double(), -1)
    kl = float((p * (p / q).log()).sum())
    assert res["top1_agreement"] == 0.5 and res["max_kl_nats"] == round(kl, 6)
    assert res["mean_kl_nats"] == round(kl / 2, 6)


# --- CUDA: the FP8 tensor-core GEMM, CUDA graphs, the fp8 KV cache ------------------------------------------

def _fp8_card() -> bool:
    return torch.cuda.is_available() and fp8_linear.tensor_cores(torch.device("cuda", 0))


requires_fp8_card = pytest.mark.skipif(not _fp8_card(), reason="needs a CUDA card with FP8 tensor cores (sm_89+)")


@pytest.mark.gpu
@requires_fp8_card
@pytest.mark.parametrize("m", [1, 7, 64, 300])
def test_scaled_mm_is_the_per_token_fp8_product(m):
    dev = torch.device("cuda", 0)
    g = torch.Generator(device=dev).manual_seed(m)
    x = torch.randn(m, 512, device=dev, dtype=torch.bfloat16, generator=g)
    q, s = fp8_linear.quantize_rows(torch.randn(1024, 512, device=dev, generator=g) * 0.05)
    got = fp8_linear.linear(x, q, s).float()  # the FP8 GEMM
    want = fp8_linear.reference(x, q, s)
    scale = want.abs().max().item()
    # bf16 output rounding and accumulation order; one activation scale per call where row-wise is missing
    tol = 1e-2 if fp8_linear.gemm_mode(dev) == "rowwise" else 6e-2
    assert (got - want).abs().max().item() <= tol * scale
    layer = torch.nn.Module()
    layer.weight, layer.weight_scale = q, s
    fp8_linear.tune([layer])
    if m == 1 and layer.gemv is not None:  # the batch-1 GEMV on the fp8 weight: weight-only quantization
        exact = x.float() @ fp8_linear.dequantize(q, s, torch.float32).t()
        got = fp8_linear.linear(x, q, s, layer.gemv).float()
        assert (got - exact).abs().max().item() <= 1e-2 * exact.abs().max().item()


@pytest.mark.gpu
@requires_fp8_card
def test_fp8_gemv_bit_decode_equals_convert_on_the_gpu():
    """The compiled kernels: the integer decode gives the same bits as the conversion instructions (fp32
    subnormals kept by the multiply), and a tuned layer's configuration runs."""
    _check_fp8_gemv_decodes(torch.device("cuda", 0))
    from hexgen.kernels import gemv

    x, q, scale = _fp8_gemv_case(512, 4096, False, torch.device("cuda", 0), seed=3)
    layer = torch.nn.Module()
    layer.weight, layer.weight_scale = q, scale
    for decode in ("bits", "convert"):
        fp8_linear.tune([layer], decode=decode)
        assert layer.gemv is not None and gemv.DECODES[layer.gemv[4]] == decode
        got = fp8_linear.linear(x, q, scale, layer.gemv).float()
        deq = fp8_linear.dequantize(q, scale, torch.float32)  # [N, K]
        want, size = x.float() @ deq.t(), x.float().abs() @ deq.abs().t()  # [1, N] each
        assert ((got - want).abs() <= want.abs() * 2**-8 + 1e-5 * size).all()


@pytest.mark.gpu
@requires_fp8_card
def test_silu_fed_layers_are_tuned_as_they_run_on_the_gpu():
    """A layer fed gate | up (the fused MLP's down projection) is timed and checked through gemv_silu: its
    tuned configuration gives silu(gate) * up times the weight, fp8 and bf16."""
    import torch.nn.functional as F

    from hexgen.kernels import fused, gemv

    dev = torch.device("cuda", 0)
    x, q, scale = _fp8_gemv_case(512, 4096, True, dev, seed=5)  # x [1, 8192] gate | up
    xs = fused.silu_mul(x).float()  # [1, 4096] the kernels' roundings of silu(gate) * up
    layer = torch.nn.Module()
    layer.weight, layer.weight_scale, layer.silu_input = q, scale, True
    assert list(fp8_linear.tune([layer])) == [(512, 4096, True)] and layer.gemv is not None
    got = fp8_linear.linear(x, q, scale, layer.gemv, silu=True).float()  # [1, 512]
    deq = fp8_linear.dequantize(q, scale, torch.float32)  # [512, 4096]
    want, size = xs @ deq.t(), xs.abs() @ deq.abs().t()
    assert ((got - want).abs() <= want.abs() * 2**-7 + 1e-5 * size).all()
    plain = torch.nn.Module()
    plain.weight, plain.silu_input = (torch.randn(512, 4096, device=dev) * 0.02).to(torch.bfloat16), True
    assert list(gemv.tune([plain])) == [(512, 4096, True)] and plain.gemv is not None
    got = gemv.linear_silu(x, plain.weight, plain.gemv).float()
    want = F.linear(fused.silu_mul(x), plain.weight).float()
    assert torch.allclose(got, want, atol=2e-2 * want.abs().max().item(), rtol=2e-2)


@pytest.mark.gpu
@requires_fp8_card
@pytest.mark.parametrize("shape", [(1, 64), (7, 4096), (300, 14336), (2, 5000), (3, 20000)])
def test_per_token_quantization_kernel_matches_the_torch_ops(shape):
    """The Triton kernel against the PyTorch ops: the same scales; values one e4m3 step apart at most where
    the two divisions round differently (the interpreter's float8 casts are not the hardware's, so CUDA only)."""
    g = torch.Generator(device="cuda").manual_seed(shape[1])
    x = (torch.randn(*shape, device="cuda", generator=g) * 3).to(torch.bfloat16)
    x[0] = 0  # an all-zero row: the minimum scale, zeros out
    q1, s1 = fp8_linear.quantize_tokens(x, kernel=True)
    q2, s2 = fp8_linear.quantize_tokens(x, kernel=False)
    torch.testing.assert_close(s1, s2, atol=0, rtol=1e-6)
    a, b = q1.float(), q2.float()
    assert ((a - b).abs() <= b.abs() * 2**-3 + 2**-9).all()
    assert (a != b).float().mean().item() < 1e-3


@requires_triton
@pytest.mark.parametrize("m,k", [(3, 64), (5, 1000), (2, 14336), (2, 16400)])
def test_silu_inside_the_quantization_equals_silu_then_quantization(m, k):
    """The MLP's down projection input: SiLU(gate) * up computed inside the per-token quantization kernel
    gives the bits of ``fused.silu_mul`` followed by the quantization (rows past the one-pass limit take those
    two kernels). The interpreter without CUDA, compiled on a GPU."""
    from hexgen.kernels import fused

    g = torch.Generator().manual_seed(k)
    gu = (torch.randn(m, 2 * k, generator=g) * 3).to(torch.bfloat16).to(KERNEL_DEVICE)
    gu[0] = 0  # an all-zero row: the minimum scale, zeros out
    q1, s1 = fp8_linear.quantize_tokens(gu, kernel=True, silu=True)
    q2, s2 = fp8_linear.quantize_tokens(fused.silu_mul(gu), kernel=True)
    assert q1.shape == (m, k) and s1.shape == (m, 1)
    assert torch.equal(s1, s2)
    assert torch.equal(q1.view(torch.uint8), q2.view(torch.uint8))
    q3, s3 = fp8_linear.quantize_tokens(gu.cpu(), kernel=False, silu=True)  # the PyTorch ops, on the CPU
    torch.testing.assert_close(s1.cpu(), s3, atol=0, rtol=2e-2)


# --- the batch-1 GEMV's e4m3 decodes: bits (integer ops) against convert (float conversions) -----------------

_GEMV_SHAPES = [(37, 600), (5, 100), (64, 256)]  # ragged N and K over tiles; K inside the first tile; exact


def _fp8_gemv_case(n: int, k: int, silu: bool, device: torch.device, seed: int):
    """x [1, K] (or gate | up [1, 2K]) bf16, an e4m3 weight [N, K] holding every finite encoding (zeros, ±448,
    the subnormals 0x01..0x07 and 0x81..0x87, the rest random) and row scales over six decades."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.tensor([c for c in range(256) if c not in (0x7F, 0xFF)], dtype=torch.uint8)  # no NaNs
    q = codes[torch.randint(0, len(codes), (n, k), generator=g)]
    special = torch.tensor([0x00, 0x80, 0x7E, 0xFE, *range(0x01, 0x08), *range(0x81, 0x88)], dtype=torch.uint8)
    q.view(-1)[: min(n * k, 3 * len(special))] = special.repeat(3)[: n * k]
    q[n // 2] = 0  # an all-zero row
    scale = 10.0 ** (torch.rand(n, generator=g) * 6 - 4)  # [N] 1e-4 .. 1e2
    x = (torch.randn(1, 2 * k if silu else k, generator=g) * 2).to(torch.bfloat16)
    return x.to(device), q.view(FP8).to(device), scale.to(device)


def _check_fp8_gemv_decodes(device: torch.device) -> None:
    from hexgen.kernels import fused, gemv

    for (n, k), silu in [(shape, silu) for shape in _GEMV_SHAPES for silu in (False, True)]:
        x, q, scale = _fp8_gemv_case(n, k, silu, device, seed=n + k + silu)
        run = gemv.gemv_silu if silu else gemv.gemv
        for ahead in (0, 1):
            convert = run(x, q, (8, 128, 4, ahead, gemv.DECODE_CONVERT), scale)  # [1, N]
            bits = run(x, q, (8, 128, 4, ahead, gemv.DECODE_BITS), scale)
            assert torch.equal(bits, convert), f"[{n}, {k}] silu={silu} ahead={ahead}: the decodes differ"
        xs = fused.silu_mul(x) if silu else x  # [1, K] the kernel's roundings of silu(gate) * up
        deq = fp8_linear.dequantize(q, scale, torch.float32)  # [N, K]
        want, size = xs.float() @ deq.t(), xs.float().abs() @ deq.abs().t()  # [1, N] each
        err = (bits.float() - want).abs()
        # one bf16 rounding of the output (the interpreter rounds toward zero: up to a whole step), and fp32
        # summation order against the sizes of the terms
        assert (err <= want.abs() * 2**-7 + 1e-5 * size).all(), f"[{n}, {k}] silu={silu}: {err.max()}"
    with pytest.raises(ValueError, match="float8_e4m3fn weight"):
        gemv.gemv(x[:, :k], torch.zeros(n, k, dtype=torch.bfloat16, device=device), (8, 128, 4, 0, 1))


@requires_triton
def test_fp8_gemv_bit_decode_equals_convert_in_the_interpreter():
    """The Triton interpreter (no CUDA) or the GPU: the integer decode gives the conversions' bits."""
    _check_fp8_gemv_decodes(KERNEL_DEVICE)


def test_fp8_gemv_tune_candidates_and_decode_choice():
    from hexgen.config import KernelConfig
    from hexgen.kernels import gemv

    decodes = {c[4] for c in fp8_linear.CANDIDATES}
    assert decodes == set(gemv.DECODES)
    assert len(fp8_linear.CANDIDATES) == len(set(fp8_linear.CANDIDATES))
    assert KernelConfig.from_flags(["fp8-gemv=convert"]).fp8_gemv == "convert"
    with pytest.raises(ConfigError, match="kernels.fp8_gemv: 'fast' is not allowed; choose one of auto, bits"):
        KernelConfig(fp8_gemv="fast")
    with pytest.raises(ValueError, match="fp8 gemv decode: 'fast'"):
        fp8_linear.tune([], decode="fast")


def _engine_run(cuda_graphs: bool, kv: str = "auto", hetero=(1,)):
    model = ModelSpec(preset="tiny", random_weights=True)
    layout = Layout.build(preset("tiny"), list(hetero))
    requests = greedy_requests(make_prompts(preset("tiny").vocab_size, [5, 17, 40, 3], seed=2), 12)
    engine = EngineConfig(device="cuda", dtype="bfloat16", quantization="fp8", collect_logits=True,
                          cuda_graphs=cuda_graphs, kv_cache_dtype=kv)
    return run_offline(layout, model, engine, requests)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kv", ["auto", "fp8"])
def test_fp8_weights_in_cuda_graphs_match_eager(kv):
    """Random tiny-preset weights quantized at load: captured decode steps give the eager steps' logits
    (bf16: the first token's within 5e-2, as the other fast-path tests allow)."""
    eager, graphs = _engine_run(False, kv), _engine_run(True, kv)
    for rid, r in eager.items():
        diff = (r.logits[0] - graphs[rid].logits[0]).abs().max().item()
        assert diff < 5e-2, f"request {rid}: first-token logits differ by {diff}"


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_fp8_weights_at_tp2_match_tp1_first_tokens():
    one, two = _engine_run(False), _engine_run(False, hetero=(2,))
    for rid, r in one.items():
        diff = (r.logits[0] - two[rid].logits[0]).abs().max().item()
        assert diff < 0.1 * r.logits[0].abs().max().item(), f"request {rid}: TP 2 first-token logits off by {diff}"


def test_quantization_reaches_the_workers_and_deployment_files(tmp_path):
    from hexgen.bench.modes import BenchSetup
    from hexgen.bench.serve import worker_engine_flags, worker_engine_overrides
    from hexgen.cli.worker import build_parser, engine_overrides
    from hexgen.wire.settings import settings_from_dict

    setup = BenchSetup(ModelSpec(preset="tiny", random_weights=True), Layout.build(preset("tiny"), [1]),
                       EngineConfig(quantization="fp8"), "test")
    over = worker_engine_overrides(setup)
    assert over["quantization"] == "fp8"
    assert worker_engine_flags(over)[-2:] == ["--quantization", "fp8"]
    args = build_parser().parse_args(["--stage", "0", "--quantization", "fp8"])
    assert engine_overrides(args) == {"quantization": "fp8"}
    s = settings_from_dict({"model": {"name": "m", "preset": "tiny"}, "quantization": "fp8"})
    assert s.quantization == "fp8"
    with pytest.raises(ConfigError, match="quantization: 'int4' must be one of auto, fp8"):
        settings_from_dict({"model": {"name": "m", "preset": "tiny"}, "quantization": "int4"})


@pytest.mark.slow
def test_weight_accuracy_pairs_each_step_with_its_own_context(fp8_channel):
    """On an FP8 checkpoint both runs hold the same FP8 weights: the teacher-forced steps must reproduce the
    reference's distributions exactly (a prefix paired with the wrong step would show as KL > 0)."""
    from hexgen.bench.weight_accuracy import weight_accuracy

    path, hf = fp8_channel
    prompts = make_prompts(hf.config.vocab_size, [4, 9], seed=3)
    engine = EngineConfig(cpu_kv_tokens=2048, max_num_batched_tokens=BUDGET)
    res = weight_accuracy(Layout.build(ModelConfig.from_dir(path), [1]), ModelSpec(model_dir=path), engine,
                          prompts, new_tokens=5)
    assert res["steps"] == 10
    assert res["top1_agreement"] == 1.0 and res["max_kl_nats"] < 1e-9
