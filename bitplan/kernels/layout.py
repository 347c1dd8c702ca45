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

This module is the one place where bytes are counted. The planner and the emitter both
call :func:`packed_weight_bytes`, so a plan and its checkpoint cannot disagree.
"""

from __future__ import annotations

import math

import torch

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


def pack_codes(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack signed integer codes of a 2-D tensor densely into int32 words along ``dim``."""
    if codes.ndim != 2:
        raise ValueError(f"pack_codes takes a 2-D tensor, got shape {tuple(codes.shape)}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    values = codes.to(torch.int64) + (1 << (bits - 1))
    assert int(values.min()) >= 0 and int(values.max()) < (1 << bits), "codes out of range"
    if dim == 0:
        values = values.t()
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
    out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)
    return out.t().contiguous() if dim == 0 else out


def unpack_codes(packed: torch.Tensor, bits: int, count: int, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 words to signed int8 codes, ``count`` along ``dim``."""
    if packed.dtype != torch.int32:
        raise ValueError(f"packed codes must be int32, got {packed.dtype}")
    words = packed.to(torch.int64) & 0xFFFFFFFF
    if dim == 0:
        words = words.t()
    rows = words.shape[0]
    words = torch.cat([words, torch.zeros(rows, 1, dtype=torch.int64)], dim=1)
    bit_pos = torch.arange(count, dtype=torch.int64) * bits
    word_idx = bit_pos // 32
    shift = bit_pos % 32
    low = words[:, word_idx] >> shift
    high = words[:, word_idx + 1] << (32 - shift)
    mask = (1 << bits) - 1
    values = (low | torch.where(shift + bits > 32, high, torch.zeros_like(high))) & mask
    codes = (values - (1 << (bits - 1))).to(torch.int8)
    return codes.t().contiguous() if dim == 0 else codes


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
