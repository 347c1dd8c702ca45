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
  (the absmax of each group); ``codebook`` float32 ``[16]`` (default :data:`NF4_CODEBOOK`).
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
into the output. Measured speeds: bench/results/kernels-h100-sxm.json. Every function here needs Triton; CPU callers without
``TRITON_INTERPRET=1`` use :mod:`bitplan.kernels.reference` instead (``QuantLinear`` does).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass
from enum import StrEnum

import torch

log = logging.getLogger(__name__)

NF4_CODEBOOK = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # QLoRA's NormalFloat-4 levels, index 0..15 (bitsandbytes' table)

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class WeightFormat(StrEnum):
    INT = "int"
    NF4 = "nf4"
    FP8 = "fp8"
    W8A8 = "w8a8"


_FORMAT_CODE = {WeightFormat.INT: 0, WeightFormat.NF4: 1, WeightFormat.FP8: 2}


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def codes_per_unit(fmt: WeightFormat, bits: int) -> int:
    """Codes in one packing unit: a word for 2/4/8 bits and FP8 (4 bytes), 32 codes for 3/5/6 bits."""
    if fmt is WeightFormat.FP8:
        return 4
    return 32 // bits if 32 % bits == 0 else 32


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters of one kernel call. ``block_k`` counts codes (inputs), not words."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int = 0  # 0: choose from the shape and the multiprocessor count
    swap_ab: bool = False  # GEMM as W @ x.T: dequantized weights become the register operand

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "KernelConfig":
        return cls(**data)


# Defaults per (architecture family, path). "sm90" = Hopper: the fastest of bench/kernels.py --sweep
# on an H100 SXM (W4 g128, Llama-3 8B/70B shapes). "sm80" = Ampere/Ada and other CUDA: not tuned on
# a device yet (no wgmma, so no swapped operands). "interpreter": large tiles, few programs.
_DEFAULTS = {
    ("sm90", "gemv"): KernelConfig(1, 256, 128, 4, 1),
    ("sm90", "small"): KernelConfig(16, 128, 128, 4, 2),
    ("sm90", "gemm"): KernelConfig(256, 128, 128, 8, 2, 1, swap_ab=True),
    ("sm80", "gemv"): KernelConfig(1, 64, 256, 4, 1),
    ("sm80", "small"): KernelConfig(16, 64, 256, 4, 3),
    ("sm80", "gemm"): KernelConfig(128, 128, 32, 4, 3),
    ("interpreter", "gemv"): KernelConfig(1, 64, 256, 4, 1),
    ("interpreter", "small"): KernelConfig(16, 64, 128, 4, 1),
    ("interpreter", "gemm"): KernelConfig(32, 64, 128, 4, 1),
}


# The fast integer path (2/4/8-bit codes, fp16/bf16 activations: ``int_gemv_kernel`` and
# ``int_gemm_kernel``) has its own defaults. "sm90": the fastest of bench/kernels.py --sweep on an
# H100 SXM (W4 g128 symmetric, Llama-3 shapes); "sm80": not measured on a device yet.
# ``num_stages`` > 1 on the GEMV path means: prefetch the next step's words into registers.
_FAST_DEFAULTS = {
    ("sm90", "gemv"): KernelConfig(1, 256, 128, 4, 1),
    ("sm90", "small"): KernelConfig(16, 64, 128, 4, 3, swap_ab=True),
    ("sm90", "gemm"): KernelConfig(256, 128, 64, 8, 4, 1, swap_ab=True),
    ("sm80", "gemv"): KernelConfig(1, 256, 128, 4, 1),
    ("sm80", "small"): KernelConfig(16, 64, 128, 4, 3),
    ("sm80", "gemm"): KernelConfig(128, 128, 64, 4, 3, 1),
    ("interpreter", "gemv"): KernelConfig(1, 64, 128, 4, 1),
    ("interpreter", "small"): KernelConfig(16, 64, 128, 4, 1),
    ("interpreter", "gemm"): KernelConfig(32, 64, 128, 4, 1),
}
FAST_BITS = (2, 4, 8)


