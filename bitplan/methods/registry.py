"""Maps each method to the function that quantizes a weight, and builds candidate sets.

A quantizer takes ``(weight [out, in] float32, scheme, scale_dtype, stats)`` and returns a
``QuantizedWeight``. ``stats`` holds the calibration statistics a method needs for that layer:
``stats["input"]`` is the layer's ``InputStats`` (GPTQ reads its Hessian); calibration-free
methods ignore it. ``CALIBRATED`` lists the methods that need it.

Per-layer methods: RTN, GPTQ, HQQ, imatrix (integer codes, compressed-tensors ``pack-quantized``), NF4
(bitplan's own layout), FP8 (``float-quantized``, optionally with FP8 activations per token) and
ggml (llama.cpp's GGUF types, quantized exactly as ggml does, with the importance matrix when
calibration statistics are given; returns a ``GGMLQuantized``, whose ``dequantize()`` is the
weight llama.cpp decodes).
Smoothing methods (``SMOOTHING``: AWQ, AWQ + GPTQ, AWQ + imatrix, SmoothQuant W8A8) act on a group of Linears that share an
input: :func:`quantize_smoothing_group` returns one scale vector for the group, to be folded
into the op that feeds it, and each member's quantized ``W · diag(s)``.

The default candidate set (``DEFAULT_METHODS`` at every bit width and group, both symmetries,
with the per-method grids of :func:`method_schemes`) is what ``bitplan plan`` profiles when no
``--methods`` is given; see the README's "Candidates" section.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch

from bitplan.errors import BitplanError
from bitplan.kernels.layout import GGML_SCHEME_TYPES
from bitplan.methods.calibration_stats import InputStats
from bitplan.methods.fp8 import quantize_fp8
from bitplan.methods.ggml import GGMLQuantized, quantize_ggml
from bitplan.methods.gptq import quantize_gptq
from bitplan.methods.hqq import quantize_hqq
from bitplan.methods.imatrix import quantize_imatrix
from bitplan.methods.nf4 import quantize_nf4
from bitplan.methods.rtn import quantize_rtn
from bitplan.methods.scheme import DENSE, GROUP_SIZES, INTEGER_BITS, Method, QuantizedWeight, Scheme, group_label

Quantizer = Callable[[torch.Tensor, Scheme, torch.dtype, dict], QuantizedWeight]

def _rtn(weight: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype, stats: dict) -> QuantizedWeight:
    return quantize_rtn(weight, scheme, scale_dtype)


def _hqq(weight: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype, stats: dict) -> QuantizedWeight:
    return quantize_hqq(weight, scheme, scale_dtype=scale_dtype)


def _gptq(weight: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype, stats: dict) -> QuantizedWeight:
    if "input" not in stats:
        raise BitplanError("GPTQ needs calibration statistics for this layer: quantize it through bitplan.plan/emit")
    from bitplan.methods import gptq

    inputs = stats["input"]
    # no calibration token reached it (an expert the router never chose): H = I, no error to spread, RTN's numbers.
    # Otherwise GPTQ is given the function that makes H, so it owns the matrix and factors it in place
    hessian = inputs.hessian if inputs.count else torch.eye(weight.shape[1], dtype=torch.float32)
    return quantize_gptq(weight, hessian, scheme, gptq.BLOCK, gptq.DAMP, gptq.ACT_ORDER, scale_dtype=scale_dtype, shrink=gptq.SHRINK)[0]


def _imatrix(weight: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype, stats: dict) -> QuantizedWeight:
    """llama.cpp's importance-weighted scale search on a symmetric integer grid; the importance is the
    layer's per-column mean of x² (as for ggml types), x² where no calibration token reached it."""
    if "input" not in stats:
        raise BitplanError("imatrix needs calibration statistics for this layer: quantize it through bitplan.plan/emit")
    inputs = stats["input"]
    return quantize_imatrix(weight, scheme, importance_vector(inputs) if inputs.count else None, scale_dtype)


def _nf4(weight: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype, stats: dict) -> QuantizedWeight:
    result = quantize_nf4(weight, block_size=scheme.group_size)
    return QuantizedWeight(result.codes.to(torch.int8) - 8, result.block_absmax(), None, scheme)


def _ggml(weight: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype, stats: dict) -> GGMLQuantized:
    """ggml's own quantizer for the scheme's GGUF type; with calibration statistics, their per-column
    mean of x² is the importance matrix (what ``llama-imatrix`` computes: ``in_sum2 / count``)."""
    return quantize_ggml(weight, scheme.ggml_type, importance_vector(stats["input"]) if "input" in stats else None)


