"""CI compiles every Triton kernel for sm_80 and sm_90 without a GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs the whole NVIDIA
pipeline (TTIR, TTGIR, LLVM, PTX, and ptxas to a cubin), so a kernel that does not compile for
Ampere or Hopper fails here. The interpreter replaces ``@triton.jit`` functions, so compilation
runs in a child process with ``TRITON_INTERPRET=0``; run this file as a script to see the table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

WEIGHT_ONLY_ARGS = ["x_ptr", "w_ptr", "s_ptr", "z_ptr", "cb_ptr", "b_ptr", "out_ptr"]
STRIDES = ["stride_xm", "stride_wn", "stride_sn", "stride_zw", "stride_om"]

# (kernel: gemv, gemm or gemmT (swapped operands), activation dtype, weight pointer type, FORMAT, BITS, PER, GROUP, HAS_ZERO, SPLIT_K)
WEIGHT_ONLY_VARIANTS = [
    ("gemv", "fp16", "i32", 0, 4, 8, 128, False, 1),
    ("gemv", "bf16", "i32", 0, 4, 8, 128, True, 4),
    ("gemv", "fp16", "i32", 0, 3, 32, 64, True, 1),
    ("gemv", "fp16", "i32", 0, 2, 16, 32, False, 1),
    ("gemv", "fp16", "i32", 0, 8, 4, 0, True, 1),
    ("gemv", "bf16", "i32", 1, 4, 8, 64, False, 1),
    ("gemv", "fp16", "i32", 2, 8, 4, 0, False, 2),
    ("gemm", "fp16", "i32", 0, 4, 8, 128, False, 1),
    ("gemmT", "bf16", "i32", 0, 4, 8, 128, True, 1),
    ("gemmT", "fp16", "i32", 0, 4, 8, 128, False, 4),
    ("gemm", "fp16", "i32", 0, 5, 32, 32, True, 4),
    ("gemm", "bf16", "i32", 0, 6, 32, 0, False, 1),
    ("gemm", "fp16", "i32", 0, 8, 4, 64, True, 1),
    ("gemm", "fp16", "i32", 1, 4, 8, 64, False, 1),
    ("gemm", "bf16", "i32", 2, 8, 4, 128, False, 1),
]


def _aligned(signature: dict) -> dict:
    """Pointers and strides marked 16-divisible, as Triton specializes them at run time."""
    names = list(signature)
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names)
            if signature[name].startswith("*") or name.startswith("stride")
            or name in ("K", "units", "units_per_split", "words", "w_per_split")}


def _weight_only_job(variant):
    kind, act, wtype, fmt, bits, per, group, has_zero, split = variant
    out = "fp32" if split > 1 else act
    sig = dict(zip(WEIGHT_ONLY_ARGS, [f"*{act}", f"*{wtype}", f"*{act}", "*i32", "*fp32", f"*{act}", f"*{out}"]))
    sig.update({name: "i32" for name in (["N", "K"] if kind == "gemv" else ["M", "N", "K"])})
    sig.update({"units": "i32", "units_per_split": "i32"}, **{name: "i32" for name in STRIDES})
    const = dict(FORMAT=fmt, BITS=bits, PER=per, GROUP=group, HAS_ZERO=has_zero, HAS_BIAS=True, SPLIT_K=split)
    if kind == "gemv":
        const.update(SCALE_PER_ROW=group in (0, 128), BLOCK_N=64, BLOCK_U=max(1, 128 // per))
        return "weight_only_gemv_kernel", sig, const, {"num_warps": 4, "num_stages": 1}
    const.update(DOT_FP32=False, SWAP_AB=kind == "gemmT", BLOCK_M=16 if split > 1 else 64, BLOCK_N=128,
                 BLOCK_U=max(1, 64 // per), GROUP_M=8)
    return "weight_only_gemm_kernel", sig, const, {"num_warps": 8, "num_stages": 3}


# Fast integer path (2/4/8 bits): (kernel: gemv, gemm or gemmT, activation dtype, BITS, GROUP, HAS_ZERO,
# SPLIT_K, EVEN (N and K), BLOCK_M, BLOCK_N, BLOCK_W, num_warps, num_stages or PREFETCH)
FAST_VARIANTS = [
    ("gemv", "fp16", 4, 128, False, 1, True, 1, 256, 16, 4, 1),
    ("gemv", "bf16", 8, 0, True, 4, False, 1, 128, 32, 4, 2),
    ("gemmT", "fp16", 4, 128, False, 4, True, 16, 128, 16, 4, 3),
    ("gemm", "bf16", 8, 64, True, 1, False, 128, 128, 16, 8, 3),
]
FAST_ARGS = ["x_ptr", "w_ptr", "s_ptr", "z_ptr", "b_ptr", "out_ptr", "ws_ptr", "lock_ptr"]


def _fast_job(variant):
    kind, act, bits, group, has_zero, split, even, block_m, block_n, block_w, warps, stages = variant
    sig = dict(zip(FAST_ARGS, [f"*{act}", "*i32", f"*{act}", "*i32", f"*{act}", f"*{act}", "*fp32", "*i32"]))
    sig.update({name: "i32" for name in (["N", "K"] if kind == "gemv" else ["M", "N", "K"])})
    sig.update({"words": "i32", "w_per_split": "i32", "one": "i32"}, **{name: "i32" for name in STRIDES})
    const = dict(BITS=bits, GROUP=group, HAS_ZERO=has_zero, HAS_BIAS=True, SPLIT_K=split, EVEN_N=even,
                 EVEN_K=even, BLOCK_N=block_n, BLOCK_W=block_w)
    if kind == "gemv":
        return "int_gemv_kernel", sig, dict(const, PREFETCH=stages > 1, NIBBLES_IN_PLACE=bits == 4 and split == 1), \
            {"num_warps": warps, "num_stages": 1}
    const.update(DOT_FP32=False, SWAP_AB=kind == "gemmT", BLOCK_M=block_m, GROUP_M=8)
    return "int_gemm_kernel", sig, const, {"num_warps": warps, "num_stages": stages}


def _other_jobs():
    w8a8 = dict(xq_ptr="*i8", xs_ptr="*fp32", w_ptr="*i8", ws_ptr="*fp32", b_ptr="*fp16", out_ptr="*fp16",
                M="i32", N="i32", K="i32", k_per_split="i32", stride_xm="i32", stride_wn="i32", stride_om="i32")
    w8a8_const = dict(HAS_BIAS=True, SPLIT_K=1, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)
    quant = dict(x_ptr="*bf16", xq_ptr="*i8", xs_ptr="*fp32", K="i32", stride_xm="i32", stride_qm="i32")
    return [
        ("w8a8_gemm_kernel", w8a8, w8a8_const, {"num_warps": 4, "num_stages": 3}),
        ("w8a8_gemm_kernel", dict(w8a8, out_ptr="*fp32"), dict(w8a8_const, SPLIT_K=4, BLOCK_M=16, BLOCK_N=64),
         {"num_warps": 4, "num_stages": 3}),
        ("quantize_per_token_kernel", quant, {"BLOCK_K": 1024}, {"num_warps": 4}),
        ("int_dequant_kernel", dict(w_ptr="*i32", s_ptr="*bf16", z_ptr="*i32", out_ptr="*bf16", N="i32", K="i32",
                                    words="i32", one="i32", stride_wn="i32", stride_sn="i32", stride_zw="i32",
                                    stride_on="i32"),
         dict(BITS=4, GROUP=128, HAS_ZERO=True, BLOCK_N=64, BLOCK_W=16), {"num_warps": 4}),
    ]


def compile_all(arch: int) -> list[dict]:
    """Compile every job for ``sm_{arch}``; one record per job with its PTX size or its error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from bitplan.kernels import triton_generic, triton_int

    records = []
    jobs = [_weight_only_job(v) for v in WEIGHT_ONLY_VARIANTS] + [_fast_job(v) for v in FAST_VARIANTS] + _other_jobs()
    for name, sig, const, options in jobs:
        full = dict(sig, **{key: "constexpr" for key in const})
        start = time.perf_counter()
        record = {"kernel": name, "constexprs": const}
        try:
            src = ASTSource(fn=getattr(triton_generic, name, None) or getattr(triton_int, name), signature=full, constexprs=const, attrs=_aligned(full))
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
            record.update(ok=True, ptx_chars=len(compiled.asm["ptx"]), cubin_bytes=len(compiled.asm["cubin"]))
        except Exception as error:  # reported to the parent test, which fails on it
            record.update(ok=False, error=f"{type(error).__name__}: {error}"[:2000])
        record["seconds"] = round(time.perf_counter() - start, 2)
        records.append(record)
    return records


@pytest.mark.triton
@pytest.mark.parametrize("arch", [80, 90])
def test_every_kernel_compiles_for_cuda(arch, tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=path)
    done = subprocess.run([sys.executable, __file__, str(arch)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    records = json.loads(done.stdout.splitlines()[-1])
    assert len(records) == len(WEIGHT_ONLY_VARIANTS) + len(FAST_VARIANTS) + len(_other_jobs())
    failed = [r for r in records if not r["ok"]]
    assert not failed, json.dumps(failed, indent=1)[:6000]
    assert all(r["ptx_chars"] > 1000 and r["cubin_bytes"] > 1000 for r in records)


if __name__ == "__main__":
    print(json.dumps(compile_all(int(sys.argv[1]))))
