"""The number systems the formats decode to, shared by the methods that write them and the
kernels that run them: NF4's code book, E4M3, and dynamic per-token activation rounding.

Per-token activations are rounded as vLLM's kernels do it:

- int8: ``scale = max|x| / 127`` per token (0 for an all-zero token), codes
  ``round_half_even(x * (127 / max|x|))`` (``scaled_int8_quant``);
- FP8: ``scale = max(max|x| / 448, 1 / (448 * 512))`` per token, values
  ``E4M3(clamp(x / scale, ±448))``, a division (``dynamic_per_token_scaled_fp8_quant``).
"""

from __future__ import annotations

import torch

# The NF4 data type, QLoRA (arXiv:2305.14314) appendix E, identical to bitsandbytes' NF4 code.
NF4_CODE_BOOK = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
MIN_TOKEN_SCALE = 1.0 / (E4M3_MAX * 512.0)


def nf4_code_book() -> torch.Tensor:
    """The 16 NF4 levels as a float32 tensor, ascending."""
    return torch.tensor(NF4_CODE_BOOK, dtype=torch.float32)


def grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """View ``[out, in]`` as ``[out, groups, width]`` (group 0: one group per row)."""
    out_features, in_features = weight.shape
    width = in_features if group_size == 0 else group_size
    return weight.reshape(out_features, in_features // width, width)


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Saturating cast to E4M3 (the cast alone would turn |x| > 448 into NaN)."""
    return x.to(torch.float32).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def per_token_int(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token symmetric integers: (codes float32 ``[..., in]`` holding integers, scale ``[..., 1]``)."""
    qmax = float((1 << (bits - 1)) - 1)
    x32 = x.to(torch.float32)
    absmax = x32.abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(absmax > 0, qmax / absmax.clamp_min(1e-30), torch.zeros_like(absmax))
    codes = torch.round(x32 * inverse).clamp(-qmax - 1, qmax)
    return codes, absmax / qmax


def per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token E4M3: (values float8 ``[..., in]``, scale float32 ``[..., 1]``)."""
    x32 = x.to(torch.float32)
    scale = (x32.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).clamp_min(MIN_TOKEN_SCALE)
    return to_e4m3(x32 / scale), scale


def fake_quant_activations(x: torch.Tensor, fmt: str, bits: int = 8) -> torch.Tensor:
    """The input a W8A8 Linear effectively multiplies after per-token rounding ("int8" or "fp8")."""
    if fmt == "fp8":
        values, scale = per_token_fp8(x)
        return (values.to(torch.float32) * scale).to(x.dtype)
    codes, scale = per_token_int(x, bits)
    return (codes * scale).to(x.dtype)