def importance_vector(stats: InputStats) -> torch.Tensor:
    """llama.cpp's importance matrix of one Linear: the mean of each input column's square."""
    return stats.second_moment_diagonal().contiguous()


def _fp8(weight: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype, stats: dict) -> QuantizedWeight:
    result = quantize_fp8(weight, scheme.group_size, scale_dtype=torch.float32)
    return QuantizedWeight(result.values.view(torch.int8), result.scale, None, scheme)


def implementations() -> dict[str, dict]:
    """What made each method's numbers: its implementation's ``version`` (bump it when the method's
    code changes what it returns) and its settings. Profile caches fold this into their key
    (``profiles.tables.table_key``), so a change here is never served old scores."""
    from bitplan.methods import awq, gptq, imatrix, smoothquant
    from bitplan.methods.hqq import HqqOptions
    from bitplan.methods.nf4 import NF4_OFFSET

    # version 2 of rtn, gptq, awq, hqq, smoothquant: symmetric grids spread over all 2**bits codes (methods/rtn.py)
    # version 3 of gptq, awq, smoothquant, ggml: X Xᵀ from kept rows while they are fewer than the inputs
    # (calibration_stats.OuterSum), which rounds differently in float32
    # version 4 of gptq: H shrunk toward its diagonal (gptq.SHRINK)
    # version 2 of imatrix, awqimatrix: steps that clip further and the least-squares refinement (imatrix.py)
    return {
        "rtn": {"version": 2},
        "gptq": {"version": 4, "block": gptq.BLOCK, "damp": gptq.DAMP, "act_order": gptq.ACT_ORDER, "shrink": gptq.SHRINK},
        "awq": {"version": 3, "n_grid": awq.N_GRID, "max_shrink": awq.MAX_SHRINK},
        "awqgptq": {"version": 1, "n_grid": awq.N_GRID, "block": gptq.BLOCK, "damp": gptq.DAMP, "act_order": gptq.ACT_ORDER,
                    "shrink": gptq.SHRINK},
        "hqq": {"version": 2, **asdict(HqqOptions())},
        "imatrix": {"version": 2, "steps": list(imatrix.STEPS), "refine": imatrix.REFINE_ITERATIONS},
        "awqimatrix": {"version": 2, "n_grid": awq.N_GRID, "steps": list(imatrix.STEPS), "refine": imatrix.REFINE_ITERATIONS},
        "nf4": {"version": 1, "offset": NF4_OFFSET},
        "fp8": {"version": 1},
        "smoothquant": {"version": 3, "alphas": list(smoothquant.ALPHA_GRID)},
        "ggml": {"version": 2},  # bit-exact to libggml's quantizers (tests/methods/test_ggml.py)
    }


QUANTIZERS: dict[Method, Quantizer] = {Method.RTN: _rtn, Method.HQQ: _hqq, Method.GPTQ: _gptq, Method.NF4: _nf4, Method.FP8: _fp8,
                                       Method.GGML: _ggml, Method.IMATRIX: _imatrix}
SMOOTHING = frozenset({Method.AWQ, Method.AWQ_GPTQ, Method.AWQ_IMATRIX, Method.SMOOTHQUANT})  # fold one scale vector per smoothing group
CALIBRATED = frozenset({Method.GPTQ, Method.GGML, Method.IMATRIX, *SMOOTHING})  # ggml, imatrix: the importance matrix
# GPTQ, AWQ and AWQ + GPTQ by --methods: GPTQ's gain fitted on one domain of text does not carry to another, and AWQ +
# imatrix beats AWQ in both (README, "The default candidates")
DEFAULT_METHODS = ("rtn", "imatrix", "awqimatrix", "hqq", "nf4", "fp8", "smoothquant")
COSTLY = frozenset({Method.GPTQ, Method.AWQ, Method.AWQ_GPTQ, Method.AWQ_IMATRIX, Method.HQQ})  # seconds per layer and scheme to profile, not milliseconds
COSTLY_DEFAULT_BITS = (2, 3, 4)  # where they beat RTN by most; above 4 bits RTN is close to lossless


@dataclass(frozen=True)
class SmoothedGroup:
    """A smoothing method's result for Linears sharing an input: the op feeding them divides its
    output by ``scales`` ``[in]``; ``quantized[name]`` is Q(W_name · diag(scales))."""

    scales: torch.Tensor
    quantized: dict[str, QuantizedWeight]
    alpha: float | None


