"""The fused Triton kernels (hexgen/kernels/fused.py) against their PyTorch reference math.

Without CUDA they run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1); with CUDA
the compiled kernels run. bf16 cases check that the kernels round where the reference rounds.
"""
from __future__ import annotations

import pytest
import torch

from hexgen.kernels import fused
from hexgen.model import rope
from tests.test_paged_decode import KERNEL_DEVICE, requires_triton

pytestmark = requires_triton
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _randn(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(KERNEL_DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_res", [False, True])
def test_add_rms_norm(dtype, with_res):
    x, res = _randn(3, 96, dtype=dtype, seed=1), _randn(3, 96, dtype=dtype, seed=2)
    w = _randn(96, dtype=dtype, seed=3)
    r = res if with_res else None
    got, got_h = fused.add_rms_norm(x, r, w, 1e-5)
    want, want_h = fused.add_rms_norm_ref(x, r, w, 1e-5)
    torch.testing.assert_close(got_h, want_h, **TOL[dtype])  # the interpreter's bf16 rounding is not RNE
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_q,n_kv", [(4, 4), (4, 2)])
def test_rotary_kv_write(dtype, n_q, n_kv):
    t, d, slots_n = 3, 16, 10
    qkv = _randn(t, (n_q + 2 * n_kv) * d, dtype=dtype, seed=4)
    ang = _randn(t, 1, d // 2, dtype=torch.float32, seed=5)
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(dtype)  # [t, 1, d]
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(dtype)
    slots = torch.tensor([7, 2, 5], device=KERNEL_DEVICE)
    caches = [torch.full((slots_n, n_kv, d), -3.0, dtype=dtype, device=KERNEL_DEVICE) for _ in range(4)]
    got = fused.rotary_kv_write(qkv, cos, sin, slots, caches[0], caches[1], n_q, n_kv)
    want = rope.rotary_kv_write_ref(qkv, cos, sin, slots, caches[2], caches[3], n_q, n_kv)
    torch.testing.assert_close(got, want, **TOL[dtype])
    torch.testing.assert_close(caches[0], caches[2], **TOL[dtype])  # untouched slots stay -3 in both
    torch.testing.assert_close(caches[1], caches[3], atol=0, rtol=0)  # v: a plain copy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul(dtype):
    x = _randn(2, 2 * 1500, dtype=dtype, seed=6)  # more than one column block
    torch.testing.assert_close(fused.silu_mul(x), fused.silu_mul_ref(x), **TOL[dtype])


def test_fused_resolves_on_only_on_cuda():
    from hexgen.config import KernelConfig
    from hexgen.kernels.choice import resolve

    assert not resolve(KernelConfig(), torch.device("cpu")).fused
    if torch.cuda.is_available():
        assert resolve(KernelConfig(), torch.device("cuda")).fused
        assert not resolve(KernelConfig(fused=False), torch.device("cuda")).fused


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [600, 100])  # ragged K over several tiles; K inside the first (peeled) tile
def test_gemv_matches_linear(dtype, k):
    from hexgen.kernels import gemv

    x, w = _randn(1, k, dtype=dtype, seed=7), _randn(37, k, dtype=dtype, seed=8)  # ragged N
    got = gemv.gemv(x, w, (8, 128, 4, 0))
    want = torch.nn.functional.linear(x.float(), w.float()).to(dtype)
    torch.testing.assert_close(got, want, **TOL[dtype])
    # loading a tile ahead changes when the loads issue, not the order of the sums: the same bits
    assert torch.equal(gemv.gemv(x, w, (8, 128, 4, 1)), got)


def test_gemv_tune_is_off_without_cuda():
    from hexgen.kernels import gemv
    from hexgen.parallel.layers import ReplicatedLinear

    layer = ReplicatedLinear(8, 4)
    layer.gemv = (4, 512, 4, 0)
    assert gemv.tune([layer]) == {} and layer.gemv is None  # CPU: cuBLAS/ATen everywhere


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_silu_equals_gemv_of_silu_mul(dtype):
    """The down projection fed from gate | up: the same roundings as silu_mul then gemv, so the same result
    bit for bit with the same configuration, and close to the unfused reference math."""
    from hexgen.kernels import gemv

    gu, w = _randn(1, 2 * 600, dtype=dtype, seed=9), _randn(37, 600, dtype=dtype, seed=10)  # ragged N and K
    got = gemv.gemv_silu(gu, w, (8, 128, 4, 0))
    assert torch.equal(got, gemv.gemv(fused.silu_mul(gu), w, (8, 128, 4, 0)))
    assert torch.equal(gemv.gemv_silu(gu, w, (8, 128, 4, 1)), got)
    # bf16 against silu_mul's own output: Triton's interpreter rounds bf16 casts toward zero, a bias that
    # 600 summed terms would show against ATen's round-to-nearest (test_silu_mul covers the elementwise part).
    x = fused.silu_mul_ref(gu) if dtype == torch.float32 else fused.silu_mul(gu)
    want = torch.nn.functional.linear(x.float(), w.float()).to(dtype)
    torch.testing.assert_close(got, want, **TOL[dtype])
    with pytest.raises(ValueError, match="2 x 600"):
        gemv.gemv_silu(gu[:, :1000], w)


def test_pdl_is_off_on_cpu_and_outside_graphs():
    from hexgen.config import KernelConfig
    from hexgen.kernels import pdl
    from hexgen.kernels.choice import resolve

    assert pdl.launch(torch.zeros(1)) == {"PDL": False}
    with pdl.for_graphs():
        assert pdl.launch(torch.zeros(1)) == {"PDL": False}  # CPU (or the interpreter): never
    assert not resolve(KernelConfig(), torch.device("cpu")).pdl
    if torch.cuda.is_available():
        assert pdl.launch(torch.zeros(1, device="cuda")) == {"PDL": False}  # eager launches: plain
        with pdl.for_graphs(on=False):  # KernelConfig.pdl off
            assert pdl.launch(torch.zeros(1, device="cuda")) == {"PDL": False}
        assert not resolve(KernelConfig(pdl=False), torch.device("cuda")).pdl


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="PDL needs a CUDA GPU (compute capability 9.0+)")
def test_pdl_chain_in_a_graph_reads_what_the_kernel_before_wrote():
    """A captured chain of PDL-launched kernels, each reading what the one before it wrote (norm → GEMV → GEMV
    with SiLU, four times), replayed with new inputs: the same bits as the chain launched eagerly, without
    PDL. A kernel that read its input before ``gdc_wait`` would see a stale or half-written activation."""
    from hexgen.kernels import gemv, pdl

    with pdl.for_graphs():
        if not pdl.enabled(torch.zeros(1, device="cuda")):
            pytest.skip("PDL is off here (compute capability below 9.0, or no grid-dependency calls)")
    dt, hidden, inter = torch.bfloat16, 4096, 11008
    g = torch.Generator(device="cuda").manual_seed(0)
    w_up = torch.randn(2 * inter, hidden, device="cuda", dtype=dt, generator=g) * 0.02
    w_down = torch.randn(hidden, inter, device="cuda", dtype=dt, generator=g) * 0.02
    norm = torch.ones(hidden, device="cuda", dtype=dt)
    x = torch.zeros(1, hidden, device="cuda", dtype=dt)

    def chain() -> torch.Tensor:
        h = x
        for _ in range(4):
            n, h = fused.add_rms_norm(h, x, norm, 1e-5)
            h = gemv.gemv_silu(gemv.gemv(n, w_up, (4, 512, 4, 1)), w_down, (4, 512, 4, 0))
        return h

    with pdl.for_graphs():
        chain()  # compile the PDL variants before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain()
    for seed in (1, 2, 3):
        x.copy_(torch.randn(1, hidden, device="cuda", dtype=dt, generator=g))
        graph.replay()
        assert torch.equal(out, chain()), f"replay {seed}"
