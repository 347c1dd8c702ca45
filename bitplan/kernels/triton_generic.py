"""Triton JIT code only: the generic kernels (any bit width, NF4, FP8, W8A8). The fast integer
path is :mod:`bitplan.kernels.triton_int`. Shapes, dtypes, layouts and launch parameters: :mod:`bitplan.kernels.launch`.

Vocabulary shared by the kernels below:

- ``FORMAT``: 0 = integer codes (compressed-tensors ``pack-quantized``), 1 = NF4 (4-bit code book
  indices packed like 4-bit integers), 2 = FP8 E4M3 (one byte per weight, no packing).
- A *unit* is ``PER`` consecutive codes of one row that start on a word boundary: one int32 word
  when ``32 % BITS == 0`` (``PER = 32 // BITS``), a chunk of 32 codes in ``BITS`` words for 3-, 5-
  and 6-bit codes (``PER = 32``), four bytes for FP8 (``PER = 4``, ``BITS = 8``: E4M3 bytes read
  as int32 words and decoded in software, so FP8 also runs on sm_80). ``WPU = PER * BITS // 32``
  words per unit. Code ``i`` of unit ``u`` lies at word ``u * WPU + (i * BITS) // 32``, bit
  ``(i * BITS) % 32``, and straddles into the next word when that bit plus ``BITS`` exceeds 32.
- ``GROUP``: inputs per scale group, 0 = one group per row. Launchers guarantee ``GROUP % PER == 0``,
  so one unit never spans two groups.
- Integer values are ``u - uz`` (unsigned code minus unsigned zero point; ``uz = 2**(BITS-1)``
  when symmetric), which equals the signed ``q - z`` of the reference. Codes become floats without
  an int-to-float conversion (a slow instruction): the GEMM uses ``bitcast(u | 0x4B000000) ==
  2**23 + u``; the GEMV places ``u`` in the top mantissa bits of 1.0 and corrects with the sum of
  the activations once per unit, which saves the subtraction per weight.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _bits_at(lo, hi, shift, BITS: tl.constexpr):
    """``BITS`` bits starting at bit ``shift`` of ``lo`` (spilling into ``hi``), as int32."""
    lo_u = lo.to(tl.uint32, bitcast=True) >> shift.to(tl.uint32)
    hi_u = (hi.to(tl.uint32, bitcast=True) << (31 - shift).to(tl.uint32)) << 1
    return ((lo_u | hi_u) & ((1 << BITS) - 1)).to(tl.int32, bitcast=True)


@triton.jit
def _exact_float(u):
    """``2**23 + u`` as float32, exactly, for int32 ``0 <= u < 2**23`` (no int-to-float convert)."""
    return (u | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _zero_points(z_ptr, offs_n, g, N, stride_zw, HAS_ZERO: tl.constexpr, BITS: tl.constexpr):
    """Unsigned zero points ``uz`` for rows ``offs_n`` [BN] and groups ``g`` [BU]: float32 [BN, BU].

    Zero points are packed along dim 0: int32 ``[ceil(N * BITS / 32), groups]``, row ``n`` at bit
    ``n * BITS`` of column ``g``. Symmetric weights use ``2**(BITS-1)``.
    """
    if HAS_ZERO:
        bit = offs_n * BITS
        word = bit // 32
        shift = (bit % 32)[:, None]
        mask = (offs_n < N)[:, None] & (g >= 0)[None, :]
        lo = tl.load(z_ptr + word[:, None] * stride_zw + g[None, :], mask=mask, other=0)
        hi_mask = mask & ((shift + BITS) > 32)
        hi = tl.load(z_ptr + (word + 1)[:, None] * stride_zw + g[None, :], mask=hi_mask, other=0)
        return _bits_at(lo, hi, shift, BITS).to(tl.float32)
    else:
        return tl.zeros([offs_n.shape[0], g.shape[0]], tl.float32) + (1 << (BITS - 1))


@triton.jit
def _e4m3_times_2_pow_minus_8(byte):
    """FP8 E4M3 bytes (uint8, any shape) to float32, divided by 256 (callers fold 256 into the scale).

    Moving the sign to bit 15 and exponent+mantissa to bits 7..13 gives an fp16 whose value is the
    E4M3 value over 2**8, subnormals included; no fp8 hardware type is needed (works on sm_80).
    NaN encodings (S.1111.111) decode to +-480 / 256: weights carry no NaN.
    """
    b = byte.to(tl.int32)
    half = ((b & 0x80) << 8) | ((b & 0x7F) << 7)
    return half.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _group_of(offs_u, PER: tl.constexpr, GROUP: tl.constexpr):
    """Scale group index of each unit (``GROUP == 0``: per channel, always 0)."""
    if GROUP == 0:
        return offs_u * 0
    else:
        return (offs_u * PER) // GROUP


@triton.jit
def _code_values(w_ptr, cb_ptr, row_base, offs_u, words, i: tl.constexpr, mask,
                 FORMAT: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr):
    """Values of code ``i`` of units ``offs_u`` before zero point and scale: float32, ``mask``'s shape.

    Integers come back as ``1 + u / 2**BITS`` (the code placed in the top mantissa bits of 1.0:
    a shift and one logic op, no conversion); NF4 as ``codebook[u]``; FP8 as value / 256.
    ``row_base``: pointer offsets of each row; ``words``: the units' words when ``WPU == 1``.
    """
    WPU: tl.constexpr = PER * BITS // 32
    SHIFT: tl.constexpr = (i * BITS) % 32
    if WPU == 1:
        lo = words.to(tl.uint32, bitcast=True)
    else:
        lo = tl.load(w_ptr + row_base + offs_u * WPU + (i * BITS) // 32, mask=mask, other=0)
        lo = lo.to(tl.uint32, bitcast=True)
    if SHIFT + BITS > 32:
        hi = tl.load(w_ptr + row_base + offs_u * WPU + (i * BITS) // 32 + 1, mask=mask, other=0)
        lo = (lo >> SHIFT) | (hi.to(tl.uint32, bitcast=True) << (32 - SHIFT))
    else:
        lo = lo >> SHIFT
    if FORMAT == 1:
        return tl.load(cb_ptr + (lo & 15).to(tl.int32, bitcast=True))
    elif FORMAT == 2:
        return _e4m3_times_2_pow_minus_8(lo & 0xFF)
    else:
        top = ((lo << (23 - BITS)) & (((1 << BITS) - 1) << (23 - BITS))) | 0x3F800000
        return top.to(tl.float32, bitcast=True)


@triton.jit
def _gemv_operands(w_ptr, s_ptr, z_ptr, offs_n, n_mask, start, units, limit, N, stride_wn, stride_sn, stride_zw,
                   FORMAT: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr, GROUP: tl.constexpr,
                   HAS_ZERO: tl.constexpr, SCALE_PER_ROW: tl.constexpr, BLOCK_U: tl.constexpr):
    """Words [BN, BU] (when one word per unit), scales and ``2**BITS + uz`` for units from ``start``.

    Scales and zero points are [BN, 1] when ``SCALE_PER_ROW`` (one group covers the whole block),
    else [BN, BU]. Nothing is read at or beyond ``limit`` (the end of this program's split).
    """
    offs_u = tl.max_contiguous(tl.multiple_of(start + tl.arange(0, BLOCK_U), BLOCK_U), BLOCK_U)
    u_mask = n_mask[:, None] & ((offs_u < units) & (offs_u < limit))[None, :]
    WPU: tl.constexpr = PER * BITS // 32
    if WPU == 1:
        words = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_u[None, :], mask=u_mask, other=0)
    else:
        words = u_mask.to(tl.int32)
    if SCALE_PER_ROW:
        first = tl.zeros([1], tl.int32) + start
        g = _group_of(first, PER, GROUP)
        g_mask = n_mask[:, None] & (first < limit)[None, :]
    else:
        g = _group_of(offs_u, PER, GROUP)
        g_mask = u_mask
    scale = tl.load(s_ptr + offs_n[:, None] * stride_sn + g[None, :], mask=g_mask, other=0.0).to(tl.float32)
    if FORMAT == 0:
        uz = _zero_points(z_ptr, offs_n, g, N, stride_zw, HAS_ZERO, BITS)
        offset = 1.0 + uz * (1.0 / (1 << BITS))
        scale = scale * (1 << BITS)
    else:
        offset = scale * 0.0
        if FORMAT == 2:
            scale = scale * 256.0
    return words, scale, offset


@triton.jit
def weight_only_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, cb_ptr, b_ptr, out_ptr,
    N, K, units, units_per_split,
    stride_xm, stride_wn, stride_sn, stride_zw, stride_om,
    FORMAT: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr, GROUP: tl.constexpr,
    HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, SCALE_PER_ROW: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_U: tl.constexpr,
):
    """One activation row times ``BLOCK_N`` weight rows over one K split; grid (N blocks, SPLIT_K, M).

    FMA in float32 on CUDA cores (decode is bandwidth-bound). The next block's words, scales and
    zero points are loaded before the current block is computed, so DRAM latency hides behind the
    arithmetic. Integers use ``sum_i (u_i - uz) x_i = 2**B (sum_i (1 + u_i / 2**B) x_i -
    (1 + uz / 2**B) sum_i x_i)``. With ``SPLIT_K > 1``, ``out_ptr`` is a zeroed float32 workspace.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    row_base = (offs_n * stride_wn)[:, None]
    x_row = x_ptr + pid_m * stride_xm
    first = pid_k * units_per_split
    limit = first + units_per_split
    acc = tl.zeros([BLOCK_N, BLOCK_U], tl.float32)
    words, scale, offset = _gemv_operands(w_ptr, s_ptr, z_ptr, offs_n, n_mask, first, units, limit, N,
                                          stride_wn, stride_sn, stride_zw, FORMAT, BITS, PER, GROUP,
                                          HAS_ZERO, SCALE_PER_ROW, BLOCK_U)
    for start in range(first, limit, BLOCK_U):
        next_words, next_scale, next_offset = _gemv_operands(
            w_ptr, s_ptr, z_ptr, offs_n, n_mask, start + BLOCK_U, units, limit, N, stride_wn, stride_sn,
            stride_zw, FORMAT, BITS, PER, GROUP, HAS_ZERO, SCALE_PER_ROW, BLOCK_U)
        offs_u = tl.max_contiguous(tl.multiple_of(start + tl.arange(0, BLOCK_U), BLOCK_U), BLOCK_U)
        u_mask = n_mask[:, None] & (offs_u < units)[None, :]
        part = tl.zeros([BLOCK_N, BLOCK_U], tl.float32)
        x_sum = tl.zeros([BLOCK_U], tl.float32)
        for i in tl.static_range(PER):
            k = offs_u * PER + i
            xk = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
            v = _code_values(w_ptr, cb_ptr, row_base, offs_u[None, :], words, i,
                             u_mask & (k < K)[None, :], FORMAT, BITS, PER)
            part += v * xk[None, :]
            x_sum += xk
        acc += (part - offset * x_sum[None, :]) * scale
        words, scale, offset = next_words, next_scale, next_offset
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        out += tl.where(pid_k == 0, bias, 0.0)
    out_ptrs = out_ptr + pid_m * stride_om + offs_n
    if SPLIT_K == 1:
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=n_mask)
    else:
        tl.atomic_add(out_ptrs, out, mask=n_mask)


