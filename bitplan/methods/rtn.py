"""Round-to-nearest (RTN): the baseline every other method is measured against."""

from __future__ import annotations

import torch

from bitplan.kernels.numerics import grouped
from bitplan.methods.scheme import QuantizedWeight, Scheme


def integer_range(bits: int) -> tuple[int, int]:
    """Signed code range stored by compressed-tensors for ``bits``-bit integers."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def quantize_params(
    weight: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min/max scale and zero point per group, with the scale rounded to its storage dtype.

    Symmetric: ``scale = absmax / ((2**bits - 1) / 2)`` and no zero point, as compressed-tensors'
    ``calculate_qparams`` computes it: the range spreads over all 2**bits codes, so the step is
    ``2·absmax / (2**bits - 1)`` and no weight is more than half a step from a level (+absmax is
    clamped to qmax, half a step below it); ``absmax / qmax`` would leave qmin unused and a 2-bit
    group with three levels, not four. Asymmetric: ``scale = (max - min) / (2**bits - 1)`` and an
    integer zero point ``qmin - round(min / scale)``, as compressed-tensors stores it. Scales are
    rounded to ``scale_dtype`` first so codes match the stored scale.
    """
    qmin, qmax = integer_range(scheme.bits)
    groups = grouped(weight.to(torch.float32), scheme.group_size)
    tiny = torch.finfo(torch.float32).tiny
    if scheme.symmetric:
        absmax = groups.abs().amax(dim=-1)
        scale = (absmax / ((qmax - qmin) / 2)).clamp_min(tiny).to(scale_dtype)
        scale = torch.where(scale.to(torch.float32) == 0, torch.ones_like(scale), scale)
        return scale, None
    low = groups.amin(dim=-1).clamp_max(0.0)
    high = groups.amax(dim=-1).clamp_min(0.0)
    scale = ((high - low) / (qmax - qmin)).to(scale_dtype)
    scale = torch.where(scale.to(torch.float32) == 0, torch.ones_like(scale), scale)
    zero = (qmin - torch.round(low / scale.to(torch.float32))).clamp(qmin, qmax).to(torch.int8)
    return scale, zero


def codes_for(
    weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: Scheme
) -> torch.Tensor:
    """Round each weight to the nearest code on the given grid, clamped to the code range."""
    qmin, qmax = integer_range(scheme.bits)
    groups = grouped(weight.to(torch.float32), scheme.group_size)
    codes = torch.round(groups / scale.to(torch.float32).unsqueeze(-1))
    if zero is not None:
        codes = codes + zero.to(torch.float32).unsqueeze(-1)
    return codes.clamp(qmin, qmax).to(torch.int8).reshape(weight.shape)


def quantize_rtn(weight: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype = torch.bfloat16) -> QuantizedWeight:
    """Quantize a ``[out, in]`` weight by round-to-nearest under ``scheme``."""
    scale, zero = quantize_params(weight, scheme, scale_dtype)
    return QuantizedWeight(codes_for(weight, scale, zero, scheme), scale, zero, scheme)
