"""ggml's dequantizers (``dequantize_row_*`` in ``ggml/src/ggml-quants.c``), vectorised over blocks:
what a GGUF tensor's bytes decode to, float32."""

from __future__ import annotations

import numpy as np

from bitplan.kernels.layout import QK_K, GGMLType
from bitplan.methods.ggml_search import F32, fp16_value, unpack_k4_scales, unpack_q3_scales


def _fields(blocks: np.ndarray, *sizes: int) -> list[np.ndarray]:
    edges = np.cumsum((0,) + sizes)
    return [blocks[:, a:b] for a, b in zip(edges[:-1], edges[1:])]


def _half(field: np.ndarray) -> np.ndarray:
    return fp16_value(np.ascontiguousarray(field).view("<u2")[:, 0])[:, None]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """``[n, 16]`` bytes -> 32 levels: low nibbles are elements 0-15, high nibbles 16-31."""
    return np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.int32)


def dequantize_blocks(ggml_type: GGMLType, blocks: np.ndarray) -> np.ndarray:
    """``dequantize_row_*`` of ggml-quants.c (and ``ggml_fp16_to_fp32_row`` etc.) on ``[n, type_size]`` blocks."""
    if ggml_type == GGMLType.F32:
        return np.ascontiguousarray(blocks).view("<f4").astype(F32)
    if ggml_type == GGMLType.F16:
        return fp16_value(np.ascontiguousarray(blocks).view("<u2"))
    if ggml_type == GGMLType.BF16:
        return (np.ascontiguousarray(blocks).view("<u2").astype(np.uint32) << 16).view(F32)
    if ggml_type == GGMLType.Q8_0:
        d, qs = _fields(blocks, 2, 32)
        return np.ascontiguousarray(qs).view(np.int8).astype(F32) * _half(d)
    if ggml_type in (GGMLType.Q4_0, GGMLType.Q4_1):
        has_min = ggml_type == GGMLType.Q4_1
        d, m, qs = _fields(blocks, 2, 2 if has_min else 0, 16)
        levels = _nibbles(qs)
        return levels.astype(F32) * _half(d) + _half(m) if has_min else (levels - 8).astype(F32) * _half(d)
    if ggml_type in (GGMLType.Q5_0, GGMLType.Q5_1):
        has_min = ggml_type == GGMLType.Q5_1
        d, m, qh, qs = _fields(blocks, 2, 2 if has_min else 0, 4, 16)
        high = np.unpackbits(np.ascontiguousarray(qh), axis=1, bitorder="little").astype(np.int32)
        levels = _nibbles(qs) | (high << 4)
        return levels.astype(F32) * _half(d) + _half(m) if has_min else (levels - 16).astype(F32) * _half(d)
    return _dequantize_k(ggml_type, blocks)


def _crumbs(qs: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_crumbs`: ``[n, 64]`` -> ``[n, 256]`` 2-bit levels."""
    parts = qs.reshape(-1, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    return (parts & 3).reshape(-1, QK_K).astype(np.int32)


def _bits(field: np.ndarray, groups: int) -> np.ndarray:
    """Inverse of :func:`high_bits`: element ``32·g + m`` <- bit g of byte m."""
    return ((field[:, None, :] >> np.arange(groups, dtype=np.uint8)[None, :, None]) & 1).reshape(-1, 32 * groups).astype(np.int32)


def _dequantize_k(ggml_type: GGMLType, blocks: np.ndarray) -> np.ndarray:
    if ggml_type == GGMLType.Q2_K:
        scales, qs, d, dmin = _fields(blocks, 16, 64, 2, 2)
        dl = np.repeat(_half(d) * (scales & 0xF).astype(F32), 16, axis=1)
        ml = np.repeat(_half(dmin) * (scales >> 4).astype(F32), 16, axis=1)
        return dl * _crumbs(qs).astype(F32) - ml
    if ggml_type == GGMLType.Q3_K:
        hmask, qs, scales, d = _fields(blocks, 32, 64, 12, 2)
        dl = np.repeat(_half(d) * unpack_q3_scales(np.ascontiguousarray(scales)).astype(F32), 16, axis=1)
        return dl * (_crumbs(qs) - 4 * (1 - _bits(hmask, 8))).astype(F32)
    if ggml_type in (GGMLType.Q4_K, GGMLType.Q5_K):
        five = ggml_type == GGMLType.Q5_K
        d, dmin, scales, qh, qs = _fields(blocks, 2, 2, 12, 32 if five else 0, 128)
        sc, mn = unpack_k4_scales(np.ascontiguousarray(scales))
        dl = np.repeat(_half(d) * sc.astype(F32), 32, axis=1)
        ml = np.repeat(_half(dmin) * mn.astype(F32), 32, axis=1)
        pairs = qs.reshape(-1, 4, 1, 32)
        levels = np.concatenate([pairs & 0xF, pairs >> 4], axis=2).reshape(-1, QK_K).astype(np.int32)
        if five:
            levels = levels + 16 * _bits(qh, 8)
        return dl * levels.astype(F32) - ml
    if ggml_type == GGMLType.Q6_K:
        ql, qh, scales, d = _fields(blocks, 128, 64, 16, 2)
        ql = ql.reshape(-1, 2, 2, 32)  # [n, half, ql row (0: elements 0-31 / 64-95, 1: 32-63 / 96-127), l]
        low = np.stack([ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], axis=2)
        high = qh.reshape(-1, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None] & 3
        levels = (low.astype(np.int32) | (high.astype(np.int32) << 4)).reshape(-1, QK_K) - 32
        codes = np.ascontiguousarray(scales).view(np.int8).astype(F32)
        return np.repeat(_half(d) * codes, 16, axis=1) * levels.astype(F32)
    raise AssertionError(f"no dequantizer for {ggml_type}")
