"""Launchers for the Triton kernels: documented fronts, launch configuration per architecture.

Weight formats (the tensors a :class:`~bitplan.kernels.qlinear.QuantLinear` owns):

- ``int`` (compressed-tensors ``pack-quantized``, see :mod:`bitplan.kernels.layout`):
  ``weight_packed`` int32 ``[N, ceil(K * bits / 32)]``, codes stored as ``q + 2**(bits-1)`` in a
  little-endian bit stream per row (2/4/8 bits never straddle words; 3/5/6 bits do, densely, as
  compressed-tensors writes them); ``weight_scale`` fp16/bf16/fp32 ``[N, groups]``;
  ``weight_zero_point`` (asymmetric only) int32 ``[ceil(N * bits / 32), groups]``, signed zero
  points packed the same way along dim 0. The weight is ``(q - z) * scale``.
- ``nf4``: ``weight_packed`` int32 ``[N, ceil(K / 8)]`` holding code book indices 0..15 packed
  exactly like 4-bit integer codes (index = signed code + 8); ``weight_scale`` ``[N, groups]``
  (the absmax of each group); ``codebook`` float32 ``[16]`` (default :data:`bitplan.kernels.numerics.NF4_CODE_BOOK`).
  The weight is ``codebook[index] * scale``.
- ``fp8``: ``weight_packed`` float8_e4m3fn ``[N, K]`` (compressed-tensors ``float-quantized``
  calls it ``weight``), ``K`` a multiple of 4 (read as int32 words and decoded in software, so it
  also runs on sm_80); ``weight_scale`` ``[N, groups]`` (per channel: ``[N, 1]``). The weight is
  ``float(w) * scale``.
- ``w8a8``: ``weight`` int8 ``[N, K]`` (codes in -127..127), ``weight_scale`` ``[N, 1]`` (or
  ``[N]``); activations are quantized per token to int8 by :func:`quantize_per_token`.

``groups = K / group_size`` (``group_size == 0``: one group per row); ``group_size`` must be a
multiple of the codes per packing unit (8 for 4-bit, 32 for 3/5/6-bit), which 32/64/128 are.

Dispatch by M (rows of activations): ``M == 1``: GEMV on CUDA cores, split over K when N gives
too few programs; ``M <= 16``: tensor-core GEMM with ``BLOCK_M = 16`` and split-K; larger M:
tiled GEMM dequantizing inside the K loop (on Hopper with swapped operands, ``W @ x.T``, so the
dequantized tile feeds wgmma from registers).

Two kernel families: integer codes of 2, 4 or 8 bits with fp16/bf16 activations (the common
case, :func:`uses_fast_path`) run ``int_gemv_kernel`` / ``int_gemm_kernel`` (whole-word tiles,
constant shifts, one FMA per weight for scale and zero point, unmasked full tiles; their split-K
writes float32 partial slices and the last split of each tile sums them in the same launch, see
``_split_counters``). Everything else (3/5/6 bits, NF4, FP8, float32 activations) runs the generic
kernels, whose split-K partial sums go through a float32 workspace with atomic adds, then one copy
into the output (the fast path's launcher is :mod:`bitplan.kernels.launch_int`; formats and configs:
:mod:`bitplan.kernels.configs`). Measured speeds: bench/results/kernels-h100-sxm.json. Every function here needs Triton; CPU callers without
``TRITON_INTERPRET=1`` use :mod:`bitplan.kernels.reference` instead (``QuantLinear`` does).
"""

from __future__ import annotations

import math

import torch

from bitplan.kernels import configs
from bitplan.kernels.configs import (
    _FORMAT_CODE,
    CANDIDATES,
    KernelConfig,
    WeightFormat,
    _check_activation,
    _output,
    autotune,
    check_weight,
    choose_split_k,
    codes_per_unit,
    default_config,
    interpreting,
    path_for,
    triton_next_pow2,
    uses_fast_path,
)
from bitplan.kernels.launch_int import dequantize_int, launch_fast_int
from bitplan.kernels.numerics import NF4_CODE_BOOK