def quantize_smoothing_group(weights: dict[str, torch.Tensor], scheme: Scheme, scale_dtype: torch.dtype,
                             stats: InputStats, clip: dict[str, bool] | None = None, foldable: bool = True) -> SmoothedGroup:
    """AWQ (scale search and weight clipping) or SmoothQuant (α search, W8A8) for one group.

    ``stats`` are the group's shared input statistics; ``clip`` says per Linear whether AWQ may
    clip (the reference leaves q and k unclipped). A Linear with no op to fold scales into
    (``foldable`` False: o_proj under grouped-query attention) keeps s = 1: AWQ then only
    clips (as AutoAWQ does there), SmoothQuant is plain W8A8.
    """
    from bitplan.methods import awq, smoothquant

    names = list(weights)
    if scheme.method in (Method.AWQ, Method.AWQ_GPTQ, Method.AWQ_IMATRIX):
        from bitplan.methods import gptq

        flags = [True if clip is None else clip[name] for name in names]
        result = awq.quantize_awq([weights[n] for n in names], stats.mean_abs(), stats.second_moment(), scheme, flags, scale_dtype,
                                  n_grid=awq.N_GRID if foldable else 1,
                                  gptq_shrink=gptq.SHRINK if scheme.method == Method.AWQ_GPTQ else None,
                                  imatrix=scheme.method == Method.AWQ_IMATRIX)
        return SmoothedGroup(result.scales, dict(zip(names, result.quantized)), result.alpha)
    if scheme.method == Method.SMOOTHQUANT:
        result = smoothquant.search_alpha([weights[n] for n in names], stats.absmax(), stats.samples, scheme,
                                          alphas=smoothquant.ALPHA_GRID if foldable else (), scale_dtype=scale_dtype)
        return SmoothedGroup(result.scales, dict(zip(names, result.quantized)), result.alpha)
    raise ValueError(f"{scheme} is not a smoothing scheme")


def quantize(weight: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype, stats: dict | None = None) -> QuantizedWeight:
    if scheme.method in SMOOTHING:
        raise BitplanError(f"{scheme} smooths a group of Linears: quantize it with quantize_smoothing_group")
    if scheme.method not in QUANTIZERS:
        raise BitplanError(f"method {scheme.method} is not available yet: choose from {', '.join(map(str, QUANTIZERS))}")
    return QUANTIZERS[scheme.method](weight, scheme, scale_dtype, stats or {})


ROW_CHUNK = 2**26  # elements: a larger Linear (a 128k-vocabulary head) is quantized this many at a time


def row_chunks(out_features: int, in_features: int) -> list[tuple[int, int]]:
    """Row ranges of an ``[out, in]`` weight of at most ``ROW_CHUNK`` elements each (one range for
    most Linears). Every method that quantizes one Linear alone works row by row (groups run along
    a row; GPTQ's rows are independent given H), so quantizing the ranges one by one and stacking
    the results is quantizing the whole, with a fraction of the working memory."""
    rows = max(1, ROW_CHUNK // in_features)
    return [(start, min(start + rows, out_features)) for start in range(0, out_features, rows)]


def quantize_by_rows(weight: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype, stats: dict | None = None) -> QuantizedWeight:
    """:func:`quantize`, a :func:`row_chunks` range at a time for a large weight (not ggml types,
    whose results are byte blocks)."""
    if scheme.method == Method.GGML:
        return quantize(weight, scheme, scale_dtype, stats)
    return quantize_row_ranges(lambda start, stop: weight[start:stop], *weight.shape, scheme, scale_dtype, stats)


def quantize_row_ranges(read_rows: Callable[[int, int], torch.Tensor], out_features: int, in_features: int, scheme: Scheme,
                        scale_dtype: torch.dtype, stats: dict | None = None) -> QuantizedWeight:
    """:func:`quantize` of an ``[out, in]`` weight read a :func:`row_chunks` range at a time by
    ``read_rows(start, stop)``: a 128k-vocabulary head is never held whole in float32."""
    chunks = row_chunks(out_features, in_features)
    if len(chunks) == 1:
        return quantize(read_rows(0, out_features).to(torch.float32), scheme, scale_dtype, stats)
    parts = [quantize(read_rows(start, stop).to(torch.float32), scheme, scale_dtype, stats) for start, stop in chunks]
    zero = None if parts[0].zero is None else torch.cat([p.zero for p in parts])
    return QuantizedWeight(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]), zero, scheme)


def needs_calibration(schemes: Iterable[Scheme]) -> bool:
    return any(scheme.method in CALIBRATED for scheme in schemes)


