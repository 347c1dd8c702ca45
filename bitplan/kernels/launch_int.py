"""Launcher of the fast integer path (2/4/8-bit codes, fp16/bf16 activations): the whole-word
GEMV and tensor-core GEMM of :mod:`bitplan.kernels.triton_int`, their in-launch split-K, and the
whole-weight dequantization that large prefills may use instead (``PREFILL_DEQUANT_MIN_M``)."""

from __future__ import annotations

import math

import torch

from bitplan.kernels import configs
from bitplan.kernels.configs import choose_split_k, interpreting


def dequantize_int(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, group_size: int,
                   in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``[N, K]`` weight in ``dtype`` (fp16/bf16) of 2/4/8-bit pack-quantized tensors, on the GPU
    (``int_dequant_kernel``: the fast path's decoding, float32 arithmetic, one rounding)."""
    from bitplan.kernels import triton_int as tk

    n, words = weight.shape
    per = 32 // bits
    block_n, block_w = 64, max(1, 128 // per)
    out = torch.empty(n, in_features, device=weight.device, dtype=dtype)
    grid = (math.ceil(n / block_n), math.ceil(words / block_w))
    tk.int_dequant_kernel[grid](weight, scale, zero if zero is not None else scale, out, n, in_features, words,
                                0x3F800000, weight.stride(0), scale.stride(0), zero.stride(0) if zero is not None else 0,
                                out.stride(0), BITS=bits, GROUP=group_size, HAS_ZERO=zero is not None,
                                BLOCK_N=block_n, BLOCK_W=block_w, num_warps=4)
    return out


_SPLIT_COUNTERS: dict[tuple, torch.Tensor] = {}


def _split_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """Zeroed int32 arrival counters for split-K (one per output tile), one buffer per device.

    The last split of a tile to arrive resets its counter, so the buffer is zero again when a
    launch ends and needs no memset: launches that follow each other (one stream, or a CUDA graph
    captured from them) share it. Two split-K launches running at the same time on different
    streams of one device would share counters too: serialize them. During a CUDA graph capture a
    buffer too small is not replaced: a fresh zeroed one becomes part of the graph.
    """
    if device.type != "cuda":
        return torch.zeros(tiles, dtype=torch.int32, device=device)
    key = device.index if device.index is not None else torch.cuda.current_device()
    counters = _SPLIT_COUNTERS.get(key)
    if counters is None or counters.numel() < tiles:
        if torch.cuda.is_current_stream_capturing():
            return torch.zeros(tiles, dtype=torch.int32, device=device)
        counters = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
        _SPLIT_COUNTERS[key] = counters
    return counters


def _even_split(words: int, block_w: int, split: int) -> tuple[int, int]:
    """(split, words per split): a whole number of steps per split, preferring splits that cover
    the words exactly (then the kernel runs without masks on K)."""
    steps = math.ceil(words / block_w)
    split = max(1, min(split, steps))
    for s in range(split, 0, -1):
        if steps % s == 0 and (split < 4 or s * 2 > split):
            return s, steps // s * block_w
    return split, math.ceil(steps / split) * block_w


def launch_fast_int(x2d, weight, scale, zero, bias, result, bits, group_size, cfg) -> None:
    """``int_gemv_kernel`` (GEMV config, ``block_m == 1``) or ``int_gemm_kernel``; split-K for M <= 16."""
    from bitplan.kernels import triton_int as tk

    m, k = x2d.shape
    n = result.shape[1]
    per = 32 // bits
    words = weight.shape[1]
    if configs.PREFILL_DEQUANT_MIN_M and m >= configs.PREFILL_DEQUANT_MIN_M and cfg.block_m > 16:
        dense = dequantize_int(weight, scale, zero, bits, group_size, k, x2d.dtype)
        torch.matmul(x2d, dense.t(), out=result)
        if bias is not None:
            result += bias
        return
    gemv = cfg.block_m == 1
    block_w = max(1 if gemv else 16 // per, cfg.block_k // per)  # tl.dot needs K >= 16
    block_n = cfg.block_n
    if gemv and group_size and group_size < block_w * per:  # one group per step, more rows instead
        block_n = min(1024, block_n * (block_w * per // group_size))
        block_w = group_size // per
    elif group_size and group_size < block_w * per:  # one group per step: shorter steps
        block_w = max(16 // per, group_size // per)
    tiles = math.ceil(n / block_n) * (m if gemv else math.ceil(m / cfg.block_m))
    steps = math.ceil(words / block_w)
    per_sm = configs.FAST_SPLIT_PER_SM["gemv" if gemv else "small"]
    split = cfg.split_k or (choose_split_k(tiles, steps, x2d.device, per_sm=per_sm) if m <= 16 else 1)
    split, w_per_split = _even_split(words, block_w, split)
    even_k = k == words * per and words % w_per_split == 0
    even_n = n % block_n == 0
    dummy = scale
    if split > 1:
        ws = torch.empty(split, m, n, device=x2d.device, dtype=torch.float32)
        locks = _split_counters(x2d.device, tiles)
    else:
        ws, locks = dummy, dummy
    args = (x2d, weight, scale, zero if zero is not None else dummy, bias if bias is not None else dummy, result,
            ws, locks)
    strides = (x2d.stride(0), weight.stride(0), scale.stride(0), zero.stride(0) if zero is not None else 0,
               result.stride(0))
    meta = dict(BITS=bits, GROUP=group_size, HAS_ZERO=zero is not None, HAS_BIAS=bias is not None, SPLIT_K=split,
                EVEN_N=even_n, EVEN_K=even_k, BLOCK_N=block_n, BLOCK_W=block_w, num_warps=cfg.num_warps)
    if gemv:  # 0x3F800000: float32 1.0, a run-time value on purpose (see triton_int)
        grid = (math.ceil(n / block_n), split, m)
        tk.int_gemv_kernel[grid](*args, n, k, words, w_per_split, 0x3F800000, *strides, PREFETCH=cfg.num_stages > 1,
                                 NIBBLES_IN_PLACE=configs.GEMV_NIBBLES_IN_PLACE, num_stages=1, **meta)
    else:
        grid = (math.ceil(m / cfg.block_m) * math.ceil(n / block_n), split)
        tk.int_gemm_kernel[grid](*args, m, n, k, words, w_per_split, 0x3F800000, *strides, DOT_FP32=interpreting(),
                                 SWAP_AB=cfg.swap_ab, BLOCK_M=cfg.block_m, GROUP_M=8, num_stages=cfg.num_stages,
                                 **meta)


