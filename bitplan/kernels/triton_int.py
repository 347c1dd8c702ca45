"""Triton JIT code only: the fast path for integer codes that never straddle a word (2, 4 and 8
bits) with fp16/bf16 activations. Vocabulary: :mod:`bitplan.kernels.triton_generic`; launcher:
:mod:`bitplan.kernels.launch_int`."""

from __future__ import annotations

import triton
import triton.language as tl

from bitplan.kernels.triton_generic import _grouped_tile, _zero_points

# ------------------------------------------------------------------------------------------------
# Fast path for integer codes that never straddle a word (2, 4 and 8 bits) and fp16/bf16
# activations: the GEMV (M = 1) and the tensor-core GEMM (M > 1). Tiles are [BLOCK_N, BLOCK_W]
# int32 words straight from ``weight_packed``; code ``i`` of every word is extracted with one
# constant shift and one AND-OR (``one`` = 0x3F800000 arrives as a run-time argument, so that
# the AND and the OR with two different constants fuse into a single LOP3 with one immediate):
# the float ``1 + u / 2**BITS``. Scale and zero point then cost one FMA per weight:
# ``w = (1 + u / 2**B) * sc + nz`` with ``sc = 2**B * scale`` and ``nz = -sc * (1 + uz / 2**B)``.
# ------------------------------------------------------------------------------------------------


@triton.jit
def _code_top(words, one, i: tl.constexpr, BITS: tl.constexpr):
    """Code ``i`` of each int32 word as float32 ``1 + u / 2**BITS`` (the code in the top mantissa bits)."""
    TOP: tl.constexpr = 23 - BITS
    SHIFT: tl.constexpr = TOP - BITS * i
    MASK: tl.constexpr = ((1 << BITS) - 1) << TOP
    if SHIFT >= 0:
        bits = (words << SHIFT) & MASK
    else:
        bits = (words >> (-SHIFT)) & MASK
    return (bits | one).to(tl.float32, bitcast=True)


@triton.jit
def _nibble_in_place(wa, wb, wc, wd, we, one, i: tl.constexpr):
    """4-bit code ``i`` as float32 ``1 + u * 2**(p - 23)`` with its nibble left at bit ``p`` (12 or 16)
    of one of five views of the word (``wa = w``, ``wb = w >> 12``, ``wc = w << 12``,
    ``wd = w << 4``, ``we = w >> 4``: four shifts per word), so each code costs a single LOP3.
    Multiply by :func:`_nibble_x` (the activation times ``2**(23 - p)``) to get ``x * 2**(23-p) + u x``.
    """
    if i == 0:
        bits = (wc & (15 << 12)) | one
    elif i == 1:
        bits = (wc & (15 << 16)) | one
    elif i == 2:
        bits = (wd & (15 << 12)) | one
    elif i == 3:
        bits = (wa & (15 << 12)) | one
    elif i == 4:
        bits = (wa & (15 << 16)) | one
    elif i == 5:
        bits = (we & (15 << 16)) | one
    elif i == 6:
        bits = (wb & (15 << 12)) | one
    else:
        bits = (wb & (15 << 16)) | one
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _nibble_x(x, i: tl.constexpr):
    """The activation of code ``i`` scaled to :func:`_nibble_in_place`'s bit position (exact)."""
    if i == 0 or i == 2 or i == 3 or i == 6:
        return x * 2048.0
    else:
        return x * 128.0


