"""The reference kernel: dequantize, then ``F.linear``. Every other kernel is checked against it."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dequantize_codes(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(codes - zero) * scale`` with one scale per ``group_size`` inputs (0: per channel).

    codes: int8 ``[out, in]``; scale: ``[out, groups]``; zero: int8 ``[out, groups]`` or None.
    Arithmetic is float32; the result is cast to ``dtype``.
    """
    out_features, in_features = codes.shape
    width = in_features if group_size == 0 else group_size
    values = codes.to(torch.float32, copy=True).view(out_features, -1, width)  # one float32 copy, worked in place
    if zero is not None:
        values.sub_(zero.to(torch.float32).unsqueeze(-1))
    values.mul_(scale.to(torch.float32).unsqueeze(-1))
    return values.reshape(out_features, in_features).to(dtype)


DEQUANT_ROWS_ELEMENTS = 2**26  # weights above this many elements are dequantized a row range at a time


def linear_reference(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ dequant(W).T + bias`` computed in x's dtype (float32 math on CPU). A weight of more than
    ``DEQUANT_ROWS_ELEMENTS`` is dequantized a row range at a time (a 128k-vocabulary head: never
    2 GB of float32 at once); each output is the same row's product either way."""
    rows = max(1, DEQUANT_ROWS_ELEMENTS // codes.shape[1])
    if codes.shape[0] <= rows:
        return F.linear(x, dequantize_codes(codes, scale, zero, group_size, dtype=x.dtype), bias)
    parts = []
    for start in range(0, codes.shape[0], rows):
        stop = start + rows
        weight = dequantize_codes(codes[start:stop], scale[start:stop], None if zero is None else zero[start:stop], group_size, dtype=x.dtype)
        parts.append(F.linear(x, weight, None if bias is None else bias[start:stop]))
    return torch.cat(parts, dim=-1)