# Candidates that ``autotune`` times per path (a subset of what bench/kernels.py --sweep tries).
CANDIDATES = {
    "gemv": [KernelConfig(1, bn, bk, w, 1) for bn, bk, w in ((256, 128, 4), (128, 128, 2), (128, 128, 4),
                                                              (64, 256, 4), (128, 64, 4))],
    "small": [KernelConfig(16, 64, 128, 4, 3, swap_ab=True), KernelConfig(16, 128, 128, 8, 3, swap_ab=True),
              KernelConfig(16, 128, 128, 4, 2), KernelConfig(16, 64, 128, 4, 4, swap_ab=True),
              KernelConfig(16, 64, 256, 4, 4, swap_ab=True), KernelConfig(1, 256, 128, 4, 1)],
    "gemm": [KernelConfig(256, 128, 64, 8, 4, 1, True), KernelConfig(256, 128, 128, 8, 2, 1, True),
             KernelConfig(128, 128, 64, 8, 3, 1), KernelConfig(128, 128, 32, 4, 3, 1)],
}


def autotune(run, candidates: list[KernelConfig], timer=None) -> tuple[KernelConfig, dict[KernelConfig, float]]:
    """The fastest of ``candidates`` for ``run(config)`` and every timing (ms; inf when a config fails).

    ``timer(fn) -> ms`` defaults to ``triton.testing.do_bench``'s median on CUDA. The emitter can
    store ``config.to_dict()`` per path in the checkpoint; ``QuantLinear(kernel_configs=...)`` reads it.
    """
    if timer is None:
        import triton.testing

        def timer(fn):
            return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))

    timings = {}
    for config in candidates:
        try:
            timings[config] = timer(lambda: run(config))
        except Exception as error:  # a candidate that does not fit this device (shared memory, registers)
            log.info("autotune: %s failed: %s", config, error)
            timings[config] = math.inf
    best = min(timings, key=timings.get)
    if math.isinf(timings[best]):
        raise ValueError("no launch configuration ran on this device")
    return best, timings


def path_for(m: int) -> str:
    """Kernel path for ``m`` activation rows: 'gemv' (1), 'small' (<= 16) or 'gemm'."""
    return "gemv" if m == 1 else "small" if m <= 16 else "gemm"


def arch_family(device: torch.device) -> str:
    """'interpreter', 'sm90' (compute capability 9.x and later) or 'sm80' (other CUDA)."""
    if interpreting() or device.type != "cuda":
        return "interpreter"
    major, _ = torch.cuda.get_device_capability(device)
    return "sm90" if major >= 9 else "sm80"


def default_config(m: int, device: torch.device, fast: bool = False) -> KernelConfig:
    """The default launch parameters for ``m`` rows on ``device``'s architecture (``fast``: the
    2/4/8-bit integer kernels, see :func:`uses_fast_path`)."""
    return (_FAST_DEFAULTS if fast else _DEFAULTS)[(arch_family(device), path_for(m))]


def uses_fast_path(fmt: WeightFormat | str, bits: int, dtype: torch.dtype) -> bool:
    """True when ``weight_only_linear`` runs ``int_gemv_kernel`` / ``int_gemm_kernel``: integer
    codes of 2, 4 or 8 bits (never straddling a word) and fp16/bf16 activations. Other formats
    and float32 activations run the generic kernels."""
    return WeightFormat(fmt) is WeightFormat.INT and bits in FAST_BITS and dtype in (torch.float16, torch.bfloat16)


def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda" and not interpreting():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


SPLIT_PROGRAMS_PER_SM = 2  # split-K aims at this many programs per multiprocessor (generic kernels)

