"""``QuantLinear``: the one front that runs a quantized Linear, on Triton (CUDA) or the reference (CPU).

Tensors it owns (buffers; names as in a compressed-tensors checkpoint):

============== ============================================ ==========================================
format         ``weight_packed``                            ``weight_scale`` / ``weight_zero_point``
============== ============================================ ==========================================
``int``        int32 ``[N, ceil(K*bits/32)]`` pack-quantized  ``[N, groups]`` / int32
               (``bitplan.kernels.layout``), bits 2..8        ``[ceil(N*bits/32), groups]`` or absent
``nf4``        int32 ``[N, K/8]``: indices 0..15 packed as    ``[N, groups]`` absmax per group / absent
               4-bit codes (index = signed code + 8); the
               same bits as ``bitplan.methods.nf4``'s uint8
               ``[N, K/2]`` (accepted and viewed as int32)
``fp8``        E4M3 bytes, stored as uint8 ``[N, K]``         ``[N, groups]`` (per channel ``[N, 1]``)
               (checkpoint name ``weight``, float8_e4m3fn)
``w8a8``       int8 ``[N, K]`` codes -127..127                ``[N, 1]``; activations quantized per
               (checkpoint name ``weight``)                   token at run time
============== ============================================ ==========================================

plus ``weight_shape`` int64 ``[2]`` = (N, K) and ``bias`` ``[N]`` or None. ``groups = K /
group_size`` (0 = per channel). Scales may be fp16, bf16 or fp32. FP8 bytes are kept as uint8 so
that ``module.to(torch.float16)`` cannot convert them; :meth:`QuantLinear.fp8_weight` views them.

What the methods hand over (:class:`~bitplan.methods.scheme.QuantizedWeight`), per format:
integer methods give signed codes; NF4 gives signed codes ``-8..7`` (index - 8) with
``scheme.method == 'nf4'``; FP8 gives the E4M3 bit patterns as int8
(``w.to(torch.float8_e4m3fn).view(torch.int8)``) with ``scheme.method == 'fp8'``; SmoothQuant
W8A8 gives int8 codes with ``scheme.act_bits == 8``, per-channel symmetric scales ``[N, 1]``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from bitplan.kernels import layout
from bitplan.kernels.configs import KernelConfig, WeightFormat, check_weight, interpreting
from bitplan.kernels.numerics import NF4_CODE_BOOK, fake_quant_activations, per_token_int
from bitplan.kernels.reference import dequantize_codes, linear_reference

log = logging.getLogger(__name__)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def quantize_per_token_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of :func:`bitplan.kernels.launch.quantize_per_token`: int8 ``[M, K]``, float32 ``[M]``."""
    codes, scale = per_token_int(x, 8)
    return codes.to(torch.int8), scale[..., 0]


