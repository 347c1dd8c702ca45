"""Scheme: one way to quantize a Linear (method, bits, group, symmetry), and what a method returns."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

import torch

from bitplan.errors import BitplanError
from bitplan.kernels import layout
from bitplan.kernels.numerics import nf4_code_book
from bitplan.kernels.reference import dequantize_codes


class Method(StrEnum):
    RTN = "rtn"
    GPTQ = "gptq"
    AWQ = "awq"
    AWQ_GPTQ = "awqgptq"  # AWQ's scales, then GPTQ on the scaled weights (methods/awq.py)
    AWQ_IMATRIX = "awqimatrix"  # AWQ's scales, then the importance-weighted scale search on the scaled weights
    HQQ = "hqq"
    IMATRIX = "imatrix"  # RTN with llama.cpp's importance-weighted scale search (methods/imatrix.py)
    SMOOTHQUANT = "smoothquant"
    NF4 = "nf4"
    FP8 = "fp8"
    GGML = "ggml"  # one of ggml's GGUF types (llama.cpp), named by ``ggml_type``
    NONE = "none"  # left in the checkpoint dtype: always a candidate, zero loss


DENSE_NAME = "none"


INTEGER_BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128, 0)  # 0 = one group per output channel

def group_label(group_size: int) -> str:
    """How a group size is written in scheme names and on the command line: "c" for per channel."""
    return "c" if group_size == 0 else str(group_size)


_GGML_NAME = re.compile(r"^ggml-(?P<type>[a-z0-9_]+)$")
_NAME = re.compile(r"^(?P<method>[a-z0-9]+)-w(?P<bits>\d+)g(?P<group>\d+|c)(?P<sym>[sa])(?:a(?P<act>\d+))?$")


@dataclass(frozen=True, order=True)
class Scheme:
    """A candidate quantization for one Linear weight.

    ``group_size`` 0 means per output channel. ``act_bits`` 16 means weight-only. A ggml scheme
    (``Scheme.ggml("Q4_K")``, named ``ggml-q4_k``) is one GGUF type: ``ggml_type`` names it and
    bits, group (its block) and symmetry are read from ggml's type table (``kernels.layout``).
    """

    method: Method
    bits: int
    group_size: int
    symmetric: bool
    act_bits: int = 16
    ggml_type: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", Method(self.method))

    @property
    def is_dense(self) -> bool:
        return self.method == Method.NONE

    @property
    def name(self) -> str:
        if self.is_dense:
            return DENSE_NAME
        if self.method == Method.GGML:
            return f"ggml-{self.ggml_type.lower()}"
        group = group_label(self.group_size)
        act = "" if self.act_bits == 16 else f"a{self.act_bits}"
        return f"{self.method}-w{self.bits}g{group}{'s' if self.symmetric else 'a'}{act}"

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, name: str) -> "Scheme":
        if name.strip().lower() == DENSE_NAME:
            return DENSE
        ggml = _GGML_NAME.match(name.strip().lower())
        if ggml:
            return cls.ggml(ggml["type"])
        match = _NAME.match(name.strip().lower())
        if not match:
            raise BitplanError(f"unknown scheme name {name!r}: expected e.g. 'rtn-w4g128s' or 'rtn-w8gca'")
        group = match["group"]
        return cls(
            method=Method(match["method"]),
            bits=int(match["bits"]),
            group_size=0 if group == "c" else int(group),
            symmetric=match["sym"] == "s",
            act_bits=int(match["act"] or 16),
        )

    @classmethod
    def ggml(cls, ggml_type: str) -> "Scheme":
        """The scheme of one GGUF type (``Q4_K``, ``q8_0``, ``F16`` ...)."""
        try:
            info = layout.GGML_TYPES[layout.GGMLType(ggml_type.upper())]
        except ValueError:
            raise BitplanError(f"unknown GGUF type {ggml_type!r}: choose from {', '.join(layout.GGML_SCHEME_TYPES)}") from None
        return cls(Method.GGML, info.bits, info.block_size if info.block_size > 1 else 0, info.symmetric,
                   ggml_type=str(layout.GGMLType(ggml_type.upper())))

    def check(self) -> "Scheme":
        """Raise unless this method can store weights this way; returns the scheme."""
        method, problem = self.method, ""
        if method == Method.NF4 and (self.bits != 4 or not self.symmetric or self.group_size == 0 or self.act_bits != 16):
            problem = "NF4 is 4-bit, absmax-scaled (symmetric) per block of 32/64/128 inputs, weight-only"
        elif method == Method.FP8 and (self.bits != 8 or not self.symmetric or (self.act_bits == 8 and self.group_size)):
            problem = "FP8 is 8-bit symmetric; with FP8 activations (a8) it is per channel"
        elif method == Method.SMOOTHQUANT and (self.bits, self.group_size, self.symmetric, self.act_bits) != (8, 0, True, 8):
            problem = "SmoothQuant is W8A8: int8 symmetric per channel, int8 activations per token"
        elif method == Method.GGML and self != Scheme.ggml(self.ggml_type or "?"):
            problem = "a ggml scheme is one GGUF type: build it with Scheme.ggml(type)"
        elif method not in (Method.NF4, Method.FP8, Method.SMOOTHQUANT, Method.NONE, Method.GGML) and (self.act_bits != 16 or self.bits not in INTEGER_BITS):
            problem = f"{method} stores {'/'.join(map(str, INTEGER_BITS))}-bit integer weights with 16-bit activations"
        if problem:
            raise BitplanError(f"scheme {self.name} is not valid: {problem}")
        return self

    @property
    def act_quantized(self) -> bool:
        """Whether activations are quantized at run time (per token) too."""
        return self.act_bits < 16

    def fits(self, in_features: int) -> bool:
        """Whether this scheme can be stored for a layer with ``in_features`` inputs."""
        if self.method == Method.GGML:
            return layout.is_valid_row_size(self.ggml_type, in_features)
        return self.is_dense or layout.group_fits(in_features, self.group_size)

    def weight_bytes(self, out_features: int, in_features: int, scale_bytes: int) -> int:
        """Exact checkpoint bytes of a weight under this scheme (see ``kernels.layout``)."""
        if self.is_dense:
            return layout.dense_weight_bytes(out_features, in_features, scale_bytes)
        if self.method == Method.GGML:
            return layout.tensor_size_bytes(self.ggml_type, (out_features, in_features))
        if self.method == Method.NF4:
            return layout.nf4_weight_bytes(out_features, in_features, self.group_size, double_quant=False)
        if self.method == Method.FP8:
            return layout.fp8_weight_bytes(out_features, in_features, self.group_size, scale_bytes=4)
        if self.method == Method.SMOOTHQUANT:
            return layout.int8_weight_bytes(out_features, in_features, scale_bytes)
        return layout.packed_weight_bytes(
            out_features, in_features, self.bits, self.group_size, self.symmetric, scale_bytes
        )

    def to_dict(self) -> dict:
        data = {
            "method": str(self.method),
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "act_bits": self.act_bits,
        }
        return {**data, "ggml_type": self.ggml_type} if self.ggml_type else data

    @classmethod
    def from_dict(cls, data: dict) -> "Scheme":
        return cls(**data)


DENSE = Scheme(Method.NONE, 16, 0, True)


@dataclass(frozen=True)
class QuantizedWeight:
    """A method's output, unpacked and tied to no kernel.

    ``codes``: int8 ``[out, in]``. ``scale``: ``[out, groups]`` in the storage dtype. ``zero``:
    int8 ``[out, groups]`` signed zero points, or None when symmetric. For integer methods the
    weight it stands for is ``(codes - zero) * scale`` group by group; for NF4, ``codes`` are
    code-book indices minus 8 and the weight is ``NF4[codes + 8] * scale``; for FP8, ``codes``
    are the E4M3 bit patterns and the weight is ``e4m3(codes) * scale``.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    scheme: Scheme

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def code_values(self) -> torch.Tensor:
        """The unscaled values float32 ``[out, in]`` for NF4 and FP8 (code book or E4M3)."""
        if self.scheme.method == Method.NF4:
            return nf4_code_book()[self.codes.to(torch.int64) + 8]
        return self.codes.view(torch.float8_e4m3fn).to(torch.float32)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.scheme.method in (Method.NF4, Method.FP8):
            out, width = self.codes.shape[0], self.scheme.group_size or self.codes.shape[1]
            values = self.code_values().view(out, -1, width) * self.scale.to(torch.float32).unsqueeze(-1)
            return values.reshape(self.codes.shape).to(dtype)
        return dequantize_codes(self.codes, self.scale, self.zero, self.scheme.group_size, dtype)

    def rows(self, start: int, stop: int) -> "QuantizedWeight":
        """Output rows ``start:stop`` (views, no copy): what they dequantize to is those rows of :meth:`dequantize`."""
        zero = None if self.zero is None else self.zero[start:stop]
        return QuantizedWeight(self.codes[start:stop], self.scale[start:stop], zero, self.scheme)

    @property
    def nbytes(self) -> int:
        """Bytes held (codes, scales, zero points): a quarter of the float32 weight's or less."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero) if t is not None)

    def scale_rows(self, divisor: torch.Tensor) -> "QuantizedWeight":
        """The same codes with output row ``r`` divided by ``divisor[r]`` (a fold of the next
        Linear's smoothing scales into this one's output), scales rounded to their dtype."""
        scale = (self.scale.to(torch.float32) / divisor.to(torch.float32).unsqueeze(1)).to(self.scale.dtype)
        return QuantizedWeight(self.codes, scale, self.zero, self.scheme)
