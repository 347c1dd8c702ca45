"""ggml's helpers and scale searches, vectorised over blocks (``make_qx_quants``, ``make_q3_quants``,
``make_qkx2_quants``/``make_qkx3_quants``, ``make_qp_quants`` in ``ggml/src/ggml-quants.c``).

The rules of exactness are :mod:`bitplan.methods.ggml`'s: float32 operations in C's order, left
folds for sums, sequential "first strictly better" choices kept with ``np.where``.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)


def fold(terms: np.ndarray) -> np.ndarray:
    """Sum over the FIRST axis as the C loop ``acc = 0; for i: acc += t[i]`` does, in float32.

    Arrays here are element-major (``[n, blocks]``) so that each step adds contiguous rows.
    """
    terms = np.ascontiguousarray(terms)
    acc = np.zeros(terms.shape[1:], F32)
    for row in terms:
        acc += row
    return acc


def fold_from_first(terms: np.ndarray) -> np.ndarray:
    """Like :func:`fold` for loops that start from element 0 (``acc = t[0]; for i >= 1: acc += t[i]``)."""
    acc = terms[0].copy()
    for row in terms[1:]:
        acc += row
    return acc


def columns(x: np.ndarray) -> np.ndarray:
    """``[blocks, n]`` -> contiguous element-major ``[n, blocks]``."""
    return np.ascontiguousarray(x.T)


def nearest_int(values: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``: add 1.5·2^23 and read the mantissa (ties to even; wraps past 2^22 as C does)."""
    bits = (np.asarray(values, F32) + F32(12582912.0)).view(np.int32)
    bits &= 0x007FFFFF
    bits -= 0x00400000
    return bits


def clip(values: np.ndarray, low: int, high: int) -> np.ndarray:
    return np.minimum(np.maximum(values, low), high)


def fp16_bits(values: np.ndarray) -> np.ndarray:
    """``GGML_FP32_TO_FP16``: round to nearest even, overflow to inf, NaN to sign|0x7E00."""
    values = np.asarray(values, F32)
    bits = values.astype(np.float16).view(np.uint16)
    sign = (values.view(np.uint32) >> 16).astype(np.uint16) & np.uint16(0x8000)
    return np.where(np.isnan(values), sign | np.uint16(0x7E00), bits)


def fp16_value(bits: np.ndarray) -> np.ndarray:
    """``GGML_FP16_TO_FP32`` (exact)."""
    return np.ascontiguousarray(bits, dtype=np.uint16).view(np.float16).astype(F32)


def half_bytes(bits: np.ndarray) -> np.ndarray:
    """``[n]`` uint16 -> ``[n, 2]`` little-endian bytes."""
    return np.ascontiguousarray(bits, dtype="<u2").view(np.uint8).reshape(-1, 2)


