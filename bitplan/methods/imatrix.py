"""Importance-weighted round-to-nearest: llama.cpp's scale search with an importance matrix, on
the symmetric integer grids every engine stores.

llama.cpp quantizes ``Q4_0``/``Q5_0`` with an importance matrix (``quantize_row_q4_0_impl``):
each block's scale is chosen among 19 candidates around absmax by the weighted error
``Σ w_j (x_j - s·l_j)²`` with ``w_j = imatrix_j · sqrt(σ²_row + x_j²)`` (``imatrix_j``: the mean of
input column j's square over the calibration tokens; ``σ²_row``: the row's mean square), and the
scale is refit by weighted least squares for the codes it chose (``make_qx_quants``, rmse_type 1).
The weights use nothing of the calibration text but one number per input column, so what they
learn carries to other text (bench/peers.py: llama.cpp's imatrix presets and bitplan's GGUF plans
measure nearly the same KL on fortunes as on the calibration domain, where GPTQ does not).

Here the same search runs on bitplan's symmetric grids (any bit width and group, codes in
``[-2^(b-1), 2^(b-1) - 1]``, one signed scale per group, what compressed-tensors'
``pack-quantized`` and bitplan's kernels decode as ``code · scale``): candidate steps
``amax / (2^(b-1) + k)`` for llama.cpp's offsets k = -0.9..0.9 (k = -0.5 is RTN's step) and,
clipping further, k = 1.0..6.0 in steps of 0.2, each refit by least squares, the best kept; and
the same for the negated group, whose scale is then negative, so that the largest weight may take
the code -2^(b-1) whatever its sign, as ggml's signed scale allows. The stored (rounded) scale is
then refined: nearest codes, their least-squares scale, kept per group only where the weighted
error drops (``refine_scale``). Codes are taken against the stored scale, as RTN does.
``imatrix-w4g32s`` is Q4_0's grid; its search is a superset of ggml's (which tries only the
sign that maps the largest weight to -8 and the 19 steps), so its weighted error is at most Q4_0's.
"""

from __future__ import annotations

import torch

from bitplan.kernels.numerics import grouped
from bitplan.methods.rtn import codes_for, integer_range
from bitplan.methods.scheme import QuantizedWeight, Scheme

# The divisor's offsets from 2^(b-1): llama.cpp's 19 (0.1·k, k = -9..9; k = -5 is RTN's step), then
# coarser ones that clip further, to 2^(b-1) + 6 (bench: held-out output error energy of SmolLM2's
# 210 Linears 8% lower at 3 bits, 7% at 4, 4% at 5, 2% at 6, with the refinement below).
STEPS = tuple(0.1 * k for k in range(-9, 10)) + tuple(0.2 * k for k in range(5, 31))
REFINE_ITERATIONS = 4  # passes of codes-then-scale after the search (refine_scale)


