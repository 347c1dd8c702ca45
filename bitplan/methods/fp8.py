"""FP8 E4M3 weights (per channel or per group) and W8A8-FP8 with dynamic per-token activations.

Weights: scale = absmax / 448 per output channel (or per group of inputs), values =
E4M3(clamp(W / scale, ±448)) with round-to-nearest-even (torch's cast). This is
compressed-tensors ``float-quantized``: ``weight`` float8_e4m3fn ``[out, in]`` and
``weight_scale`` float32 ``[out, groups]`` (strategy ``channel`` or ``group``).

Activations (W8A8-FP8, where the target has FP8 tensor cores): as vLLM's
``dynamic_per_token_scaled_fp8_quant``: scale = max(absmax / 448, 1 / (448·512)) per token,
values = E4M3(clamp(x / scale, ±448)) (a division, not a multiplication by the reciprocal).
The GEMM multiplies E4M3 values exactly and accumulates in float32; we accumulate in float64,
which differs from a device only in accumulation rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitplan.kernels.numerics import E4M3, E4M3_MAX, grouped, per_token_fp8, to_e4m3


@dataclass(frozen=True)
class Fp8Weight:
    """``values`` float8_e4m3fn ``[out, in]``; ``scale`` float32 ``[out, groups]``; group 0 = per channel."""

    values: torch.Tensor
    scale: torch.Tensor
    group_size: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        groups = grouped(self.values.to(torch.float32), self.group_size)
        return (groups * self.scale.to(torch.float32).unsqueeze(-1)).reshape(self.values.shape).to(dtype)


def quantize_fp8(weight: torch.Tensor, group_size: int = 0, scale_dtype: torch.dtype = torch.float32) -> Fp8Weight:
    """E4M3 weight with one scale per output channel (``group_size`` 0) or per group of inputs."""
    if group_size and weight.shape[1] % group_size:
        raise ValueError(f"group {group_size} does not divide {weight.shape[1]} inputs")
    groups = grouped(weight.detach().to(torch.float32), group_size)
    absmax = groups.abs().amax(dim=-1)
    scale = (absmax / E4M3_MAX).to(scale_dtype)
    scale = torch.where(scale.to(torch.float32) > 0, scale, torch.ones_like(scale))
    values = to_e4m3(groups / scale.to(torch.float32).unsqueeze(-1)).reshape(weight.shape)
    return Fp8Weight(values, scale, group_size)


def fp8_linear(x: torch.Tensor, weight: Fp8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8-FP8 Linear: E4M3 activations per token × E4M3 weights per channel, scaled after the GEMM."""
    if weight.group_size != 0:
        raise ValueError("W8A8-FP8 runs with per-channel weight scales; use weight-only FP8 for groups")
    values, token_scale = per_token_fp8(x)
    accumulated = values.to(torch.float64) @ weight.values.to(torch.float64).T
    out = accumulated.to(torch.float32) * token_scale * weight.scale.to(torch.float32).reshape(1, -1)
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(x.dtype)


def representable_values() -> torch.Tensor:
    """Every finite E4M3 value (both zeros included once), float32, sorted."""
    codes = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(E4M3).to(torch.float32)
    return torch.unique(codes[torch.isfinite(codes)])