__all__ = ["CANDIDATES", "KernelConfig", "WeightFormat", "autotune", "check_weight", "dequantize_int", "interpreting", "path_for",
           "quantize_per_token", "w8a8_linear", "weight_only_linear"]


def weight_only_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    *,
    fmt: WeightFormat,
    bits: int,
    group_size: int,
    out_features: int,
    bias: torch.Tensor | None = None,
    codebook: torch.Tensor | None = None,
    config: KernelConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` for a weight-only quantized ``W`` (formats: module docstring).

    x: fp16/bf16/fp32 ``[..., K]``; bias: ``[N]`` or None; codebook: float32 ``[16]`` (NF4 only);
    out: optional contiguous ``[M, N]`` in x's dtype (M = rows of x) to write into.
    Returns ``[..., N]`` in x's dtype.
    """
    fmt = WeightFormat(fmt)
    if fmt not in _FORMAT_CODE:
        raise ValueError(f"{fmt} is not a weight-only format: use w8a8_linear")
    in_features = x.shape[-1]
    _check_activation(x, in_features)
    check_weight(fmt, weight, scale, zero, bits, group_size, out_features, in_features)
    x2d = x.reshape(-1, in_features).contiguous()
    m = x2d.shape[0]
    fast = uses_fast_path(fmt, bits, x.dtype)
    cfg = config or default_config(m, x.device, fast)
    if fmt is WeightFormat.NF4 and codebook is None:
        codebook = torch.tensor(NF4_CODE_BOOK, dtype=torch.float32, device=x.device)
    result = _output(x2d, out_features, out)
    if m > 0:
        zero = None if zero is None else zero.contiguous()
        if fmt is WeightFormat.FP8:
            weight = weight.view(torch.int32)  # 4 E4M3 bytes per word, decoded in the kernel
        if fast and config is None and m > 16 and group_size and configs.PREFILL_SMALL_GROUPS_GENERIC \
                and group_size < cfg.block_k:
            fast, cfg = False, default_config(m, x.device)
        if fast:
            launch_fast_int(x2d, weight.contiguous(), scale.contiguous(), zero, bias, result, bits, group_size, cfg)
            return result.reshape(*x.shape[:-1], out_features)
        _launch_weight_only(x2d, weight.contiguous(), scale.contiguous(), zero, bias, codebook, result, fmt, bits,
                            group_size, cfg)
    return result.reshape(*x.shape[:-1], out_features)


def _launch_weight_only(x2d, weight, scale, zero, bias, codebook, result, fmt, bits, group_size, cfg) -> None:
    """Pick GEMV or GEMM, split K, launch, and fold a split-K workspace into ``result``."""
    from bitplan.kernels import triton_generic as tk

    m, k = x2d.shape
    n = result.shape[1]
    per = codes_per_unit(fmt, bits)
    block_u = max(1, cfg.block_k // per)
    units = math.ceil(k / per)
    k_blocks = math.ceil(units / block_u)
    gemv = cfg.block_m == 1
    tiles = math.ceil(n / cfg.block_n) * (m if gemv else math.ceil(m / cfg.block_m))
    split = cfg.split_k or (choose_split_k(tiles, k_blocks, x2d.device) if m <= 16 else 1)
    units_per_split = math.ceil(k_blocks / split) * block_u
    target = result if split == 1 else torch.zeros(m, n, device=x2d.device, dtype=torch.float32)
    dummy = scale
    args = (x2d, weight, scale, zero if zero is not None else dummy, codebook if codebook is not None else dummy,
            bias if bias is not None else dummy, target)
    if per > 4 and fmt is WeightFormat.INT and 32 % bits:  # 3/5/6 bits: gathered loads, no pipelining room
        cfg = KernelConfig(cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_warps, 1, cfg.split_k, cfg.swap_ab)
    meta = dict(FORMAT=_FORMAT_CODE[fmt], BITS=8 if fmt is WeightFormat.FP8 else bits, PER=per, GROUP=group_size,
                HAS_ZERO=zero is not None, HAS_BIAS=bias is not None, SPLIT_K=split,
                BLOCK_N=cfg.block_n, BLOCK_U=block_u, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    strides = (x2d.stride(0), weight.stride(0), scale.stride(0), zero.stride(0) if zero is not None else 0,
               target.stride(0))
    if gemv:
        grid = (math.ceil(n / cfg.block_n), split, m)
        per_row = group_size == 0 or group_size % (block_u * per) == 0
        tk.weight_only_gemv_kernel[grid](*args, n, k, units, units_per_split, *strides, SCALE_PER_ROW=per_row, **meta)
    else:
        grid = (math.ceil(m / cfg.block_m) * math.ceil(n / cfg.block_n), split)
        tk.weight_only_gemm_kernel[grid](*args, m, n, k, units, units_per_split, *strides, DOT_FP32=interpreting(),
                                         SWAP_AB=cfg.swap_ab, BLOCK_M=cfg.block_m, GROUP_M=8, **meta)
    if split > 1:
        result.copy_(target)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row. x: fp16/bf16/fp32 ``[M, K]`` -> (int8 ``[M, K]``, float32 ``[M]``).

    As vLLM's dynamic per-token quantization: ``scale = max|x| / 127`` (0 for an all-zero row),
    codes ``round_half_even(x * (127 / max|x|))``.
    """
    from bitplan.kernels import triton_generic as tk

    x2d = x.contiguous()
    m, k = x2d.shape
    xq = torch.empty(m, k, dtype=torch.int8, device=x.device)
    xs = torch.empty(m, dtype=torch.float32, device=x.device)
    if m > 0:
        block = min(triton_next_pow2(k), 256 if interpreting() else 2048)
        # No FMA contraction: x * inverse must round to float32 before the rounding add, as in torch.
        tk.quantize_per_token_kernel[(m,)](x2d, xq, xs, k, x2d.stride(0), xq.stride(0), BLOCK_K=block,
                                           num_warps=4 if block <= 1024 else 8, enable_fp_fusion=False)
    return xq, xs


def w8a8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: KernelConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """SmoothQuant-style W8A8: quantize x per token, int8 GEMM to int32, rescale.

    x: fp16/bf16/fp32 ``[..., K]``; weight: int8 ``[N, K]``; weight_scale: ``[N, 1]`` or ``[N]``
    (any float dtype); bias ``[N]`` or None. Returns ``[..., N]`` in x's dtype.
    """
    from bitplan.kernels import triton_generic as tk

    n, k = weight.shape
    _check_activation(x, k)
    if weight.dtype != torch.int8:
        raise ValueError(f"W8A8 weight must be int8 [N, K], got {weight.dtype}")
    if weight_scale.numel() != n:
        raise ValueError(f"W8A8 weight_scale must have one scale per output row ({n}), got {list(weight_scale.shape)}")
    x2d = x.reshape(-1, k)
    m = x2d.shape[0]
    result = _output(x2d, n, out)
    if m == 0:
        return result.reshape(*x.shape[:-1], n)
    xq, xs = quantize_per_token(x2d)
    cfg = config or default_config(max(m, 2), x.device)
    block_k = max(cfg.block_k, 32)
    k_blocks = math.ceil(k / block_k)
    tiles = math.ceil(m / cfg.block_m) * math.ceil(n / cfg.block_n)
    split = cfg.split_k or (choose_split_k(tiles, k_blocks, x.device) if m <= 16 else 1)
    target = result if split == 1 else torch.zeros(m, n, device=x.device, dtype=torch.float32)
    ws = weight_scale.reshape(n).to(torch.float32).contiguous()
    grid = (math.ceil(m / cfg.block_m) * math.ceil(n / cfg.block_n), split)
    tk.w8a8_gemm_kernel[grid](
        xq, xs, weight, ws, bias if bias is not None else ws, target, m, n, k, math.ceil(k_blocks / split) * block_k,
        xq.stride(0), weight.stride(0), target.stride(0), HAS_BIAS=bias is not None, SPLIT_K=split,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, GROUP_M=8,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split > 1:
        result.copy_(target)
    return result.reshape(*x.shape[:-1], n)
