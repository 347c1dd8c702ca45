"""Maps each method to the function that quantizes a weight, and builds candidate sets.

A quantizer takes ``(weight [out, in] float32, scheme, scale_dtype, stats)`` and returns a
``QuantizedWeight``. ``stats`` holds the calibration statistics a method needs for that layer:
``stats["input"]`` is the layer's ``InputStats`` (GPTQ reads its Hessian); calibration-free
methods ignore it. ``CALIBRATED`` lists the methods that need it.

Integer methods wired here all emit as compressed-tensors ``pack-quantized``: RTN, GPTQ and HQQ
produce codes on the same integer grid. AWQ, SmoothQuant, NF4 and FP8 live in this package as
functions but are not planner candidates yet (they change neighbouring weights or need other
checkpoint formats).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

import torch

from bitplan.errors import BitplanError
from bitplan.methods.gptq import quantize_gptq
from bitplan.methods.hqq import quantize_hqq
from bitplan.methods.rtn import quantize_rtn
from bitplan.methods.scheme import DENSE, GROUP_SIZES, INTEGER_BITS, Method, QuantizedWeight, Scheme

Quantizer = Callable[[torch.Tensor, Scheme, torch.dtype, dict], QuantizedWeight]

def _rtn(weight: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype, stats: dict) -> QuantizedWeight:
    return quantize_rtn(weight, scheme, scale_dtype)


def _hqq(weight: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype, stats: dict) -> QuantizedWeight:
    return quantize_hqq(weight, scheme, scale_dtype=scale_dtype)


def _gptq(weight: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype, stats: dict) -> QuantizedWeight:
    if "input" not in stats:
        raise BitplanError("GPTQ needs calibration statistics for this layer: quantize it through bitplan.plan/emit")
    return quantize_gptq(weight, stats["input"].hessian(), scheme, scale_dtype=scale_dtype)[0]


QUANTIZERS: dict[Method, Quantizer] = {Method.RTN: _rtn, Method.HQQ: _hqq, Method.GPTQ: _gptq}
CALIBRATED = frozenset({Method.GPTQ})
SMOOTHING = frozenset({Method.AWQ, Method.SMOOTHQUANT})  # fold one scale vector per smoothing group


def register(method: Method) -> Callable[[Quantizer], Quantizer]:
    """Decorator: ``@register(Method.GPTQ)`` makes a quantizer available to profile and emit."""

    def wrap(function: Quantizer) -> Quantizer:
        QUANTIZERS[method] = function
        return function

    return wrap


def quantize(weight: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype, stats: dict | None = None) -> QuantizedWeight:
    if scheme.method not in QUANTIZERS:
        raise BitplanError(f"method {scheme.method} is not available yet: choose from {', '.join(map(str, QUANTIZERS))}")
    return QUANTIZERS[scheme.method](weight, scheme, scale_dtype, stats or {})


def needs_calibration(schemes: Iterable[Scheme]) -> bool:
    return any(scheme.method in CALIBRATED for scheme in schemes)


def available_methods() -> list[str]:
    return [str(m) for m in QUANTIZERS]


def candidate_schemes(
    methods: Iterable[str] = ("rtn",),
    bits: Iterable[int] = INTEGER_BITS,
    group_sizes: Iterable[int] = GROUP_SIZES,
    symmetric: Iterable[bool] = (True, False),
    include_dense: bool = True,
) -> list[Scheme]:
    """The cross product of the requested methods, bit widths, groups and symmetries, sorted.

    Every integer method is offered at every combination; ``include_dense`` adds "none"
    (the weight left in the checkpoint dtype), which is always feasible and loses nothing.
    """
    chosen = []
    for name in methods:
        try:
            method = Method(name)
        except ValueError:
            raise BitplanError(f"unknown method {name!r}: choose from {', '.join(available_methods())}") from None
        if method not in QUANTIZERS:
            raise BitplanError(f"method {name} is not available yet: choose from {', '.join(available_methods())}")
        chosen.append(method)
    bad_bits = [b for b in bits if b not in INTEGER_BITS]
    if bad_bits:
        raise BitplanError(f"unsupported bit widths {bad_bits}: choose from {', '.join(map(str, INTEGER_BITS))}")
    schemes = sorted(
        Scheme(method, b, g, sym)
        for method, b, g, sym in itertools.product(chosen, bits, group_sizes, symmetric)
    )
    if not schemes:
        raise BitplanError("the candidate set is empty: give at least one method and bit width")
    return [*schemes, DENSE] if include_dense else schemes
