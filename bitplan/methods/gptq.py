"""GPTQ (Frantar et al. 2022, arXiv:2210.17323): second-order, column-by-column quantization.

The layer-wise objective is ‖W X − Q X‖², whose Hessian in each row of W is H = 2 X Xᵀ / n.
Columns are quantized one at a time on the integer grid of :mod:`bitplan.methods.rtn`; the
rounding error of each column is spread over the columns not yet quantized through the upper
Cholesky factor of H⁻¹ (the "Cholesky reformulation", section 3.3), in blocks of 128 columns
with lazy batch updates (section 3.2). This follows the reference implementation
(IST-DASLab ``gptq.py``), with two documented choices:

- Group parameters (scale, zero) are computed when GPTQ reaches a group's first column, from
  the *current* (error-updated) weights, as the reference does. Inside a block we read the
  updated values (the reference reads the not-yet-updated copy when a group starts mid-block).
- act-order (columns by decreasing diag(H)) uses *static* groups: the parameters of each
  contiguous group are computed from the original weights before the permutation, so the
  result is stored without a ``g_idx`` (compressed-tensors ``actorder: weight``).

The returned loss is Σ_rows ½ ΔW H ΔWᵀ with the damped H actually used, exactly (up to float
rounding): with H = 2 X Xᵀ / n it is ‖(W − Q) X‖²_F / n, a free sensitivity signal.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace

import torch

from bitplan.methods.rtn import integer_range, quantize_params
from bitplan.methods.scheme import QuantizedWeight, Scheme

log = logging.getLogger(__name__)


BLOCK = 128  # lazy-update width
DAMP = 0.01  # fraction of mean(diag H) added to the diagonal
SHRINK = 0.5  # the planner's GPTQ: H's off-diagonal scaled by 1 - SHRINK (shrunk toward its diagonal; see gptq_rows)
ACT_ORDER = False  # columns in their own order (static groups either way)

def inverse_hessian_factor(H: torch.Tensor, damp: float, remake: Callable[[], torch.Tensor] | None = None) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = damp · mean(diag H), and λ.

    If H + λI is not positive definite (too few or degenerate calibration rows), λ is raised
    tenfold up to four times, with a warning. The factor is computed in one matrix besides ``H``
    (in place: factor, inverse, factor), which for a 14336-input Linear is 0.8 GB, not 2.5. With
    ``remake`` (a function that returns a fresh ``H``), ``H`` is the caller's to overwrite: the
    factor is made in ``H`` itself, no second matrix, and ``remake`` gives ``H`` again should more
    damping be needed.
    """
    mean_diag = float(torch.diag(H).mean())
    info = torch.empty((), dtype=torch.int32)
    for attempt in range(5):
        lam = damp * (10.0**attempt) * mean_diag
        if remake is None:
            A = H.clone()
        else:
            A = H if attempt == 0 else remake()
            H = None  # overwritten below: a retry remakes it
        A.diagonal().add_(lam)
        torch.linalg.cholesky_ex(A, out=(A, info))
        if int(info) == 0:
            if attempt:
                log.warning("GPTQ: Hessian needed damping %.3g to be positive definite", damp * 10.0**attempt)
            torch.cholesky_inverse(A, out=A)
            torch.linalg.cholesky(A, upper=True, out=A)
            return A, lam
        del A
    raise ValueError("GPTQ: Hessian is not positive definite even with 10000x damping")


@contextmanager
def _one_thread():
    """Run the column loop on one intra-op thread, restoring the setting afterwards.

    The loop is thousands of tiny tensor ops; with several threads each op pays a parallel
    region's synchronisation, and on shared cores a descheduled worker stalls all of them.
    Measured on this 2-core machine: every Linear of smollm2-135m at 4 bits in 10 s on one
    thread, 28-97 s on two (``bench/method_speed.py``).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _static_column_params(
    W: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype, perm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Group params from the original weights, and their per-column copies in ``perm`` order."""
    scale, zero = quantize_params(W, scheme, scale_dtype)
    width = W.shape[1] if scheme.group_size == 0 else scheme.group_size
    group_of_column = perm // width
    scale_cols = scale.to(torch.float32)[:, group_of_column]
    zero_cols = None if zero is None else zero.to(torch.float32)[:, group_of_column]
    return scale, zero, scale_cols, zero_cols


