"""The packed weight layout bitplan emits and its exact byte count.

Layout (compressed-tensors ``pack-quantized``, the format vLLM loads):

- ``weight_packed``: int32 ``[out, ceil(in * bits / 32)]``. Each row is a little-endian bit
  stream: code ``i`` occupies bits ``[i*bits, (i+1)*bits)``, stored unsigned as
  ``q + 2**(bits-1)`` where ``q`` is the signed code in ``[-2**(bits-1), 2**(bits-1) - 1]``.
  3-, 5- and 6-bit codes straddle word boundaries (no padding bits).
- ``weight_scale``: ``[out, groups]`` in the checkpoint dtype (bf16/fp16/fp32).
- ``weight_zero_point`` (asymmetric only): signed codes packed the same way along dim 0,
  int32 ``[ceil(out * bits / 32), groups]``.
- ``weight_shape``: int64 ``[2]`` = ``(out, in)``.

``groups`` is ``in / group_size``; ``group_size == 0`` means one group per output channel.
A group size must divide ``in``: compressed-tensors and vLLM's kernels reject short groups,
so a scheme whose group does not divide a layer is not a candidate for that layer.

This module is the one place where bytes are counted (compressed-tensors layouts above, GGUF types below). The planner and the emitter both
call :func:`packed_weight_bytes`, so a plan and its checkpoint cannot disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import torch

from bitplan.errors import BitplanError

INT32_BYTES = 4
SHAPE_TENSOR_BYTES = 2 * 8  # weight_shape: two int64


def num_groups(in_features: int, group_size: int) -> int:
    """Number of scale groups per output row (``group_size == 0``: per channel)."""
    if group_size == 0:
        return 1
    assert in_features % group_size == 0, f"group {group_size} does not divide {in_features}"
    return in_features // group_size


def group_fits(in_features: int, group_size: int) -> bool:
    """True when a group size can be stored for a layer with ``in_features`` inputs."""
    return group_size == 0 or in_features % group_size == 0


def packed_words(count: int, bits: int) -> int:
    """int32 words needed for ``count`` codes of ``bits`` bits, packed densely."""
    return math.ceil(count * bits / 32)


def packed_weight_bytes(
    out_features: int,
    in_features: int,
    bits: int,
    group_size: int,
    symmetric: bool,
    scale_bytes: int,
) -> int:
    """Exact bytes of one pack-quantized Linear weight: codes, scales, zero points, shape."""
    groups = num_groups(in_features, group_size)
    total = out_features * packed_words(in_features, bits) * INT32_BYTES
    total += out_features * groups * scale_bytes
    if not symmetric:
        total += packed_words(out_features, bits) * groups * INT32_BYTES
    return total + SHAPE_TENSOR_BYTES


PACK_ELEMENTS = 1 << 24  # codes packed or unpacked at a time: the int64 work arrays stay near 128 MiB each
# (a 128k x 4096 head packed whole took 14 GB of them; measured on the Llama-3-8B shape, bench/scale.py)


def pack_codes(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack signed integer codes of a 2-D tensor densely into int32 words along ``dim``."""
    if codes.ndim != 2:
        raise ValueError(f"pack_codes takes a 2-D tensor, got shape {tuple(codes.shape)}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    source = codes.t() if dim == 0 else codes
    rows, cols = source.shape
    out = torch.empty(rows, packed_words(cols, bits), dtype=torch.int32)
    step = max(1, PACK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        out[start : start + step] = _pack_rows(source[start : start + step], bits)
    return out.t().contiguous() if dim == 0 else out


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`pack_codes` along dim 1 of a few rows, through int64 work arrays."""
    values = codes.to(torch.int64) + (1 << (bits - 1))
    assert values.numel() == 0 or (int(values.min()) >= 0 and int(values.max()) < (1 << bits)), "codes out of range"
    rows, cols = values.shape
    words = packed_words(cols, bits)
    bit_pos = torch.arange(cols, dtype=torch.int64) * bits
    word_idx = bit_pos // 32
    shift = bit_pos % 32
    low = (values << shift) & 0xFFFFFFFF
    out = torch.zeros(rows, words + 1, dtype=torch.int64)
    out.scatter_add_(1, word_idx.expand(rows, -1), low)
    spill = (shift + bits) > 32
    if bool(spill.any()):
        high = values[:, spill] >> (32 - shift[spill])
        out.scatter_add_(1, (word_idx[spill] + 1).expand(rows, -1), high)
    out = out[:, :words]
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def unpack_codes(packed: torch.Tensor, bits: int, count: int, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 words to signed int8 codes, ``count`` along ``dim``."""
    if packed.dtype != torch.int32:
        raise ValueError(f"packed codes must be int32, got {packed.dtype}")
    source = packed.t() if dim == 0 else packed
    rows, words = source.shape
    out = torch.empty(rows, count, dtype=torch.int8)
    step = max(1, PACK_ELEMENTS // max(count, words, 1))
    for start in range(0, rows, step):
        out[start : start + step] = _unpack_rows(source[start : start + step], bits, count)
    return out.t().contiguous() if dim == 0 else out


def _unpack_rows(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """:func:`unpack_codes` along dim 1 of a few rows, through int64 work arrays."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    rows = words.shape[0]
    words = torch.cat([words, torch.zeros(rows, 1, dtype=torch.int64)], dim=1)
    bit_pos = torch.arange(count, dtype=torch.int64) * bits
    word_idx = bit_pos // 32
    shift = bit_pos % 32
    low = words[:, word_idx] >> shift
    high = words[:, word_idx + 1] << (32 - shift)
    mask = (1 << bits) - 1
    values = (low | torch.where(shift + bits > 32, high, torch.zeros_like(high))) & mask
    return (values - (1 << (bits - 1))).to(torch.int8)


def dense_weight_bytes(out_features: int, in_features: int, dtype_bytes: int) -> int:
    """Bytes of a Linear weight left unquantized in the checkpoint dtype."""
    return out_features * in_features * dtype_bytes


def int8_weight_bytes(out_features: int, in_features: int, scale_bytes: int) -> int:
    """Exact bytes of one compressed-tensors ``int-quantized`` W8A8 weight (SmoothQuant).

    ``weight`` int8 ``[out, in]`` (not packed) and ``weight_scale`` ``[out, 1]``; symmetric, so
    no zero point; this format stores no ``weight_shape``.
    """
    return out_features * in_features + out_features * scale_bytes


def fp8_weight_bytes(out_features: int, in_features: int, group_size: int, scale_bytes: int = 4) -> int:
    """Exact bytes of one compressed-tensors ``float-quantized`` FP8 E4M3 weight.

    ``weight`` float8_e4m3fn ``[out, in]`` and ``weight_scale`` ``[out, groups]`` (float32 by
    default); no zero point, no ``weight_shape``.
    """
    return out_features * in_features + out_features * num_groups(in_features, group_size) * scale_bytes


NF4_DOUBLE_QUANT_BLOCK = 256


def nf4_weight_bytes(out_features: int, in_features: int, block_size: int, double_quant: bool) -> int:
    """Exact bytes of one NF4 weight in bitplan's own layout (see ``bitplan.methods.nf4``).

    ``weight_packed`` uint8 ``[out, in/2]``; then either ``weight_absmax`` float32
    ``[out, blocks]``, or (double quantization) ``weight_absmax_codes`` one byte per block,
    ``weight_absmax_scale`` float32 per 256 blocks and ``weight_absmax_offset`` float32 ``[1]``.
    """
    assert in_features % block_size == 0 and in_features % 2 == 0, "NF4 block must divide the inputs"
    blocks = out_features * (in_features // block_size)
    total = out_features * in_features // 2
    if not double_quant:
        return total + blocks * 4
    return total + blocks + math.ceil(blocks / NF4_DOUBLE_QUANT_BLOCK) * 4 + 4


# ------------------------------------------------------------------------------ GGUF (llama.cpp)
# ggml's per-tensor types: blocks of ``block_size`` elements stored in ``type_size`` bytes each
# (``type_traits[]`` in ggml.c). A row must be whole blocks. Quantizers: ``bitplan.methods.ggml``.

QK_K = 256


class GGMLType(StrEnum):
    """GGUF tensor types bitplan can produce (names as in ``ggml_type_name`` / ``gguf.GGMLQuantizationType``)."""

    F32 = "F32"
    F16 = "F16"
    BF16 = "BF16"
    Q8_0 = "Q8_0"
    Q5_1 = "Q5_1"
    Q5_0 = "Q5_0"
    Q4_1 = "Q4_1"
    Q4_0 = "Q4_0"
    Q6_K = "Q6_K"
    Q5_K = "Q5_K"
    Q4_K = "Q4_K"
    Q3_K = "Q3_K"
    Q2_K = "Q2_K"


@dataclass(frozen=True)
class GGMLTypeInfo:
    """ggml's type traits (``type_traits[]`` in ggml.c): ``type_id`` is the ``enum ggml_type`` value."""

    type_id: int
    block_size: int  # elements per block
    type_size: int  # bytes per block
    bits: int  # bits per code (16/32 for the float types)
    symmetric: bool  # False when blocks carry a minimum (``_1`` types, Q2_K, Q4_K, Q5_K)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size


GGML_TYPES: dict[GGMLType, GGMLTypeInfo] = {
    GGMLType.F32: GGMLTypeInfo(0, 1, 4, 32, True),
    GGMLType.F16: GGMLTypeInfo(1, 1, 2, 16, True),
    GGMLType.BF16: GGMLTypeInfo(30, 1, 2, 16, True),
    GGMLType.Q4_0: GGMLTypeInfo(2, 32, 18, 4, True),
    GGMLType.Q4_1: GGMLTypeInfo(3, 32, 20, 4, False),
    GGMLType.Q5_0: GGMLTypeInfo(6, 32, 22, 5, True),
    GGMLType.Q5_1: GGMLTypeInfo(7, 32, 24, 5, False),
    GGMLType.Q8_0: GGMLTypeInfo(8, 32, 34, 8, True),
    GGMLType.Q2_K: GGMLTypeInfo(10, QK_K, 84, 2, False),
    GGMLType.Q3_K: GGMLTypeInfo(11, QK_K, 110, 3, True),
    GGMLType.Q4_K: GGMLTypeInfo(12, QK_K, 144, 4, False),
    GGMLType.Q5_K: GGMLTypeInfo(13, QK_K, 176, 5, False),
    GGMLType.Q6_K: GGMLTypeInfo(14, QK_K, 210, 6, True),
}

GGML_SCHEME_TYPES = tuple(str(t) for t in GGML_TYPES)  # every type a plan may assign (``Scheme.ggml``)


# llama-quantize's ``tensor_type_fallback`` (src/llama-quant.cpp, b11434): a tensor whose row length is not
# a multiple of the type's block gets this type instead, and F16 if that does not fit either.
LLAMA_QUANTIZE_FALLBACK: dict[GGMLType, GGMLType] = {
    GGMLType.Q2_K: GGMLType.Q4_0,
    GGMLType.Q3_K: GGMLType.Q4_0,
    GGMLType.Q4_K: GGMLType.Q5_0,
    GGMLType.Q5_K: GGMLType.Q5_1,
    GGMLType.Q6_K: GGMLType.Q8_0,
}


def is_valid_row_size(ggml_type: GGMLType | str, n_per_row: int) -> bool:
    """Whether ggml can store rows of ``n_per_row`` elements in this type (whole blocks only:
    k-quants need multiples of 256, legacy quants of 32)."""
    return n_per_row > 0 and n_per_row % GGML_TYPES[GGMLType(ggml_type)].block_size == 0


def row_size_bytes(ggml_type: GGMLType | str, n_per_row: int) -> int:
    """Bytes of one row, ``ggml_row_size(type, n_per_row)``; raises when the row is not whole blocks."""
    info = GGML_TYPES[GGMLType(ggml_type)]
    if not is_valid_row_size(ggml_type, n_per_row):
        raise BitplanError(
            f"{ggml_type} stores rows in blocks of {info.block_size}; {n_per_row} inputs is not a multiple:"
            f" pick another type for this tensor (llama_quantize_type() gives llama-quantize's fallback)"
        )
    return n_per_row // info.block_size * info.type_size


def llama_quantize_type(ggml_type: GGMLType | str, n_per_row: int) -> GGMLType:
    """The type llama-quantize actually writes when asked for ``ggml_type`` on rows of ``n_per_row``
    (``tensor_type_fallback``): e.g. Q4_K on SmolLM2's 576-wide rows becomes Q5_0."""
    ggml_type = GGMLType(ggml_type)
    if is_valid_row_size(ggml_type, n_per_row):
        return ggml_type
    fallback = LLAMA_QUANTIZE_FALLBACK.get(ggml_type, ggml_type)
    return fallback if is_valid_row_size(fallback, n_per_row) else GGMLType.F16


def tensor_size_bytes(ggml_type: GGMLType | str, shape: tuple[int, ...] | torch.Size) -> int:
    """Exact bytes of a tensor ``[..., in]`` of this type in a GGUF file (data only, no alignment padding)."""
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    return rows * row_size_bytes(ggml_type, int(shape[-1]))