def available_methods() -> list[str]:
    return [str(m) for m in (*QUANTIZERS, *sorted(SMOOTHING))]


def method_schemes(method: Method, bits: Iterable[int], group_sizes: Iterable[int], symmetric: Iterable[bool],
                   act_formats: Iterable[str] = ("int8", "fp8")) -> list[Scheme]:
    """The schemes one method offers within the requested grid.

    Integer methods (RTN, GPTQ, AWQ, HQQ): every bit width x group x symmetry; imatrix and AWQ + imatrix the same,
    symmetric only. NF4: 4-bit, the requested groups (blocks; not per channel). FP8: 8-bit weights per channel and per group,
    plus W8A8-FP8 per channel where ``act_formats`` has "fp8". SmoothQuant: W8A8 int8 per
    channel where ``act_formats`` has "int8". Methods whose bit width is not requested offer none.
    """
    bits, group_sizes, symmetric = list(bits), list(group_sizes), list(symmetric)
    if method == Method.NF4:
        return [Scheme(method, 4, g, True) for g in group_sizes if g and 4 in bits]
    if method == Method.GGML:  # every quantized GGUF type of a requested width (F16/BF16: "none", the checkpoint dtype)
        return [Scheme.ggml(t) for t in GGML_SCHEME_TYPES if Scheme.ggml(t).bits in bits]
    if method == Method.FP8:
        if 8 not in bits:
            return []
        schemes = [Scheme(method, 8, g, True) for g in group_sizes]
        return schemes + ([Scheme(method, 8, 0, True, act_bits=8)] if "fp8" in act_formats else [])
    if method == Method.SMOOTHQUANT:
        return [Scheme(method, 8, 0, True, act_bits=8)] if 8 in bits and "int8" in act_formats else []
    if method in (Method.IMATRIX, Method.AWQ_IMATRIX):  # its search is symmetric (llama.cpp's Q4_0/Q5_0)
        return [Scheme(method, b, g, True) for b, g in itertools.product(bits, group_sizes) if True in symmetric]
    return [Scheme(method, b, g, sym) for b, g, sym in itertools.product(bits, group_sizes, symmetric)]


def candidate_schemes(
    methods: Iterable[str] = ("rtn",),
    bits: Iterable[int] = INTEGER_BITS,
    group_sizes: Iterable[int] = GROUP_SIZES,
    symmetric: Iterable[bool] = (True, False),
    include_dense: bool = True,
    act_formats: Iterable[str] = ("int8", "fp8"),
    costly_bits: Iterable[int] | None = None,
) -> list[Scheme]:
    """The requested methods' schemes (:func:`method_schemes`) within the grid, sorted.

    ``include_dense`` adds "none" (the weight left in the checkpoint dtype), which is always
    feasible and loses nothing. ``act_formats`` lists the activation formats the target runs
    natively ("int8", "fp8"); W8A8 candidates of other formats are left out. ``costly_bits``
    (the default set uses ``COSTLY_DEFAULT_BITS``) offers the ``COSTLY`` methods only at those widths
    and symmetric; None offers them on the whole grid.
    """
    chosen = []
    for name in methods:
        try:
            method = Method(name)
        except ValueError:
            raise BitplanError(f"unknown method {name!r}: choose from {', '.join(available_methods())}") from None
        if str(method) not in available_methods() or method == Method.NONE:
            raise BitplanError(f"method {name} is not available: choose from {', '.join(available_methods())}")
        chosen.append(method)
    bits, group_sizes, symmetric = list(bits), list(group_sizes), list(symmetric)
    bad_bits = [b for b in bits if b not in INTEGER_BITS]
    if bad_bits:
        raise BitplanError(f"unsupported bit widths {bad_bits}: choose from {', '.join(map(str, INTEGER_BITS))}")
    bad_groups = [g for g in group_sizes if g not in GROUP_SIZES]
    if bad_groups:
        raise BitplanError(f"unsupported group sizes {', '.join(map(group_label, bad_groups))}: no bitplan kernel or engine stores them; "
                           f"choose from {', '.join(map(group_label, GROUP_SIZES))} (c = per channel)")
    schemes = set()
    for method in chosen:
        if costly_bits is not None and method in COSTLY:
            schemes.update(method_schemes(method, [b for b in bits if b in costly_bits], group_sizes, [True], act_formats))
        else:
            schemes.update(method_schemes(method, bits, group_sizes, symmetric, act_formats))
    schemes = sorted(schemes)
    if not schemes:
        raise BitplanError("the candidate set is empty: give at least one method and bit width")
    return [*schemes, DENSE] if include_dense else schemes
