"""Compile the Triton kernels (attention, with bf16/fp16 and fp8 caches; GEMV and fused, with and without PDL)
for an NVIDIA target with no GPU present (Triton's bundled LLVM and ptxas), so a CPU machine catches what only
the real compiler rejects. Run without TRITON_INTERPRET.

    PYTHONPATH=. python scripts/compile_kernels.py [--arch 90] [--full]
"""
from __future__ import annotations

import argparse
import itertools
import os

import triton
from triton.backends.compiler import GPUTarget

from hexgen.kernels import fp8_quant_kernels, fused_kernels, gemv_kernels, paged_decode
from hexgen.kernels import paged_decode_kernels as kern


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _compile(fn, sig: dict[str, str], cons: dict, target: GPUTarget, **options):
    sig = {**sig, **{k: "constexpr" for k in cons}}
    return triton.compile(triton.compiler.ASTSource(fn, sig, constexprs=cons), target=target, options=options)


def _cache(dtype: str, fp8: bool) -> tuple[str, str]:
    """(cache pointer type, scale pointer type): e4m3 caches with float32 scales, or the model dtype."""
    return ("*fp8e4nv", "*fp32") if fp8 else (f"*{dtype}", "*i64")


def decode(dtype: str, group: int, d: int, splits: int, target: GPUTarget, pdl: bool = False, fp8: bool = False):
    ptr, mid = f"*{dtype}", "*fp32" if splits > 1 else f"*{dtype}"
    cache, scale = _cache(dtype, fp8)
    sig = {"Q": ptr, "K": cache, "V": cache, "KScale": scale, "VScale": scale, "Tables": "*i64", "Ctx": "*i64",
           "Out": mid, "Lse": mid, "qk_scale": "fp32", "num_splits": "i32"}
    sig.update({a: "i32" for a in ("stride_qb", "stride_qh", "stride_ks", "stride_kh", "stride_vs", "stride_vh",
                                   "stride_tb", "stride_ob", "stride_oh", "stride_os", "stride_lb", "stride_lh")})
    cons = dict(GROUP=group, BLOCK_G=_pow2(group), HEAD_DIM=d, BLOCK_D=_pow2(d), BS=16,
                BLOCK_N=64, SPLIT=splits > 1, IEEE=dtype == "fp32", DOT_F32=False, HEAD_MAJOR=True, FP8=fp8,
                FP8_F16=fp8 and dtype == "bf16", PDL=pdl)
    _compile(kern.decode_stage1, sig, cons, target, num_warps=2, num_stages=2, launch_pdl=pdl)
    if splits > 1:
        sig = {"Mid": "*fp32", "Lse": "*fp32", "Out": f"*{dtype}", "num_splits": "i32"}
        sig.update({a: "i32" for a in ("stride_mb", "stride_mh", "stride_ms", "stride_lb", "stride_lh",
                                       "stride_ob", "stride_oh")})
        cons = dict(HEAD_DIM=d, BLOCK_D=_pow2(d), BLOCK_S=max(64, 1 << (splits - 1).bit_length()), PDL=pdl)
        _compile(kern.decode_stage2, sig, cons, target, num_warps=4, launch_pdl=pdl)


def batch1(dtype: str, target: GPUTarget, pdl: bool) -> None:
    """The batch-1 GEMVs and the fused elementwise kernels, as a decode step launches them."""
    ptr = f"*{dtype}"
    # model-dtype weights; fp8 weights with row scales, converted or decoded from their bytes (viewed as int8)
    for w, scaled, bits in ((ptr, False, False), ("*fp8e4nv", True, False), ("*i8", True, True)):
        sig = {"X": ptr, "W": w, "Y": ptr, "S": "*fp32", "N": "i32", "K": "i32", "stride_wn": "i32"}
        for silu, ahead in itertools.product((False, True), (False, True)):
            cons = dict(BLOCK_N=4, BLOCK_K=512, SILU=silu, AHEAD=ahead, PDL=pdl, HAS_SCALE=scaled, FP8_BITS=bits)
            _compile(gemv_kernels.gemv, sig, cons, target, num_warps=4, launch_pdl=pdl)
    sig = {"X": ptr, "Res": ptr, "W": ptr, "Out": ptr, "ResOut": ptr, "eps": "fp32", "n_cols": "i32"}
    sig.update({a: "i32" for a in ("stride_x", "stride_r", "stride_o", "stride_ro")})
    _compile(fused_kernels.add_rms_norm, sig, dict(HAS_RES=True, BLOCK=4096, PDL=pdl), target, num_warps=8,
             launch_pdl=pdl)
    for fp8 in (False, True):
        cache, scale = _cache(dtype, fp8)
        sig = {"QKV": ptr, "Cos": ptr, "Sin": ptr, "Slots": "*i64", "QOut": ptr, "KCache": cache, "VCache": cache,
               "KScale": scale, "VScale": scale}
        sig.update({a: "i32" for a in ("stride_t", "stride_c", "stride_qt", "stride_qh", "stride_ks", "stride_kh",
                                       "stride_vs", "stride_vh")})
        _compile(fused_kernels.rotary_kv_write, sig, dict(N_Q=32, N_KV=32, HALF=64, BLOCK_H=64, FP8=fp8, PDL=pdl),
                 target, num_warps=1, launch_pdl=pdl)
    sig = {"X": ptr, "Out": ptr, "n_cols": "i32", "stride_x": "i32", "stride_o": "i32"}
    _compile(fused_kernels.silu_mul, sig, dict(BLOCK=1024, PDL=pdl), target, num_warps=4, launch_pdl=pdl)