def first_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(amax, max)`` of ``if (fabsf(x[i]) > amax) { amax = fabsf(x[i]); max = x[i]; }`` from 0."""
    index = np.abs(x).argmax(axis=-1)
    signed = np.take_along_axis(x, index[..., None], axis=-1)[..., 0]
    amax = np.abs(signed)
    return amax, np.where(amax > 0, signed, F32(0))


def first_min(x: np.ndarray) -> np.ndarray:
    """``min = x[0]; if (x[i] < min) min = x[i];``: the first minimal element (keeps the sign of a zero)."""
    return np.take_along_axis(x, x.argmin(axis=-1)[..., None], axis=-1)[..., 0]


def first_max(x: np.ndarray) -> np.ndarray:
    """``max = x[0]; if (x[i] > max) max = x[i];``: the first maximal element."""
    return np.take_along_axis(x, x.argmax(axis=-1)[..., None], axis=-1)[..., 0]


def recip(values: np.ndarray) -> np.ndarray:
    """``d ? 1.0f/d : 0.0f``."""
    safe = np.where(values != 0, values, F32(1))
    return np.where(values != 0, F32(1) / safe, F32(0))


def pack_nibbles(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    return ((low & 0xF) | ((high & 0xF) << 4)).astype(np.uint8)


def pack_crumbs(levels: np.ndarray) -> np.ndarray:
    """q2_K/q3_K ``qs``: for each 128 of a super-block, byte ``l`` holds elements l, l+32, l+64, l+96."""
    parts = levels.reshape(-1, 2, 4, 32).astype(np.uint8)
    return (parts[:, :, 0] | (parts[:, :, 1] << 2) | (parts[:, :, 2] << 4) | (parts[:, :, 3] << 6)).reshape(-1, 64)


def high_bits(bits: np.ndarray, groups: int) -> np.ndarray:
    """``qh``/``hmask``: byte ``m`` has bit ``g`` set when element ``32·g + m`` has its high bit."""
    flags = bits.reshape(-1, groups, 32).astype(np.uint8)
    return np.bitwise_or.reduce(flags << np.arange(groups, dtype=np.uint8)[None, :, None], axis=1)


# ------------------------------------------------------------------- ggml's scale searches


def make_qx_quants(x: np.ndarray, nmax: int, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)``: symmetric scale, 19 candidates.

    ``x``/``weights`` ``[b, n]``; ``weights=None`` uses x². Returns ``(scale [b], L [b, n])`` with
    ``L = l + nmax`` in ``[0, 2·nmax)``.
    """
    amax, max_ = first_absmax(x)
    live = amax >= GROUP_MAX_EPS
    max_ = np.where(live, max_, F32(1))
    xt = columns(x)
    wt = xt * xt if weights is None else columns(weights)
    wx = wt * xt
    steps = [F32(-nmax)] + [-(F32(nmax) + F32(0.1) * F32(i)) for i in range(-9, 10) if i != 0]
    scale = best = chosen = None
    for k, step in enumerate(steps):
        levels = clip(nearest_int((step / max_) * xt), -nmax, nmax - 1)
        lf = levels.astype(F32)
        sumlx, suml2 = fold(wx * lf), fold((wt * lf) * lf)
        if k == 0:
            scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, F32(1)), F32(0))
            best, chosen = scale * sumlx, levels
            continue
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        scale = np.where(take, sumlx / np.where(take, suml2, F32(1)), scale)
        best = np.where(take, scale * sumlx, best)
        chosen = np.where(take, levels, chosen)
    return np.where(live, scale, F32(0)), np.where(live[:, None], chosen.T + nmax, 0)


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)``: x²-weighted, then 5 passes of coordinate descent."""
    amax, max_ = first_absmax(x)
    live = amax >= GROUP_MAX_EPS
    xt = columns(x)
    levels = clip(nearest_int((F32(-nmax) / np.where(live, max_, F32(1))) * xt), -nmax, nmax - 1)
    wt = xt * xt
    wx = wt * xt
    lf = levels.astype(F32)
    sumlx, suml2 = fold(wx * lf), fold((wt * lf) * lf)
    for _ in range(5):  # C stops early when a pass changes nothing; further passes then change nothing either
        for i in range(xt.shape[0]):
            li = levels[i].astype(F32)
            slx = sumlx - wx[i] * li
            ok = slx > 0
            sl2 = suml2 - (wt[i] * li) * li
            new = clip(nearest_int((xt[i] * sl2) / np.where(ok, slx, F32(1))), -nmax, nmax - 1)
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


def make_qkx_quants(
    x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool, qkx3: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``make_qkx2_quants`` (``qkx3=False``) / ``make_qkx3_quants``: asymmetric scale and min.

    Candidate ``is`` rescales by ``(rmin + rdelta·is + nmax)/(max - min)`` around the best min so
    far, so the candidates are sequential; each is vectorised over blocks. Returns
    ``(scale [b], the_min [b] (= -min >= 0), L [b, n] in [0, nmax])``.
    """
    min_ = first_min(x)
    min_ = np.where(min_ > 0, F32(0), min_)
    max_ = first_max(x)
    xt, wt = columns(x), columns(weights)
    sum_w = fold_from_first(wt)
    sum_x = fold_from_first(wt * xt)
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
        return fold(diff)

    iscale = F32(nmax) / np.where(live, max_ - min_, F32(1))
    scale = F32(1) / iscale
    levels = clip(nearest_int(iscale * (xt - min_)), 0, nmax)
    best = error(scale, min_, levels.astype(F32))
    for step in range(nstep + 1 if nstep >= 1 else 0):
        factor = F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)
        scaled = (factor / np.where(live, max_ - min_, F32(1))) * (xt - min_)
        if qkx3:
            trial = np.where(scaled > 0, nearest_int(np.minimum(scaled, F32(nmax))), 0)
        else:
            trial = clip(nearest_int(scaled), 0, nmax)
        lf = trial.astype(F32)
        wl = wt * lf
        sum_l, sum_l2, sum_xl = fold(wl), fold(wl * lf), fold(wl * xt)
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


