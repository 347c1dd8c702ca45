"""How the KV cache becomes bits: the formats serving engines keep K and V in, as data, and their rounding.

Each format names its storage cost per value (scales included) and how a value is rounded when
it enters the cache. ``round_kv`` is the one reference: bitplan measures a format's quality cost
by running the model with every cached K (after RoPE) and V rounded this way.

- ``float16`` / ``bfloat16``: the checkpoint's own 16-bit dtype (vLLM's ``auto``).
- ``fp8_e4m3``: one float32 scale per layer for K and one for V, calibrated as absmax / 448 on
  the calibration text (compressed-tensors ``kv_cache_scheme`` strategy "tensor", which vLLM
  loads as ``self_attn.k_scale`` / ``v_scale``).
- ``fp8_e5m2``: no scale (vLLM's ``--kv-cache-dtype fp8_e5m2``, scale 1.0).
- ``q8_0`` / ``q4_0``: llama.cpp's ``--cache-type-k/-v``: blocks of 32 values along the head
  dimension with one float16 scale each (34 and 18 bytes per 32 values).
- ``int8``: symmetric int8 per token and head; no engine bitplan knows runs it, so a plan for an
  engine refuses it (kept for capacity arithmetic in ``compare``).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch

from bitplan.errors import BitplanError

E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
GGML_BLOCK = 32


@dataclass(frozen=True)
class KVFormat:
    name: str
    bytes_per_value: Fraction
    scale: str  # "none" (no rounding beyond the dtype), "tensor" (one calibrated scale per layer), "block", "token"
    native: bool = False  # the checkpoint's own 16-bit dtype: the reference, no quality cost


KV_FORMATS: dict[str, KVFormat] = {
    "float16": KVFormat("float16", Fraction(2), "none", native=True),
    "bfloat16": KVFormat("bfloat16", Fraction(2), "none", native=True),
    "fp8_e4m3": KVFormat("fp8_e4m3", Fraction(1), "tensor"),
    "fp8_e5m2": KVFormat("fp8_e5m2", Fraction(1), "none"),
    "q8_0": KVFormat("q8_0", Fraction(34, 32), "block"),
    "q4_0": KVFormat("q4_0", Fraction(18, 32), "block"),
    "int8": KVFormat("int8", Fraction(1), "token"),
}
ALIASES = {"fp16": "float16", "f16": "float16", "bf16": "bfloat16", "fp8": "fp8_e4m3"}


def canonical_kv_dtype(name: str) -> str:
    """The format's canonical name (``fp8`` is E4M3, as in vLLM); one line for an unknown name."""
    canonical = ALIASES.get(name, name)
    if canonical not in KV_FORMATS:
        raise BitplanError(f"unknown KV cache dtype {name!r}: choose auto or one of {', '.join(KV_FORMATS)}")
    return canonical


def kv_format(name: str) -> KVFormat:
    return KV_FORMATS[canonical_kv_dtype(name)]


def tensor_scale(absmax: float) -> float:
    """fp8_e4m3's per-layer scale from the calibration absmax (never zero)."""
    return max(float(absmax), 1e-8) / E4M3_MAX


def _ggml_round(x: torch.Tensor, bits: int) -> torch.Tensor:
    """llama.cpp's q8_0 / q4_0 round trip along the last dimension, blocks of 32 (ggml-quants.c's
    reference quantizers: codes from the float32 scale, the scale stored in float16)."""
    shape = x.shape
    blocks = x.reshape(*shape[:-1], shape[-1] // GGML_BLOCK, GGML_BLOCK)
    if bits == 8:
        scale = blocks.abs().amax(-1, keepdim=True) / 127
        scaled = blocks * torch.where(scale == 0, 0, 1 / scale)
        codes = torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)  # roundf: halves away from zero
    else:  # q4_0: d = (value of largest magnitude) / -8, codes trunc(x / d + 8.5) in [0, 15], minus 8
        scale = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True)) / -8
        codes = torch.trunc(blocks * torch.where(scale == 0, 0, 1 / scale) + 8.5).clamp(0, 15) - 8
    return (codes * scale.to(torch.float16).float()).reshape(shape)


def round_kv(x: torch.Tensor, name: str, scale: float | None = None) -> torch.Tensor:
    """``x`` [batch, heads, tokens, head_dim] as the cache in format ``name`` returns it (same dtype).

    ``scale`` is the layer's calibrated scale for ``fp8_e4m3`` (from :func:`tensor_scale`)."""
    fmt = kv_format(name)
    x32 = x.to(torch.float32)
    if fmt.name in ("float16", "bfloat16"):
        out = x32.to(getattr(torch, fmt.name)).float()
    elif fmt.name == "fp8_e4m3":
        if scale is None:
            raise ValueError("fp8_e4m3 needs the layer's calibrated scale")
        out = (x32 / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * scale
    elif fmt.name == "fp8_e5m2":
        limit = float(torch.finfo(torch.float8_e5m2).max)
        out = x32.clamp(-limit, limit).to(torch.float8_e5m2).float()
    elif fmt.name in ("q8_0", "q4_0"):
        if x.shape[-1] % GGML_BLOCK:
            raise BitplanError(f"llama.cpp's {fmt.name} KV cache needs a head dimension divisible by 32, got {x.shape[-1]}")
        out = _ggml_round(x32, 8 if fmt.name == "q8_0" else 4)
    else:  # int8 per token and head
        step = (x32.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-12)
        out = torch.round(x32 / step).clamp(-127, 127) * step
    return out.to(x.dtype)