def importance_weights(weight: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    """``w_j = imatrix_j · sqrt(σ²_row + x_j²)`` (llama.cpp's ``quantize_row_q4_0_impl``); without an
    importance vector (no calibration token reached the layer) ``x²``, ggml's own default."""
    if importance is None:
        return weight * weight
    sigma2 = (weight * weight).mean(dim=1, keepdim=True)
    return importance.to(weight.dtype)[None, :] * torch.sqrt(sigma2 + weight * weight)


def search_scale(groups: torch.Tensor, weights: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The least-squares scale ``[out, groups]`` of the best of the candidate steps by weighted squared
    error, and that error's reduction ``(Σwxl)² / Σwl²`` (larger is better; -1 where no candidate
    is usable, as in an all-zero group), for positive scales
    (``groups``/``weights``: ``[out, groups, width]`` float32)."""
    qmin, qmax = integer_range(bits)
    amax = groups.abs().amax(dim=-1)
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    best_gain = torch.full_like(amax, -1.0)
    best_scale = amax / (qmax + 0.5)  # RTN's step: kept where every candidate is degenerate
    for offset in STEPS:
        inverse = (qmax + 1 + offset) / amax
        codes = torch.round(groups * inverse.unsqueeze(-1)).clamp_(qmin, qmax)
        sumlx = (weights * groups * codes).sum(dim=-1)
        suml2 = (weights * codes * codes).sum(dim=-1)
        ok = (suml2 > 0) & (sumlx > 0)
        safe = torch.where(ok, suml2, torch.ones_like(suml2))
        gain = torch.where(ok, sumlx * sumlx / safe, torch.full_like(suml2, -1.0))
        better = gain > best_gain  # the first of equals, as llama.cpp's strict comparison keeps it
        best_gain = torch.where(better, gain, best_gain)
        best_scale = torch.where(better, sumlx / safe, best_scale)
    return best_scale, best_gain


def quantize_imatrix(weight: torch.Tensor, scheme: Scheme, importance: torch.Tensor | None,
                     scale_dtype: torch.dtype = torch.bfloat16) -> QuantizedWeight:
    """Quantize a ``[out, in]`` weight on the symmetric ``scheme`` grid with the importance-weighted scale search."""
    if not scheme.symmetric:
        raise ValueError(f"{scheme}: the importance-weighted search is symmetric only")
    weight = weight.to(torch.float32)
    groups = grouped(weight, scheme.group_size)
    weights = grouped(importance_weights(weight, importance), scheme.group_size)
    up, up_gain = search_scale(groups, weights, scheme.bits)  # the largest weight on the +2^(b-1)-1 side
    down, down_gain = search_scale(-groups, weights, scheme.bits)  # or, with a negative scale, on the -2^(b-1) side
    scale = torch.where(down_gain > up_gain, -down, up)
    live = groups.abs().amax(dim=-1) > 0
    scale = stored(torch.where(live, scale, torch.ones_like(scale)), scale_dtype)
    scale = refine_scale(groups, weights, scale, scheme.bits, scale_dtype, REFINE_ITERATIONS)
    return QuantizedWeight(codes_for(weight, scale, None, scheme), scale, None, scheme)


def stored(scale: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """``scale`` as stored: rounded to ``scale_dtype``, a scale that rounds to zero stored as one."""
    scale = scale.to(scale_dtype)
    tiny = torch.finfo(torch.float32).tiny
    return torch.where(scale.to(torch.float32).abs() > tiny, scale, torch.ones_like(scale))


def weighted_error(groups: torch.Tensor, weights: torch.Tensor, scale: torch.Tensor, bits: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``Σ w (x - s·l)²`` per group for the nearest codes ``l`` at the stored ``scale``, and those codes."""
    qmin, qmax = integer_range(bits)
    step = scale.to(torch.float32).unsqueeze(-1)
    codes = torch.round(groups / step).clamp_(qmin, qmax)
    return (weights * (groups - step * codes) ** 2).sum(dim=-1), codes


def refine_scale(groups: torch.Tensor, weights: torch.Tensor, scale: torch.Tensor, bits: int,
                 scale_dtype: torch.dtype, iterations: int) -> torch.Tensor:
    """Alternate nearest codes and their weighted least-squares scale (as ``make_q3_quants``'s
    refinement passes do), keeping a group's new stored scale only where its weighted error drops:
    never worse than ``scale``, and each pass lowers ``Σ w (x - s·l)²`` for the codes the engine decodes."""
    error, codes = weighted_error(groups, weights, scale, bits)
    for _ in range(iterations):
        suml2 = (weights * codes * codes).sum(dim=-1)
        sumlx = (weights * groups * codes).sum(dim=-1)
        fitted = sumlx / suml2.clamp_min(torch.finfo(torch.float32).tiny)
        candidate = stored(torch.where(suml2 > 0, fitted, scale.to(torch.float32)), scale_dtype)
        new_error, new_codes = weighted_error(groups, weights, candidate, bits)
        better = new_error < error
        if not bool(better.any()):
            break
        scale = torch.where(better, candidate, scale)
        error = torch.where(better, new_error, error)
        codes = torch.where(better.unsqueeze(-1), new_codes, codes)
    return scale
