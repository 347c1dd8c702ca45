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
``amax / (2^(b-1) + 0.1·k)`` for k in -9..9 (llama.cpp's; k = -5 is RTN's step), each refit by least
squares, the best kept; and the same for the negated group, whose scale is then negative, so that
the largest weight may take the code -2^(b-1) whatever its sign, as ggml's signed scale allows.
Codes are then taken against the stored (rounded) scale, as RTN does. ``imatrix-w4g32s`` is
Q4_0's grid and search (ggml tries only the sign that maps the largest weight to -8).
"""

from __future__ import annotations

import torch

from bitplan.kernels.numerics import grouped
from bitplan.methods.rtn import codes_for, integer_range
from bitplan.methods.scheme import QuantizedWeight, Scheme

STEPS = tuple(0.1 * k for k in range(-9, 10))  # the divisor's offsets from 2^(b-1), as llama.cpp's 19 (k = -5 is RTN's)


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
    scale = torch.where(live, scale, torch.ones_like(scale)).to(scale_dtype)
    tiny = torch.finfo(torch.float32).tiny
    scale = torch.where(scale.to(torch.float32).abs() > tiny, scale, torch.ones_like(scale))
    return QuantizedWeight(codes_for(weight, scale, None, scheme), scale, None, scheme)