@triton.jit
def _int_scales(s_ptr, z_ptr, offs_n, n_mask, w0, offs_w, w_mask, N, stride_sn, stride_zw,
                BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, PER_STEP: tl.constexpr):
    """``(sc, nz)`` float32 for rows ``offs_n`` and the words from ``w0``: [BN, 1] when one group
    covers the step (``PER_STEP``), else [BN, BW] (one group per word)."""
    PER: tl.constexpr = 32 // BITS
    OFFSET: tl.constexpr = 1.0 + (1 << (BITS - 1)) * (1.0 / (1 << BITS))
    if PER_STEP:
        g = 0 if GROUP == 0 else (w0 * PER) // GROUP
        sc = tl.load(s_ptr + offs_n * stride_sn + g, mask=n_mask, other=0.0).to(tl.float32) * (1 << BITS)
        if HAS_ZERO:  # 2/4/8-bit zero points never straddle a word
            bit = offs_n * BITS
            zw = tl.load(z_ptr + (bit // 32) * stride_zw + g, mask=n_mask, other=0)
            uz = ((zw >> (bit % 32)) & ((1 << BITS) - 1)).to(tl.float32)
            nz = -sc * (1.0 + uz * (1.0 / (1 << BITS)))
        else:
            nz = sc * -OFFSET
        return sc[:, None], nz[:, None]
    else:
        g = (tl.where(w_mask, w0 + offs_w, w0) * PER) // GROUP  # past the split's end: a valid group
        mask = n_mask[:, None] & w_mask[None, :]
        sc = tl.load(s_ptr + offs_n[:, None] * stride_sn + g[None, :], mask=mask, other=0.0).to(tl.float32)
        sc = sc * (1 << BITS)
        if HAS_ZERO:
            uz = _zero_points(z_ptr, offs_n, g, N, stride_zw, True, BITS)
            nz = -sc * (1.0 + uz * (1.0 / (1 << BITS)))
        else:
            nz = sc * -OFFSET
        return sc, nz


@triton.jit
def _finish(acc, out_ptr, offs, mask, b_ptr, offs_bias, ws_ptr, lock_ptr, tile, pid_k, ws_stride,
            HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Store ``acc`` (+ bias); with ``SPLIT_K > 1`` write it to this split's float32 workspace slice
    first, and let the last split of this tile to arrive (counted in ``lock_ptr[tile]``) add every
    slice and store, then reset the counter to zero for the next launch. No memset, no second kernel."""
    if SPLIT_K > 1:
        tl.store(ws_ptr + pid_k * ws_stride + offs, acc, mask=mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.zeros_like(acc)
            for s in tl.static_range(SPLIT_K):
                total += tl.load(ws_ptr + s * ws_stride + offs, mask=mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(b_ptr + offs_bias, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(lock_ptr + tile, 0, sem="relaxed", scope="gpu")
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_bias, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def int_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, lock_ptr,
    N, K, words, w_per_split, one,
    stride_xm, stride_wn, stride_sn, stride_zw, stride_om,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, PREFETCH: tl.constexpr,
    NIBBLES_IN_PLACE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """One activation row times ``BLOCK_N`` rows over one K split, on CUDA cores; grid (N blocks, SPLIT_K, M).

    Per weight: a LOP3 and an FMA with the activation (float32), plus four shifts per 4-bit word
    (:func:`_nibble_in_place`; other widths: a shift per weight, :func:`_code_top`). The
    activations of the step's words are loaded once per thread and reused for all of its rows;
    the sums of the activations fold zero point and offsets in per word and row (2-3 FMAs).
    ``EVEN_N`` / ``EVEN_K``: no masks (N a multiple of BLOCK_N; every split a whole number of full
    steps). ``PREFETCH``: load the next step's words before computing this one.
    """
    PER: tl.constexpr = 32 // BITS
    PER_STEP: tl.constexpr = GROUP == 0 or GROUP % (BLOCK_W * PER) == 0
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, BLOCK_W)
    n_mask = offs_n < N
    x_row = x_ptr + pid_m * stride_xm
    w_rows = w_ptr + offs_n[:, None] * stride_wn
    first = pid_k * w_per_split
    last = tl.minimum(first + w_per_split, words)
    acc = tl.zeros([BLOCK_N, BLOCK_W], tl.float32)
    if PREFETCH:
        if EVEN_N and EVEN_K:
            nxt = tl.load(w_rows + (first + offs_w)[None, :])
        else:
            nxt = tl.load(w_rows + (first + offs_w)[None, :], mask=n_mask[:, None] & ((first + offs_w) < last)[None, :],
                          other=0)
    for w0 in range(first, last, BLOCK_W):
        ww = w0 + offs_w
        w_mask = ww < last
        if PREFETCH:
            wt = nxt
            if EVEN_N and EVEN_K:
                nxt = tl.load(w_rows + (ww + BLOCK_W)[None, :], mask=(ww + BLOCK_W < last)[None, :], other=0)
            else:
                nxt = tl.load(w_rows + (ww + BLOCK_W)[None, :], mask=n_mask[:, None] & (ww + BLOCK_W < last)[None, :],
                              other=0)
        else:
            if EVEN_N and EVEN_K:
                wt = tl.load(w_rows + ww[None, :])
            else:
                wt = tl.load(w_rows + ww[None, :], mask=n_mask[:, None] & w_mask[None, :], other=0)
        part = tl.zeros([BLOCK_N, BLOCK_W], tl.float32)
        x_sum = tl.zeros([BLOCK_W], tl.float32)
        sc, nz = _int_scales(s_ptr, z_ptr, offs_n, n_mask, w0, offs_w, w_mask, N, stride_sn, stride_zw,
                             BITS, GROUP, HAS_ZERO, PER_STEP)
        if BITS == 4 and NIBBLES_IN_PLACE:
            xp_sum = tl.zeros([BLOCK_W], tl.float32)
            wb = wt >> 12
            wc = wt << 12
            wd = wt << 4
            we = wt >> 4
            for i in tl.static_range(8):
                if EVEN_K:
                    xi = tl.load(x_row + ww * 8 + i).to(tl.float32)
                else:
                    xi = tl.load(x_row + ww * 8 + i, mask=w_mask & (ww * 8 + i < K), other=0.0).to(tl.float32)
                xp = _nibble_x(xi, i)
                part += _nibble_in_place(wt, wb, wc, wd, we, one, i) * xp[None, :]
                x_sum += xi
                xp_sum += xp
            # part = sum_i (x'_i + u_i x_i); sc = 16 s, nz = -16 s - s uz
            s1 = sc * (1.0 / 16)
            acc = acc + part * s1
            if HAS_ZERO:
                acc = acc + x_sum[None, :] * (nz + sc)
                acc = acc - xp_sum[None, :] * s1
            else:
                acc = acc - (xp_sum + 8.0 * x_sum)[None, :] * s1
        else:
            for i in tl.static_range(PER):
                if EVEN_K:
                    xi = tl.load(x_row + ww * PER + i).to(tl.float32)
                else:
                    xi = tl.load(x_row + ww * PER + i, mask=w_mask & (ww * PER + i < K), other=0.0).to(tl.float32)
                part += _code_top(wt, one, i, BITS) * xi[None, :]
                x_sum += xi
            acc = acc + part * sc
            acc = acc + x_sum[None, :] * nz
    out = tl.sum(acc, axis=1)
    _finish(out, out_ptr, pid_m * stride_om + offs_n, n_mask, b_ptr, offs_n, ws_ptr, lock_ptr,
            pid_m * tl.num_programs(0) + pid_n, pid_k, tl.num_programs(2) * stride_om, HAS_BIAS, SPLIT_K)


@triton.jit
def _join4(a0, a1, a2, a3):
    """[..., 2, 2] whose flattened last dims hold a0, a1, a2, a3 in order."""
    return tl.join(tl.join(a0, a2), tl.join(a1, a3))


@triton.jit
def _dq(wt, one, sc, nz, i: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr):
    """Code ``i`` of each word, dequantized: ``(1 + u / 2**B) * sc + nz`` in ``DT``."""
    return (_code_top(wt, one, i, BITS) * sc + nz).to(DT)


@triton.jit
def _dequant_words(wt, one, sc, nz, BITS: tl.constexpr, DT: tl.constexpr):
    """int32 words [BN, BW] -> dequantized weights [BN, BW * PER] in ``DT``, input ``k = w * PER + i``.

    Each code is decoded in the thread that loaded its word (no shuffles); ``tl.join`` stacks the
    codes of a word in registers and the reshape keeps them in order.
    """
    if BITS == 8:
        v = _join4(_dq(wt, one, sc, nz, 0, BITS, DT), _dq(wt, one, sc, nz, 1, BITS, DT),
                   _dq(wt, one, sc, nz, 2, BITS, DT), _dq(wt, one, sc, nz, 3, BITS, DT))
    elif BITS == 4:
        v = tl.join(_join4(_dq(wt, one, sc, nz, 0, BITS, DT), _dq(wt, one, sc, nz, 2, BITS, DT),
                           _dq(wt, one, sc, nz, 4, BITS, DT), _dq(wt, one, sc, nz, 6, BITS, DT)),
                    _join4(_dq(wt, one, sc, nz, 1, BITS, DT), _dq(wt, one, sc, nz, 3, BITS, DT),
                           _dq(wt, one, sc, nz, 5, BITS, DT), _dq(wt, one, sc, nz, 7, BITS, DT)))
    else:
        v = tl.join(tl.join(_join4(_dq(wt, one, sc, nz, 0, BITS, DT), _dq(wt, one, sc, nz, 4, BITS, DT),
                                   _dq(wt, one, sc, nz, 8, BITS, DT), _dq(wt, one, sc, nz, 12, BITS, DT)),
                            _join4(_dq(wt, one, sc, nz, 2, BITS, DT), _dq(wt, one, sc, nz, 6, BITS, DT),
                                   _dq(wt, one, sc, nz, 10, BITS, DT), _dq(wt, one, sc, nz, 14, BITS, DT))),
                    tl.join(_join4(_dq(wt, one, sc, nz, 1, BITS, DT), _dq(wt, one, sc, nz, 5, BITS, DT),
                                   _dq(wt, one, sc, nz, 9, BITS, DT), _dq(wt, one, sc, nz, 13, BITS, DT)),
                            _join4(_dq(wt, one, sc, nz, 3, BITS, DT), _dq(wt, one, sc, nz, 7, BITS, DT),
                                   _dq(wt, one, sc, nz, 11, BITS, DT), _dq(wt, one, sc, nz, 15, BITS, DT))))
    return tl.reshape(v, (wt.shape[0], wt.shape[1] * (32 // BITS)))


@triton.jit
def int_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, lock_ptr,
    M, N, K, words, w_per_split, one,
    stride_xm, stride_wn, stride_sn, stride_zw, stride_om,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, DOT_FP32: tl.constexpr,
    SWAP_AB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Tensor-core GEMM that dequantizes each [BLOCK_N, BLOCK_K] weight tile in registers inside
    the K loop; grid (M blocks * N blocks, SPLIT_K).

    ``SWAP_AB``: ``W @ x.T`` (the dequantized tile is wgmma's register operand, a small M is the
    narrow side); else ``x @ W.T``. ``DOT_FP32``: multiply in float32 (the interpreter's bf16 dot
    is wrong). Programs are visited in groups of ``GROUP_M`` row blocks so that neighbours share
    weight tiles in L2. ``EVEN_N`` / ``EVEN_K`` drop the weight masks (activation rows past M are
    always masked).
    """
    PER: tl.constexpr = 32 // BITS
    BLOCK_K: tl.constexpr = BLOCK_W * PER
    PER_STEP: tl.constexpr = GROUP == 0 or GROUP % BLOCK_K == 0
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = _grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, BLOCK_W)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    DT: tl.constexpr = tl.float32 if DOT_FP32 else x_ptr.dtype.element_ty
    w_rows = w_ptr + offs_n[:, None] * stride_wn
    first = pid_k * w_per_split
    last = tl.minimum(first + w_per_split, words)
    if SWAP_AB:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        x_ptrs = x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None]
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    for w0 in range(first, last, BLOCK_W):
        ww = w0 + offs_w
        w_mask = ww < last
        if EVEN_N and EVEN_K:
            wt = tl.load(w_rows + ww[None, :])
        else:
            wt = tl.load(w_rows + ww[None, :], mask=n_mask[:, None] & w_mask[None, :], other=0)
        sc, nz = _int_scales(s_ptr, z_ptr, offs_n, n_mask, w0, offs_w, w_mask, N, stride_sn, stride_zw,
                             BITS, GROUP, HAS_ZERO, PER_STEP)
        b = _dequant_words(wt, one, sc, nz, BITS, DT)
        k = w0 * PER + offs_k
        if SWAP_AB:
            if EVEN_K:
                xt = tl.load(x_ptrs + w0 * PER, mask=m_mask[None, :], other=0.0)
            else:
                xt = tl.load(x_ptrs + w0 * PER, mask=m_mask[None, :] & (k < K)[:, None], other=0.0)
            acc = tl.dot(b, xt.to(DT), acc)
        else:
            if EVEN_K:
                xt = tl.load(x_ptrs + w0 * PER, mask=m_mask[:, None], other=0.0)
            else:
                xt = tl.load(x_ptrs + w0 * PER, mask=m_mask[:, None] & (k < K)[None, :], other=0.0)
            acc = tl.dot(xt.to(DT), tl.trans(b), acc)
    if SWAP_AB:
        acc = tl.trans(acc)
    _finish(acc, out_ptr, offs_m[:, None] * stride_om + offs_n[None, :], m_mask[:, None] & n_mask[None, :],
            b_ptr, offs_n[None, :], ws_ptr, lock_ptr, pid_m * tl.cdiv(N, BLOCK_N) + pid_n, pid_k, M * stride_om, HAS_BIAS, SPLIT_K)


@triton.jit
def int_dequant_kernel(
    w_ptr, s_ptr, z_ptr, out_ptr, N, K, words, one, stride_wn, stride_sn, stride_zw, stride_on,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Dense weight ``[N, K]`` in out's dtype from 2/4/8-bit words; grid (N blocks, word blocks)."""
    PER: tl.constexpr = 32 // BITS
    PER_STEP: tl.constexpr = GROUP == 0 or GROUP % (BLOCK_W * PER) == 0
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    w0 = tl.program_id(1) * BLOCK_W
    offs_w = tl.arange(0, BLOCK_W)
    n_mask = offs_n < N
    w_mask = (w0 + offs_w) < words
    wt = tl.load(w_ptr + offs_n[:, None] * stride_wn + (w0 + offs_w)[None, :], mask=n_mask[:, None] & w_mask[None, :],
                 other=0)
    sc, nz = _int_scales(s_ptr, z_ptr, offs_n, n_mask, w0, offs_w, w_mask, N, stride_sn, stride_zw,
                         BITS, GROUP, HAS_ZERO, PER_STEP)
    b = _dequant_words(wt, one, sc, nz, BITS, out_ptr.dtype.element_ty)
    k = w0 * PER + tl.arange(0, BLOCK_W * PER)
    tl.store(out_ptr + offs_n[:, None] * stride_on + k[None, :], b, mask=n_mask[:, None] & (k < K)[None, :])