@triton.jit
def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of GEMM program ``pid``: tiles are visited ``GROUP_M`` row blocks
    at a time, so that neighbouring programs share weight tiles in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    width = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % rows, (pid % width) // rows


@triton.jit
def _dequant_tile_kn(w_ptr, s_ptr, z_ptr, cb_ptr, offs_u, offs_n, N, K, units,
                     stride_wn, stride_sn, stride_zw,
                     FORMAT: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr, GROUP: tl.constexpr,
                     HAS_ZERO: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_N: tl.constexpr):
    """Dequantized weights for codes ``k = u * PER + i`` of units ``offs_u``: float32 [BLOCK_U * PER, BLOCK_N]."""
    u_mask = (offs_u < units)[:, None] & (offs_n < N)[None, :]
    g = _group_of(offs_u, PER, GROUP)
    scale = tl.load(s_ptr + offs_n[None, :] * stride_sn + g[:, None], mask=u_mask, other=0.0).to(tl.float32)
    WPU: tl.constexpr = PER * BITS // 32
    offs_i = tl.arange(0, PER)
    k_mask = (offs_u[:, None] * PER + offs_i[None, :]) < K
    mask3 = u_mask[:, None, :] & k_mask[:, :, None]
    if WPU == 1:
        words = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_u[:, None], mask=u_mask, other=0)
        q = (words[:, None, :] >> (offs_i * BITS)[None, :, None]) & ((1 << BITS) - 1)
    else:
        word = offs_u[:, None] * WPU + (offs_i * BITS // 32)[None, :]
        ptrs = w_ptr + offs_n[None, None, :] * stride_wn + word[:, :, None]
        lo = tl.load(ptrs, mask=mask3, other=0)
        shift = ((offs_i * BITS) % 32)[None, :, None]
        hi = tl.load(ptrs + 1, mask=mask3 & (shift + BITS > 32), other=0)
        q = _bits_at(lo, hi, shift, BITS)
    if FORMAT == 1:
        v = tl.load(cb_ptr + q)
    elif FORMAT == 2:
        v = _e4m3_times_2_pow_minus_8(q)
        scale = scale * 256.0
    else:
        cz = tl.trans(_zero_points(z_ptr, offs_n, g, N, stride_zw, HAS_ZERO, BITS)) + 8388608.0
        v = _exact_float(q) - cz[:, None, :]
    v = v * scale[:, None, :]
    return tl.reshape(v, (BLOCK_U * PER, BLOCK_N))


@triton.jit
def weight_only_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, cb_ptr, b_ptr, out_ptr,
    M, N, K, units, units_per_split,
    stride_xm, stride_wn, stride_sn, stride_zw, stride_om,
    FORMAT: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr, GROUP: tl.constexpr,
    HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, DOT_FP32: tl.constexpr,
    SWAP_AB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_U: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Tiled GEMM that dequantizes each [BLOCK_K, BLOCK_N] weight tile inside the K loop.

    grid (M blocks * N blocks, SPLIT_K). Tiles are visited in groups of ``GROUP_M`` row blocks so
    that neighbouring programs share weight tiles in L2. ``DOT_FP32``: multiply in float32 (the
    interpreter's bf16 dot is wrong); otherwise the dequantized tile is cast to x's dtype, which is
    exactly what the reference does before ``F.linear``. ``SWAP_AB``: compute ``W x^T`` so the
    dequantized weights are the left operand (kept in registers by Hopper's wgmma) and a small M
    is the narrow side of the instruction.
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = _grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    BLOCK_K: tl.constexpr = BLOCK_U * PER
    if SWAP_AB:
        acc_t = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(pid_k * units_per_split, (pid_k + 1) * units_per_split, BLOCK_U):
        offs_u = tl.max_contiguous(tl.multiple_of(start + tl.arange(0, BLOCK_U), BLOCK_U), BLOCK_U)
        offs_k = tl.max_contiguous(tl.multiple_of(start * PER + tl.arange(0, BLOCK_K), BLOCK_K), BLOCK_K)
        b = _dequant_tile_kn(w_ptr, s_ptr, z_ptr, cb_ptr, offs_u, offs_n, N, K, units,
                             stride_wn, stride_sn, stride_zw,
                             FORMAT, BITS, PER, GROUP, HAS_ZERO, BLOCK_U, BLOCK_N)
        a_mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]
        if SWAP_AB:
            a_t = tl.load(x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None], mask=tl.trans(a_mask), other=0.0)
            if DOT_FP32:
                acc_t = tl.dot(tl.trans(b), a_t.to(tl.float32), acc_t)
            else:
                acc_t = tl.dot(tl.trans(b).to(a_t.dtype), a_t, acc_t)
        else:
            a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=a_mask, other=0.0)
            if DOT_FP32:
                acc = tl.dot(a.to(tl.float32), b, acc)
            else:
                acc = tl.dot(a, b.to(a.dtype), acc)
    if SWAP_AB:
        acc = tl.trans(acc_t)
    _store_tile(acc, b_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def _store_tile(acc, b_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, pid_k,
                HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Add the bias (first split only) and store, or atomically add into a float32 workspace."""
    n_mask = offs_n < N
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, bias, 0.0)[None, :]
    ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    mask = (offs_m < M)[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ptrs, acc, mask=mask)


@triton.jit
def w8a8_gemm_kernel(
    xq_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, out_ptr,
    M, N, K, k_per_split,
    stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """int8 x int8 -> int32 GEMM; epilogue ``acc * x_scale[m] * w_scale[n] + bias``.

    xq: int8 [M, K]; xs: float32 [M]; w: int8 [N, K]; ws: float32 [N]. grid (M*N blocks, SPLIT_K).
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = _grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    for start in range(pid_k * k_per_split, (pid_k + 1) * k_per_split, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(xq_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m < M)[:, None] & k_mask[None, :], other=0)
        b = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None],
                    mask=k_mask[:, None] & (offs_n < N)[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    xs = tl.load(xs_ptr + offs_m, mask=offs_m < M, other=0.0)
    ws = tl.load(ws_ptr + offs_n, mask=offs_n < N, other=0.0)
    out = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    _store_tile(out, b_ptr, out_ptr, offs_m, offs_n, M, N, stride_om, pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def quantize_per_token_kernel(x_ptr, xq_ptr, xs_ptr, K, stride_xm, stride_qm, BLOCK_K: tl.constexpr):
    """Symmetric int8 per row, as vLLM's dynamic per-token quantization; grid (M,).

    ``xs = max|x| / 127``; ``xq = round_half_even(x * (127 / max|x|))`` (0 for an all-zero row,
    whose scale is 0). x: fp16/bf16/fp32 [M, K]; xq: int8 [M, K]; xs: float32 [M].
    """
    row = tl.program_id(0)
    absmax = tl.zeros([BLOCK_K], tl.float32)
    for start in range(0, K, BLOCK_K):
        offs = start + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
        absmax = tl.maximum(absmax, tl.abs(x))
    amax = tl.zeros([BLOCK_K], tl.float32) + tl.max(absmax, axis=0)
    inverse = tl.where(amax > 0, tl.math.div_rn(tl.zeros_like(amax) + 127.0, tl.maximum(amax, 1e-30)), 0.0)
    scale = tl.math.div_rn(amax, tl.zeros_like(amax) + 127.0)
    tl.store(xs_ptr + row + tl.arange(0, BLOCK_K), scale, mask=tl.arange(0, BLOCK_K) < 1)
    for start in range(0, K, BLOCK_K):
        offs = start + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
        q = (x * inverse + 12582912.0) - 12582912.0  # 1.5 * 2**23: float addition rounds half to even
        q = tl.minimum(tl.maximum(q, -128.0), 127.0)
        tl.store(xq_ptr + row * stride_qm + offs, q.to(tl.int8), mask=offs < K)