def _gptq_columns(
    Wt: torch.Tensor,
    Hinv: torch.Tensor,
    scheme: Scheme,
    scale_dtype: torch.dtype,
    block: int,
    lazy_groups: bool,
    scale_cols: torch.Tensor | None,
    zero_cols: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor | None]]:
    """The blocked GPTQ loop over the columns of a weight, given as its transpose ``Wt`` ``[in, out]``
    (already permuted; a column is a contiguous row), which it updates in place.

    Returns codes ``[in, out]`` (int8, in ``Wt``'s row order), per-row losses of the weight, and,
    for lazy groups, the list of group scales and zeros in column order.
    """
    qmin, qmax = integer_range(scheme.bits)
    columns = Wt.shape[0]
    codes_t = torch.zeros(Wt.shape, dtype=torch.int8)  # the codes are integers in int8's range: stored as such, not as float
    row_losses = torch.zeros(Wt.shape[1], dtype=torch.float32)
    group_scales: list[torch.Tensor] = []
    group_zeros: list[torch.Tensor | None] = []
    width = columns if scheme.group_size == 0 else scheme.group_size
    channel_scheme = replace(scheme, group_size=0)
    scale = zero = None
    for i1 in range(0, columns, block):
        i2 = min(i1 + block, columns)
        W1 = Wt[i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if lazy_groups and col % width == 0:
                current = W1[i:i + width]
                if current.shape[0] < width:  # a group wider than the rest of this block
                    current = torch.cat([current, Wt[i2:i2 + width - current.shape[0]]])
                current = current.T
                params = quantize_params(current, channel_scheme, scale_dtype)
                group_scales.append(params[0])
                group_zeros.append(params[1])
                scale = params[0].to(torch.float32).squeeze(1)
                zero = None if params[1] is None else params[1].to(torch.float32).squeeze(1)
            elif not lazy_groups:
                scale = scale_cols[:, col]
                zero = None if zero_cols is None else zero_cols[:, col]
            w = W1[i]
            code = torch.round(w / scale)
            if zero is not None:
                code = code + zero
            code = code.clamp(qmin, qmax)
            q = (code - zero) * scale if zero is not None else code * scale
            codes_t[col] = code
            d = Hinv1[i, i]
            err = (w - q) / d
            row_losses += err.square() / 2
            W1[i:] -= Hinv1[i, i:].unsqueeze(1) * err.unsqueeze(0)
            Err1[i] = err
        Wt[i2:] -= Hinv[i1:i2, i2:].T @ Err1
    return codes_t, row_losses, group_scales, group_zeros


def gptq_rows(
    weight: torch.Tensor,
    H: torch.Tensor | Callable[[], torch.Tensor],
    scheme: Scheme,
    block: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    scale_dtype: torch.dtype = torch.bfloat16,
    shrink: float = 0.0,
) -> tuple[QuantizedWeight, torch.Tensor]:
    """GPTQ of a ``[out, in]`` weight; returns the quantized weight and the loss of each row.

    Rows are independent given H, so Linears that share an input (q/k/v, gate/up) can be
    quantized in one call on their concatenated rows and split afterwards.
    ``H`` may be a function that makes it (``InputStats.hessian``): GPTQ then owns the matrix and
    factors it in place, so a 14336-input Linear holds one 0.8 GB matrix, not two. The weight is
    held once in float32, as its transpose (the loop's layout), and the codes in int8.

    ``shrink`` in [0, 1] shrinks H toward its diagonal, ``(1 - shrink) H + shrink diag(H)``: the
    per-input weights (what AWQ and llama.cpp's importance matrix use) are kept and the
    correlations between inputs, which a few thousand calibration tokens of one kind of text
    estimate poorly, count less. On SmolLM2-135M (16 x 512 tokens of Python documentation,
    uniform g64) 0.5 took held-out KL at 3 bits from 1.37 to 0.71 on unseen documentation and from
    3.69 to 1.50 on English prose, at 4 bits from 0.26 to 0.16 and 0.58 to 0.34 (README, issue 11).
    The losses returned are under the H actually used (shrunk and damped).
    """
    if not 0.0 <= shrink <= 1.0:
        raise ValueError(f"shrink must lie in [0, 1], got {shrink}")
    if not scheme.fits(weight.shape[1]):
        raise ValueError(f"group {scheme.group_size} does not divide {weight.shape[1]} inputs")
    columns = weight.shape[1]

    def prepared() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """H as the loop uses it (float32, dead inputs' diagonal 1, permuted for act-order), its
        dead inputs, the column order, and whether the matrix is a copy of the caller's."""
        given = (H() if callable(H) else H).detach()
        made = given.to(torch.float32)
        owned = callable(H) or made is not given  # a float32 tensor of the caller's is used as it is, never changed
        if made.shape != (columns, columns):
            raise ValueError(f"Hessian shape {tuple(made.shape)} does not match weight inputs {columns}")
        if shrink:
            if not owned:
                made, owned = made.clone(), True
            diagonal = made.diagonal().clone()
            made.mul_(1.0 - shrink)
            made.diagonal().copy_(diagonal)
        dead = torch.diag(made) == 0
        if bool(dead.any()):  # a copy only then: the caller's H is not changed
            if not owned:
                made, owned = made.clone(), True
            made[dead, dead] = 1.0
        order = torch.argsort(torch.diag(made), descending=True, stable=True) if act_order else torch.arange(columns)
        if act_order:
            made, owned = made[order][:, order], True
        return made, dead, order, owned

    hessian, dead, perm, owned = prepared()
    Wt = torch.empty(columns, weight.shape[0], dtype=torch.float32)
    Wt.copy_(weight.detach().T)  # the weight's one float32 working copy, transposed
    Wt[dead] = 0.0
    lazy = not act_order and scheme.group_size != 0
    scale = zero = scale_cols = zero_cols = None
    if not lazy:
        scale, zero, scale_cols, zero_cols = _static_column_params(Wt.T, scheme, scale_dtype, perm)
    if act_order:
        Wt = Wt[perm]
    Hinv, _ = inverse_hessian_factor(hessian, damp, (lambda: prepared()[0]) if owned else None)
    del hessian  # the factor, when it was made in place
    with _one_thread():
        codes_t, row_losses, group_scales, group_zeros = _gptq_columns(Wt, Hinv, scheme, scale_dtype, block, lazy, scale_cols, zero_cols)
    del Wt, Hinv
    codes = (codes_t[torch.argsort(perm)] if act_order else codes_t).T.contiguous()
    if lazy:
        scale = torch.cat(group_scales, dim=1)
        zero = None if scheme.symmetric else torch.cat(group_zeros, dim=1)
    return QuantizedWeight(codes, scale, zero, scheme), row_losses


def quantize_gptq(
    weight: torch.Tensor,
    H: torch.Tensor | Callable[[], torch.Tensor],
    scheme: Scheme,
    block: int = BLOCK,
    damp: float = DAMP,
    act_order: bool = ACT_ORDER,
    scale_dtype: torch.dtype = torch.bfloat16,
    shrink: float = 0.0,
) -> tuple[QuantizedWeight, float]:
    """GPTQ-quantize ``weight`` ``[out, in]`` given its input Hessian ``H`` ``[in, in]``.

    ``H`` is 2 X Xᵀ / n (``InputStats.hessian``, or that function: see :func:`gptq_rows`); ``damp``
    is the fraction of mean(diag H) added to the diagonal; ``block`` the lazy-update width;
    ``act_order`` processes columns by decreasing diag(H) with static groups; ``shrink`` moves H
    toward its diagonal (:func:`gptq_rows`; the planner uses ``SHRINK``). Returns the
    quantized weight on the same grid as RTN (emits as pack-quantized) and the loss
    Σ ½ ΔW H ΔWᵀ = ‖(W − Q) X‖² / n.
    """
    quantized, row_losses = gptq_rows(weight, H, scheme, block, damp, act_order, scale_dtype, shrink)
    return quantized, float(row_losses.sum())


def split_rows(quantized: QuantizedWeight, sizes: list[int]) -> list[QuantizedWeight]:
    """Split a weight quantized on concatenated rows back into its Linears (row counts ``sizes``)."""
    codes = quantized.codes.split(sizes)
    scales = quantized.scale.split(sizes)
    zeros = [None] * len(sizes) if quantized.zero is None else quantized.zero.split(sizes)
    return [QuantizedWeight(c.contiguous(), s.contiguous(), None if z is None else z.contiguous(), quantized.scheme)
            for c, s, z in zip(codes, scales, zeros)]
