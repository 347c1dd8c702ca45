"""Symmetric grids: ``absmax / qmax`` (one code unused) against ``absmax / ((2**b - 1) / 2)`` (all codes,
compressed-tensors' ``calculate_qparams``, bitplan's grid since this change), side by side in one run.

Relative output error ‖WX − Q(W)X‖/‖WX‖ on held-out text (exact through X Xᵀ / n) of the five
Linears of SmolLM2-135M's block 3 in ``tests/methods/smollm2_layers.py`` (q, k, o, up, down;
statistics from 64 x 256 calibration and 16 x 256 held-out tokens of the Python docs), for RTN,
GPTQ, AWQ and HQQ, symmetric, 2/3/4 bits, group 64 (576 inputs) or 128 (down_proj's 1536).
The old grid is the same code with ``quantize_params`` wrapped to divide by qmax, so nothing but
the grid differs. The weights were published on a 4-bit group-32 grid with a float minimum;
symmetric groups of 64/128 are not on it.

    .venv/bin/python bench/grid_codes.py
"""

from __future__ import annotations

import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import torch
from common import save

sys.path.insert(0, str(Path(__file__).parent.parent / "tests" / "methods"))
from smollm2_layers import load_real_layers  # noqa: E402

from bitplan.kernels.numerics import grouped  # noqa: E402
from bitplan.methods import gptq, hqq, rtn  # noqa: E402
from bitplan.methods.awq import effective_weight, quantize_awq  # noqa: E402
from bitplan.methods.calibration_stats import relative_output_error  # noqa: E402
from bitplan.methods.scheme import Scheme  # noqa: E402
from bitplan.models.source import builtin_gguf  # noqa: E402

METHODS = ("rtn", "gptq", "awq", "hqq")
BITS = (2, 3, 4)
real_quantize_params = rtn.quantize_params


def one_code_unused(weight, scheme, scale_dtype):
    """The grid before: ``scale = absmax / qmax`` (symmetric), so qmin is never used."""
    if not scheme.symmetric:
        return real_quantize_params(weight, scheme, scale_dtype)
    _, qmax = rtn.integer_range(scheme.bits)
    absmax = grouped(weight.to(torch.float32), scheme.group_size).abs().amax(dim=-1)
    scale = (absmax / qmax).clamp_min(torch.finfo(torch.float32).tiny).to(scale_dtype)
    return torch.where(scale.to(torch.float32) == 0, torch.ones_like(scale), scale), None


def approximate(method: str, weight, calib, scheme: Scheme) -> torch.Tensor:
    if method == "rtn":
        return rtn.quantize_rtn(weight, scheme).dequantize()
    if method == "gptq":
        return gptq.quantize_gptq(weight, calib.hessian(), scheme)[0].dequantize()
    if method == "hqq":
        return hqq.quantize_hqq(weight, scheme).dequantize()
    result = quantize_awq([weight], calib.mean_abs(), calib.second_moment(), scheme)
    return effective_weight(result.quantized[0], result.scales)


def errors(layers: dict, grid: str) -> list[dict]:
    rows = []
    with ExitStack() as stack:
        if grid == "absmax/qmax":
            for module in (rtn, gptq, hqq):
                stack.enter_context(mock.patch.object(module, "quantize_params", one_code_unused))
        for bits in BITS:
            for method in METHODS:
                for name, (weight, calib, held) in layers.items():
                    scheme = Scheme(method, bits, 128 if weight.shape[1] % 128 == 0 else 64, True)
                    error = relative_output_error(weight, approximate(method, weight, calib, scheme), held.second_moment())
                    rows.append({"grid": grid, "method": method, "bits": bits, "layer": name, "error": error})
    return rows


def main() -> None:
    start = time.perf_counter()
    layers = load_real_layers(builtin_gguf())
    rows = errors(layers, "absmax/qmax") + errors(layers, "all codes")
    table = []
    print("| method | bits | median error, absmax/qmax | median error, all codes | change |")
    print("|---|---|---|---|---|")
    for method in METHODS:
        for bits in BITS:
            old, new = (statistics.median(r["error"] for r in rows if (r["grid"], r["method"], r["bits"]) == (g, method, bits))
                        for g in ("absmax/qmax", "all codes"))
            table.append({"method": method, "bits": bits, "old": old, "new": new, "change": new / old - 1})
            print(f"| {method} | {bits} | {old:.4f} | {new:.4f} | {100 * (new / old - 1):+.1f}% |")
    elapsed = time.perf_counter() - start
    print(f"total {elapsed:.0f} s")
    print(f"wrote {save('grid_codes', {'rows': rows, 'table': table, 'elapsed_s': elapsed})}")


if __name__ == "__main__":
    main()