# Tuning knobs of the fast integer path (module state, set per process; bench/kernels.py --sweep
# times alternatives). Split-K target programs per multiprocessor for the GEMV and the small-M GEMM;
# whether the 4-bit GEMV decodes nibbles in place (:func:`triton_kernels._nibble_in_place`, four
# shifts per word) or with one shift per code; from which M the prefill dequantizes the whole weight
# to fp16/bf16 and calls torch's matmul (cuBLAS) instead of the fused GEMM (0: never; the transient
# copy takes 2 bytes per weight).
FAST_SPLIT_PER_SM = {"gemv": 4, "small": 4}
GEMV_NIBBLES_IN_PLACE = False
PREFILL_DEQUANT_MIN_M = 0
# Groups shorter than the prefill config's BLOCK_K (e.g. g32 with BLOCK_K 64): the generic GEMM
# was faster on an H100 than the fast one with BLOCK_K clamped to the group (W4 g32, M = 2048:
# 814 vs 1167 us); the small-M path clamps (52 vs 56 us at M = 16; W2 g64: 40 vs 81 us).
PREFILL_SMALL_GROUPS_GENERIC = True


def choose_split_k(tiles: int, k_blocks: int, device: torch.device, min_blocks_per_split: int = 4,
                   per_sm: int | None = None) -> int:
    """Split K until about ``per_sm`` (default ``SPLIT_PROGRAMS_PER_SM``) programs per
    multiprocessor, keeping >= ``min_blocks_per_split`` K blocks each."""
    target = (per_sm or SPLIT_PROGRAMS_PER_SM) * _multiprocessors(device)
    if tiles >= target:
        return 1
    split = min(math.ceil(target / tiles), max(1, k_blocks // min_blocks_per_split))
    return max(1, 2 ** int(math.log2(split)))


def _check_activation(x: torch.Tensor, in_features: int) -> None:
    if x.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"activations must be fp16, bf16 or fp32, got {x.dtype}")
    if x.shape[-1] != in_features:
        raise ValueError(f"activations end in {x.shape[-1]} features, the weight expects {in_features}")


def check_weight(fmt: WeightFormat, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 bits: int, group_size: int, out_features: int, in_features: int) -> None:
    """Raise ValueError unless the tensors match the documented layout of ``fmt``."""
    per = codes_per_unit(fmt, bits)
    if group_size and (in_features % group_size or group_size % per):
        raise ValueError(f"group_size {group_size} must divide in_features {in_features} and be a multiple of {per}")
    groups = 1 if group_size == 0 else in_features // group_size
    if fmt is WeightFormat.FP8:
        if in_features % 4:
            raise ValueError(f"FP8 weights are read 4 bytes at a time: in_features {in_features} must be a multiple of 4")
        want_dtype, want = torch.float8_e4m3fn, (out_features, in_features)
    else:
        if fmt is WeightFormat.NF4 and bits != 4:
            raise ValueError(f"NF4 has 4-bit indices, got bits={bits}")
        if bits not in (2, 3, 4, 5, 6, 8):
            raise ValueError(f"integer codes must have 2, 3, 4, 5, 6 or 8 bits, got {bits}")
        want_dtype, want = torch.int32, (out_features, math.ceil(in_features * bits / 32))
    if weight.dtype != want_dtype or tuple(weight.shape) != want:
        raise ValueError(f"{fmt} weight must be {want_dtype} {list(want)}, got {weight.dtype} {list(weight.shape)}")
    if scale.dtype not in SCALE_DTYPES or tuple(scale.shape) != (out_features, groups):
        raise ValueError(f"weight_scale must be fp16/bf16/fp32 [{out_features}, {groups}], "
                         f"got {scale.dtype} {list(scale.shape)}")
    if zero is not None:
        if fmt is not WeightFormat.INT:
            raise ValueError(f"{fmt} weights take no zero point")
        zshape = (math.ceil(out_features * bits / 32), groups)
        if zero.dtype != torch.int32 or tuple(zero.shape) != zshape:
            raise ValueError(f"weight_zero_point must be int32 {list(zshape)}, got {zero.dtype} {list(zero.shape)}")


def _output(x2d: torch.Tensor, n: int, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty(x2d.shape[0], n, device=x2d.device, dtype=x2d.dtype)
    if tuple(out.shape) != (x2d.shape[0], n) or out.dtype != x2d.dtype or not out.is_contiguous():
        raise ValueError(f"out must be contiguous {x2d.dtype} [{x2d.shape[0]}, {n}], got {out.dtype} {list(out.shape)}")
    return out


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
        codebook = torch.tensor(NF4_CODEBOOK, dtype=torch.float32, device=x.device)
    result = _output(x2d, out_features, out)
    if m > 0:
        zero = None if zero is None else zero.contiguous()
        if fmt is WeightFormat.FP8:
            weight = weight.view(torch.int32)  # 4 E4M3 bytes per word, decoded in the kernel
        if fast and config is None and m > 16 and group_size and PREFILL_SMALL_GROUPS_GENERIC \
                and group_size < cfg.block_k:
            fast, cfg = False, default_config(m, x.device)
        if fast:
            _launch_fast_int(x2d, weight.contiguous(), scale.contiguous(), zero, bias, result, bits, group_size, cfg)
            return result.reshape(*x.shape[:-1], out_features)
        _launch_weight_only(x2d, weight.contiguous(), scale.contiguous(), zero, bias, codebook, result, fmt, bits,
                            group_size, cfg)
    return result.reshape(*x.shape[:-1], out_features)


def _launch_weight_only(x2d, weight, scale, zero, bias, codebook, result, fmt, bits, group_size, cfg) -> None:
    """Pick GEMV or GEMM, split K, launch, and fold a split-K workspace into ``result``."""
    from bitplan.kernels import triton_kernels as tk

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


def dequantize_int(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, group_size: int,
                   in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``[N, K]`` weight in ``dtype`` (fp16/bf16) of 2/4/8-bit pack-quantized tensors, on the GPU
    (``int_dequant_kernel``: the fast path's decoding, float32 arithmetic, one rounding)."""
    from bitplan.kernels import triton_kernels as tk

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


def _launch_fast_int(x2d, weight, scale, zero, bias, result, bits, group_size, cfg) -> None:
    """``int_gemv_kernel`` (GEMV config, ``block_m == 1``) or ``int_gemm_kernel``; split-K for M <= 16."""
    from bitplan.kernels import triton_kernels as tk

    m, k = x2d.shape
    n = result.shape[1]
    per = 32 // bits
    words = weight.shape[1]
    if PREFILL_DEQUANT_MIN_M and m >= PREFILL_DEQUANT_MIN_M and cfg.block_m > 16:
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
    per_sm = FAST_SPLIT_PER_SM["gemv" if gemv else "small"]
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
    if gemv:  # 0x3F800000: float32 1.0, a run-time value on purpose (see triton_kernels)
        grid = (math.ceil(n / block_n), split, m)
        tk.int_gemv_kernel[grid](*args, n, k, words, w_per_split, 0x3F800000, *strides, PREFETCH=cfg.num_stages > 1,
                                 NIBBLES_IN_PLACE=GEMV_NIBBLES_IN_PLACE, num_stages=1, **meta)
    else:
        grid = (math.ceil(m / cfg.block_m) * math.ceil(n / block_n), split)
        tk.int_gemm_kernel[grid](*args, m, n, k, words, w_per_split, 0x3F800000, *strides, DOT_FP32=interpreting(),
                                 SWAP_AB=cfg.swap_ab, BLOCK_M=cfg.block_m, GROUP_M=8, num_stages=cfg.num_stages,
                                 **meta)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row. x: fp16/bf16/fp32 ``[M, K]`` -> (int8 ``[M, K]``, float32 ``[M]``).

    As vLLM's dynamic per-token quantization: ``scale = max|x| / 127`` (0 for an all-zero row),
    codes ``round_half_even(x * (127 / max|x|))``.
    """
    from bitplan.kernels import triton_kernels as tk

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


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


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
    from bitplan.kernels import triton_kernels as tk

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
