"""Kernel formats and launch configurations: what a launch needs to know before it picks a kernel.

The weight formats and the dispatch by M are described in :mod:`bitplan.kernels.launch`. The
tuning knobs of the fast integer path (``FAST_SPLIT_PER_SM``, ``GEMV_NIBBLES_IN_PLACE``,
``PREFILL_DEQUANT_MIN_M``, ``PREFILL_SMALL_GROUPS_GENERIC``) are module state here, read at
each launch, so ``bench/kernels.py --sweep`` can time alternatives.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass
from enum import StrEnum

import torch

log = logging.getLogger(__name__)


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
# whether the 4-bit GEMV decodes nibbles in place (:func:`bitplan.kernels.triton_int._nibble_in_place`, four
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


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