def fp8_quantize(dtype: str, target: GPUTarget) -> None:
    """The per-token activation quantization of the FP8 GEMMs: one pass (with and without SiLU) and two."""
    sig = {"X": f"*{dtype}", "Q": "*fp8e4nv", "S": "*fp32", "K": "i32", "stride_x": "i32", "stride_q": "i32"}
    limits = dict(FP8_MAX=448.0, MIN_SCALE=1e-12)
    for silu in (False, True):
        _compile(fp8_quant_kernels.quantize_rows_once, sig, dict(limits, BLOCK=16384, SILU=silu), target,
                 num_warps=16)
    _compile(fp8_quant_kernels.quantize_rows, sig, dict(limits, BLOCK=4096), target, num_warps=4)


def prefill(dtype: str, group: int, d: int, target: GPUTarget, fp8: bool = False):
    ptr = f"*{dtype}"
    cache, scale = _cache(dtype, fp8)
    sig = {"Q": ptr, "K": cache, "V": cache, "KScale": scale, "VScale": scale, "Out": ptr, "Tables": "*i64",
           "SeqQStart": "*i64", "SeqQLen": "*i64", "SeqCtx": "*i64", "TileSeq": "*i64", "TileM": "*i64",
           "qk_scale": "fp32"}
    sig.update({a: "i32" for a in ("stride_qt", "stride_qh", "stride_ks", "stride_kh", "stride_vs", "stride_vh",
                                   "stride_tb", "stride_ot", "stride_oh")})
    cons = dict(GROUP=group, HEAD_DIM=d, BLOCK_D=_pow2(d), BS=16, BLOCK_M=paged_decode.PREFILL_BLOCK_M,
                BLOCK_N=64, IEEE=dtype == "fp32", DOT_F32=False, FP8=fp8)
    _compile(kern.prefill_fwd, sig, cons, target, num_warps=4, num_stages=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--full", action="store_true", help="every dtype, group and head dim (slow)")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter compiles nothing")
    target = GPUTarget("cuda", args.arch, 32)
    if args.full:
        cases = list(itertools.product(["bf16", "fp16", "fp32"], [1, 4, 8], [8, 64, 80, 128]))
    else:
        cases = [("bf16", 1, 128), ("fp32", 4, 8)]
    for dtype, group, d in cases:
        for splits in (1, 9):
            decode(dtype, group, d, splits, target)
            decode(dtype, group, d, splits, target, pdl=True)
        prefill(dtype, group, d, target)
        if dtype != "fp32":  # an fp8 KV cache beside bf16/fp16 activations
            for splits in (1, 9):
                decode(dtype, group, d, splits, target, fp8=True)
            prefill(dtype, group, d, target, fp8=True)
        print(f"sm_{args.arch} {dtype} group {group} head_dim {d}: ok"
              + (" (and with an fp8 cache)" if dtype != "fp32" else ""), flush=True)
    for dtype in ("bf16", "fp16"):
        for pdl in (False, True):
            batch1(dtype, target, pdl)
        fp8_quantize(dtype, target)
        print(f"sm_{args.arch} {dtype} GEMV, fused and FP8 quantization kernels, with and without PDL: ok", flush=True)


if __name__ == "__main__":
    main()
