"""NF4 (Dettmers et al. 2023, QLoRA, arXiv:2305.14314): 4-bit NormalFloat with per-block absmax.

Each block of ``block_size`` consecutive inputs of a row is divided by its absmax and every
value is replaced by the nearest of 16 NormalFloat levels (the table of the paper's appendix,
:data:`bitplan.kernels.numerics.NF4_CODE_BOOK`; :func:`normal_float_levels` rebuilds it from normal quantiles).

Double quantization (section 3 of the paper): the float32 absmax constants c₁ are centred by
their mean and quantized to 8-bit floats in blocks of 256, each block with a float32 scale.
The paper specifies "8-bit Floats with a blocksize of 256"; bitsandbytes uses its own 8-bit
"dynamic" map for this, we use the standard FP8 E4M3 (absmax of the block → 448).

No standard compressed-tensors format holds NF4; bitplan writes its own layout (see
``kernels.layout.nf4_weight_bytes``): ``weight_packed`` uint8 ``[out, in/2]`` with two code
indices per byte (even input in the low nibble), ``weight_absmax`` float32 ``[out, blocks]``,
or with double quantization ``weight_absmax_codes`` float8_e4m3fn ``[out·blocks]``,
``weight_absmax_scale`` float32 ``[ceil(out·blocks/256)]`` and ``weight_absmax_offset``
float32 ``[1]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bitplan.kernels.numerics import E4M3_MAX, nf4_code_book, to_e4m3

NF4_OFFSET = 0.9677083  # QLoRA: 1 − ½(1/30 + 1/32), the outermost quantile of the 15/16-level halves
DOUBLE_QUANT_BLOCK = 256


def normal_float_levels(offset: float = NF4_OFFSET) -> torch.Tensor:
    """Rebuild NF4 from N(0,1) quantiles as the paper describes (8 positive, 7 negative, exact 0).

    Positive half: quantiles of ``linspace(offset, 0.5, 9)`` (last dropped); negative half:
    ``linspace(offset, 0.5, 8)`` (last dropped), negated; normalised to [−1, 1].
    """
    normal = torch.distributions.Normal(0.0, 1.0)
    positive = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return (levels / levels.abs().max()).to(torch.float32)


@dataclass(frozen=True)
class DoubleQuantizedAbsmax:
    """c₁ ≈ E4M3 code · block scale + offset, blocks of 256 over the flattened constants."""

    codes: torch.Tensor  # float8_e4m3fn [n]
    scale: torch.Tensor  # float32 [ceil(n / 256)]
    offset: torch.Tensor  # float32 [1]

    def dequantize(self) -> torch.Tensor:
        n = self.codes.numel()
        values = self.codes.to(torch.float32)
        scale = self.scale.repeat_interleave(DOUBLE_QUANT_BLOCK)[:n]
        return values * scale + self.offset


@dataclass(frozen=True)
class Nf4Weight:
    """``codes`` uint8 ``[out, in]`` (indices 0..15); ``absmax`` float32 ``[out, blocks]`` or a
    :class:`DoubleQuantizedAbsmax`; ``block_size`` inputs per absmax."""

    codes: torch.Tensor
    absmax: torch.Tensor | DoubleQuantizedAbsmax
    block_size: int

    def block_absmax(self) -> torch.Tensor:
        """The absmax constants the dequantizer uses, float32 ``[out, blocks]``."""
        out_features, in_features = self.codes.shape
        if isinstance(self.absmax, DoubleQuantizedAbsmax):
            return self.absmax.dequantize().reshape(out_features, in_features // self.block_size)
        return self.absmax

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out_features, in_features = self.codes.shape
        levels = nf4_code_book()[self.codes.to(torch.int64)].reshape(out_features, -1, self.block_size)
        return (levels * self.block_absmax().unsqueeze(-1)).reshape(out_features, in_features).to(dtype)


def nearest_level(normalised: torch.Tensor) -> torch.Tensor:
    """Index of the nearest NF4 level for values in [−1, 1] (ties go to the lower level), uint8."""
    levels = nf4_code_book()
    midpoints = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(normalised.contiguous(), midpoints, right=False).to(torch.uint8)


def double_quantize(absmax: torch.Tensor) -> DoubleQuantizedAbsmax:
    """Centre the constants by their mean, then E4M3 with one float32 scale per 256 of them."""
    flat = absmax.reshape(-1).to(torch.float32)
    offset = flat.mean().reshape(1)
    centred = flat - offset
    count = math.ceil(flat.numel() / DOUBLE_QUANT_BLOCK)
    padded = torch.zeros(count * DOUBLE_QUANT_BLOCK)
    padded[: flat.numel()] = centred
    blocks = padded.reshape(count, DOUBLE_QUANT_BLOCK)
    scale = blocks.abs().amax(dim=1) / E4M3_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = to_e4m3(blocks / scale.unsqueeze(1)).reshape(-1)[: flat.numel()]
    return DoubleQuantizedAbsmax(codes, scale, offset)


def quantize_nf4(weight: torch.Tensor, block_size: int = 64, double_quant: bool = False) -> Nf4Weight:
    """NF4-quantize a ``[out, in]`` weight with per-block absmax (QLoRA default block 64)."""
    out_features, in_features = weight.shape
    if in_features % block_size:
        raise ValueError(f"NF4 block {block_size} does not divide {in_features} inputs")
    blocks = weight.detach().to(torch.float32).reshape(out_features, -1, block_size)
    absmax = blocks.abs().amax(dim=-1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    codes = nearest_level(blocks / safe.unsqueeze(-1)).reshape(out_features, in_features)
    stored = double_quantize(absmax) if double_quant else absmax
    return Nf4Weight(codes, stored, block_size)


def pack_nf4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit indices per byte, even input in the low nibble: uint8 ``[out, in/2]``."""
    assert codes.shape[1] % 2 == 0, "NF4 packing needs an even number of inputs"
    pairs = codes.to(torch.uint8).reshape(codes.shape[0], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_nf4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nf4`: uint8 ``[out, in]`` indices."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)