def make_qp_quants(x: np.ndarray, nmax: int, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``make_qp_quants(n, nmax, x, L, quant_weights)``: non-negative sub-block scales/mins -> 6/4-bit codes."""
    max_ = np.maximum(x.max(axis=1), F32(0))
    live = max_ >= GROUP_MAX_EPS
    max_ = np.where(live, max_, F32(1))
    xt, wt = columns(x), columns(weights)
    iscale = F32(nmax) / max_
    stored = nearest_int(iscale * xt) & 0xFF  # uint8_t L[i] = nearest_int(...)
    diff = xt - (F32(1) / iscale) * stored.astype(F32)
    best = fold((wt * diff) * diff)
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        trial_iscale = (F32(0.1) * F32(step) + F32(nmax)) / max_
        diff = xt - (F32(1) / trial_iscale) * np.minimum(nearest_int(trial_iscale * xt), nmax).astype(F32)
        mse = fold((wt * diff) * diff)
        better = mse < best
        best = np.where(better, mse, best)
        iscale = np.where(better, trial_iscale, iscale)
    levels = np.minimum(nearest_int(iscale * xt), nmax)
    lf = levels.astype(F32)
    wx = wt * xt
    sumlx, suml2 = fold(wx * lf), fold((wt * lf) * lf)
    stored = levels & 0xFF
    for _ in range(5):
        for i in range(xt.shape[0]):
            li = stored[i].astype(F32)
            slx = sumlx - wx[i] * li
            sl2 = suml2 - (wt[i] * li) * li
            ok = (slx > 0) & (sl2 > 0)
            new = np.minimum(nearest_int((xt[i] * sl2) / np.where(ok, slx, F32(1))), nmax)
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


def pack_k4_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """q4_K/q5_K ``scales[12]``: eight 6-bit scales and mins (the packing loop of ``quantize_row_q4_K_ref``)."""
    ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    out = np.zeros((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return out


def unpack_k4_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``get_scale_min_k4`` for j = 0..7: (scale codes [n, 8], min codes [n, 8])."""
    sc, mn = np.empty((scales.shape[0], 8), np.uint8), np.empty((scales.shape[0], 8), np.uint8)
    sc[:, :4], mn[:, :4] = scales[:, 0:4] & 63, scales[:, 4:8] & 63
    sc[:, 4:] = (scales[:, 8:12] & 0xF) | ((scales[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (scales[:, 8:12] >> 4) | ((scales[:, 4:8] >> 6) << 4)
    return sc, mn


def pack_q3_scales(codes: np.ndarray) -> np.ndarray:
    """q3_K ``scales[12]``: sixteen 6-bit codes (low nibbles in bytes 0-7, top 2 bits in bytes 8-11)."""
    codes = codes.astype(np.uint8)
    out = np.zeros((codes.shape[0], 12), np.uint8)
    out[:, 0:8] = (codes[:, 0:8] & 0xF) | ((codes[:, 8:16] & 0xF) << 4)
    top = (codes >> 4).reshape(-1, 4, 4)  # [n, j//4, j%4]
    out[:, 8:12] = top[:, 0] | (top[:, 1] << 2) | (top[:, 2] << 4) | (top[:, 3] << 6)
    return out


def unpack_q3_scales(scales: np.ndarray) -> np.ndarray:
    """Signed q3_K sub-block scales ``[n, 16]`` in [-32, 31]."""
    low = np.concatenate([scales[:, 0:8] & 0xF, scales[:, 0:8] >> 4], axis=1).astype(np.int32)
    top = (scales[:, 8:12].astype(np.int32)[:, None, :] >> (2 * np.arange(4))[None, :, None]) & 3
    return (low | (top.reshape(-1, 16) << 4)) - 32