def w8a8_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """W8A8 in float32: per-token fake-quantized activations times the dequantized weight."""
    x2d = x.reshape(-1, x.shape[-1])
    xq, xs = quantize_per_token_reference(x2d)
    w = weight.to(torch.float32) * weight_scale.reshape(-1, 1).to(torch.float32)
    out = F.linear(xq.to(torch.float32) * xs[:, None], w, None if bias is None else bias.to(torch.float32))
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def _group_expand(values: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """``values [N, K] * scale [N, groups]`` group by group, float32."""
    n, k = values.shape
    width = k if group_size == 0 else group_size
    return (values.view(n, -1, width) * scale.to(torch.float32).unsqueeze(-1)).reshape(n, k)


def _nf4_bytes_as_words(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """``bitplan.methods.nf4`` bytes (uint8 ``[N, K/2]``, even input in the low nibble) as the
    int32 ``[N, K/8]`` words the kernels read: the same bits, viewed little-endian."""
    if packed.ndim != 2 or packed.shape[1] * 2 != in_features or in_features % 8:
        raise ValueError(f"NF4 bytes must be uint8 [N, {in_features // 2}] with in_features a multiple of 8, "
                         f"got {list(packed.shape)}")
    return packed.contiguous().view(torch.int32)


class QuantLinear(nn.Module):
    """A Linear whose weight stays packed. Formats and tensors: module docstring.

    ``forward(x)``: x fp16/bf16/fp32 ``[..., K]`` -> ``[..., N]`` in x's dtype. ``backend``:
    'auto' (Triton on CUDA, reference on CPU), 'triton' (also on CPU under ``TRITON_INTERPRET=1``)
    or 'reference'. ``kernel_configs`` maps a path ('gemv' for M = 1, 'small' for M <= 16, 'gemm')
    to a :class:`KernelConfig` that replaces the architecture default (e.g. autotuned at emit time).
    """

    def __init__(
        self,
        weight_packed: torch.Tensor,
        weight_scale: torch.Tensor,
        weight_shape: tuple[int, int] | torch.Tensor,
        *,
        fmt: WeightFormat | str = WeightFormat.INT,
        bits: int = 4,
        group_size: int = 0,
        weight_zero_point: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        codebook: torch.Tensor | None = None,
        kernel_configs: Mapping[str, KernelConfig] | None = None,
        backend: str = "auto",
        input_fp8: bool = False,
    ) -> None:
        super().__init__()
        self.input_fp8 = input_fp8  # W8A8-FP8: inputs rounded to E4M3 per token (dynamic scale), as vLLM runs it
        self.fmt = WeightFormat(fmt)
        out_features, in_features = (int(v) for v in weight_shape)
        self.out_features, self.in_features = out_features, in_features
        self.bits = 8 if self.fmt in (WeightFormat.FP8, WeightFormat.W8A8) else bits
        self.group_size = group_size
        if self.fmt is WeightFormat.FP8 and weight_packed.dtype in (torch.uint8, torch.int8):
            weight_packed = weight_packed.view(torch.float8_e4m3fn)
        if self.fmt is WeightFormat.NF4 and weight_packed.dtype == torch.uint8:
            weight_packed = _nf4_bytes_as_words(weight_packed, in_features)
        self._check(weight_packed, weight_scale, weight_zero_point, bias)
        if self.fmt is WeightFormat.FP8:
            weight_packed = weight_packed.view(torch.uint8)
        self.register_buffer("weight_packed", weight_packed)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("weight_zero_point", weight_zero_point)
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64))
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias, requires_grad=False))
        if self.fmt is WeightFormat.NF4:
            table = codebook if codebook is not None else torch.tensor(NF4_CODE_BOOK)
            self.register_buffer("codebook", table.to(torch.float32).reshape(16), persistent=codebook is not None)
        else:
            self.codebook = None
        self.kernel_configs = dict(kernel_configs or {})
        if backend not in ("auto", "triton", "reference"):
            raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")
        self.backend = backend
        self._unpacked: tuple[tuple, tuple[torch.Tensor, torch.Tensor | None]] | None = None

    def _check(self, weight, scale, zero, bias) -> None:
        n, k = self.out_features, self.in_features
        if self.fmt is WeightFormat.W8A8:
            if weight.dtype != torch.int8 or tuple(weight.shape) != (n, k):
                raise ValueError(f"w8a8 weight must be int8 [{n}, {k}], got {weight.dtype} {list(weight.shape)}")
            if scale.numel() != n or not scale.is_floating_point():
                raise ValueError(f"w8a8 weight_scale must be float [{n}, 1], got {scale.dtype} {list(scale.shape)}")
            if zero is not None:
                raise ValueError("w8a8 weights are symmetric: pass no weight_zero_point")
        else:
            check_weight(self.fmt, weight, scale, zero, self.bits, self.group_size, n, k)
        if bias is not None and tuple(bias.shape) != (n,):
            raise ValueError(f"bias must be [{n}], got {list(bias.shape)}")

    @classmethod
    def from_quantized(cls, qweight, bias: torch.Tensor | None = None, **kwargs) -> "QuantLinear":
        """Pack a method's output: a :class:`QuantizedWeight` (codes per format: module docstring),
        or ``bitplan.methods`` ``Nf4Weight`` (``codes`` uint8 indices, ``block_absmax()``,
        ``block_size``) or ``Fp8Weight`` (``values`` float8_e4m3fn, ``scale``, ``group_size``)."""
        if hasattr(qweight, "block_absmax"):
            indices = qweight.codes.to(torch.int8) - 8
            return cls(layout.pack_codes(indices, 4), qweight.block_absmax(), tuple(indices.shape),
                       fmt=WeightFormat.NF4, bits=4, group_size=qweight.block_size, bias=bias, **kwargs)
        if hasattr(qweight, "values"):
            return cls(qweight.values, qweight.scale, tuple(qweight.values.shape), fmt=WeightFormat.FP8,
                       group_size=qweight.group_size, bias=bias, **kwargs)
        scheme = qweight.scheme
        method, n_k = str(scheme.method), tuple(qweight.codes.shape)
        if scheme.act_bits == 8:
            if scheme.bits != 8 or not scheme.symmetric or scheme.group_size != 0:
                raise ValueError(f"W8A8 needs 8-bit symmetric per-channel weights, got {scheme}")
            return cls(qweight.codes.to(torch.int8), qweight.scale, n_k, fmt=WeightFormat.W8A8, bias=bias, **kwargs)
        if scheme.act_bits != 16:
            raise ValueError(f"activations of {scheme.act_bits} bits are not supported (16 or 8)")
        if method == "fp8":
            fp8 = qweight.codes.to(torch.int8).view(torch.float8_e4m3fn)
            return cls(fp8, qweight.scale, n_k, fmt=WeightFormat.FP8, group_size=scheme.group_size, bias=bias, **kwargs)
        fmt = WeightFormat.NF4 if method == "nf4" else WeightFormat.INT
        packed = layout.pack_codes(qweight.codes, scheme.bits)
        zero = None if qweight.zero is None else layout.pack_codes(qweight.zero, scheme.bits, dim=0)
        return cls(packed, qweight.scale, n_k, fmt=fmt, bits=scheme.bits, group_size=scheme.group_size,
                   weight_zero_point=zero, bias=bias, **kwargs)

    @classmethod
    def from_checkpoint(cls, tensors: Mapping[str, torch.Tensor], *, fmt: WeightFormat | str, bits: int,
                        group_size: int, **kwargs) -> "QuantLinear":
        """Build from one Linear's checkpoint tensors, names without the module prefix.

        ``weight_packed`` (int/nf4) or ``weight`` (fp8/w8a8), ``weight_scale`` (or NF4's
        ``weight_absmax``), optional ``weight_zero_point``, ``weight_shape`` (int; else taken from
        the weight: NF4 bytes ``[N, K/2]`` give K), ``bias``. A double-quantized NF4 absmax must be
        dequantized to float32 ``[N, blocks]`` first and passed as ``weight_absmax``.
        """
        weight = tensors["weight_packed"] if "weight_packed" in tensors else tensors["weight"]
        if "weight_shape" in tensors:
            shape = tensors["weight_shape"].tolist()
        elif WeightFormat(fmt) is WeightFormat.NF4:
            shape = [weight.shape[0], weight.shape[1] * (2 if weight.dtype == torch.uint8 else 8)]
        else:
            shape = list(weight.shape)
        scale = tensors["weight_scale"] if "weight_scale" in tensors else tensors["weight_absmax"]
        return cls(weight, scale, shape, fmt=fmt, bits=bits, group_size=group_size,
                   weight_zero_point=tensors.get("weight_zero_point"), bias=tensors.get("bias"), **kwargs)

    def tune(self, rows: tuple[int, ...] = (1, 16, 2048), dtype: torch.dtype = torch.float16,
             timer=None) -> dict[str, KernelConfig]:
        """Time :data:`~bitplan.kernels.configs.CANDIDATES` for each path on this layer's device and
        keep the fastest in ``kernel_configs``; returns them (``to_dict()`` each for a checkpoint)."""
        from bitplan.kernels.configs import CANDIDATES, autotune, path_for

        device = self.weight_packed.device
        for m in rows:
            x = torch.randn(m, self.in_features, dtype=dtype, device=device)
            path = path_for(m)

            def run(config, x=x, path=path):
                self.kernel_configs[path] = config
                return self._forward_triton(x)

            best, _ = autotune(run, CANDIDATES[path], timer)
            self.kernel_configs[path] = best
        return dict(self.kernel_configs)

    def fp8_weight(self) -> torch.Tensor:
        """The FP8 weight as float8_e4m3fn ``[N, K]`` (a view, no copy)."""
        return self.weight_packed.view(torch.float8_e4m3fn)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}, input_fp8={self.input_fp8}, "
                f"bits={self.bits}, group_size={self.group_size}, asymmetric={self.weight_zero_point is not None}")

    def use_triton(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` runs a Triton kernel (CUDA with Triton, or backend='triton')."""
        if self.backend == "reference":
            return False
        if self.backend == "triton":
            if not x.is_cuda and not interpreting():
                raise ValueError("backend='triton' on CPU needs TRITON_INTERPRET=1 set before import")
            return True
        if x.is_cuda and not _triton_available():
            log.warning("Triton is not installed: QuantLinear runs the reference kernel on CUDA")
        return x.is_cuda and _triton_available()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input ends in {x.shape[-1]} features, this layer takes {self.in_features}")
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"input must be fp16, bf16 or fp32, got {x.dtype}")
        if self.input_fp8:
            x = fake_quant_activations(x, "fp8")
        if self.use_triton(x):
            return self._forward_triton(x)
        return self._forward_reference(x)

    def _config(self, x: torch.Tensor) -> KernelConfig | None:
        from bitplan.kernels.configs import path_for

        rows = x.numel() // self.in_features
        return self.kernel_configs.get(path_for(rows))

    def _forward_triton(self, x: torch.Tensor) -> torch.Tensor:
        from bitplan.kernels import launch

        config = self._config(x)
        if self.fmt is WeightFormat.W8A8:
            return launch.w8a8_linear(x, self.weight_packed, self.weight_scale, self.bias, config=config)
        weight = self.fp8_weight() if self.fmt is WeightFormat.FP8 else self.weight_packed
        return launch.weight_only_linear(
            x, weight, self.weight_scale, self.weight_zero_point, fmt=self.fmt, bits=self.bits,
            group_size=self.group_size, out_features=self.out_features, bias=self.bias,
            codebook=self.codebook, config=config)

    def _codes(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Unpacked signed codes int8 ``[N, K]`` and zero points int8 ``[N, groups]``, cached."""
        key = (self.weight_packed.data_ptr(), self.weight_packed._version, self.weight_packed.device)
        if self._unpacked is None or self._unpacked[0] != key:
            codes = layout.unpack_codes(self.weight_packed, self.bits, self.in_features)
            zero = None
            if self.weight_zero_point is not None:
                zero = layout.unpack_codes(self.weight_zero_point, self.bits, self.out_features, dim=0)
            self._unpacked = (key, (codes, zero))
        return self._unpacked[1]

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the kernels multiply by: ``[N, K]`` in ``dtype`` (float32 arithmetic)."""
        if self.fmt is WeightFormat.W8A8:
            return (self.weight_packed.float() * self.weight_scale.reshape(-1, 1).float()).to(dtype)
        if self.fmt is WeightFormat.FP8:
            return _group_expand(self.fp8_weight().float(), self.weight_scale, self.group_size).to(dtype)
        codes, zero = self._codes()
        if self.fmt is WeightFormat.NF4:
            values = self.codebook.float().to(codes.device)[codes.long() + 8]
            return _group_expand(values, self.weight_scale, self.group_size).to(dtype)
        return dequantize_codes(codes, self.weight_scale, zero, self.group_size, dtype)

    def _forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        if self.fmt is WeightFormat.W8A8:
            return w8a8_reference(x, self.weight_packed, self.weight_scale, bias)
        if self.fmt is WeightFormat.INT:
            codes, zero = self._codes()
            return linear_reference(x, codes, self.weight_scale, zero, self.group_size,
                                    None if bias is None else bias.to(x.dtype))
        weight = self.dequantized_weight(x.dtype)
        return F.linear(x, weight, None if bias is None else bias.to(x.dtype))
