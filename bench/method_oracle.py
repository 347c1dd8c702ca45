"""bitplan's GPTQ and HQQ beside independent implementations, on the same layers and inputs.

Oracles that run on this CPU machine: llm-compressor (``quantize_weight``, its GPTQ with
min/max group parameters fixed from the original weights) and ``hqq`` (``Quantizer.quantize``
with its proximal optimiser; float zero points, which compressed-tensors cannot store, with and
without ``round_zero``, and with its zero rounded to an integer as our format needs). Same Hessian / weights, held-out relative output error
‖WX − ŴX‖/‖WX‖. Layers: every Linear of blocks 0, 10, 20, 29; 3 and 4 bits, asymmetric,
group 128 where it divides the inputs, else 64.

    .venv/bin/python bench/method_oracle.py
"""

from __future__ import annotations

import json
import statistics as stats_lib
from pathlib import Path

import torch
from method_common import SUFFIXES, statistics
from method_speed import oracle_quantizer

from bitplan.methods.calibration_stats import relative_output_error
from bitplan.methods.gptq import quantize_gptq
from bitplan.methods.hqq import quantize_hqq
from bitplan.methods.rtn import quantize_rtn
from bitplan.methods.scheme import Scheme

BLOCKS = (0, 10, 20, 29)


def hqq_oracle():
    """The hqq library's quantize-dequantize as (weight, scheme, round_zero) -> weight, or None."""
    try:
        from hqq.core.quantize import Quantizer
    except ImportError as error:
        print(f"hqq unavailable: {error}")
        return None

    def run(weight: torch.Tensor, scheme: Scheme, round_zero: bool, integer_zero: bool = False) -> torch.Tensor:
        """``integer_zero``: round the library's optimised zero and re-round the codes, i.e. the
        library's result stored the way compressed-tensors must store it (integer zero points)."""
        codes, meta = Quantizer.quantize(weight, nbits=scheme.bits, group_size=scheme.group_size, optimize=True,
                                         round_zero=round_zero, axis=1, bitpack=False, device="cpu",
                                         compute_dtype=torch.float32)
        scale, zero = meta["scale"], meta["zero"]
        if integer_zero:
            zero = torch.round(zero)
            groups = weight.to(torch.float32).reshape(-1, scheme.group_size)
            codes = torch.round(groups / scale + zero).clamp(0, 2**scheme.bits - 1)
        return ((codes.to(torch.float32) - zero) * scale).reshape(weight.shape)

    return run


def main() -> None:
    data = statistics()
    gptq_oracle, hqq_lib = oracle_quantizer(), hqq_oracle()
    rows = []
    for block in BLOCKS:
        for suffix in SUFFIXES:
            name = f"model.layers.{block}.{suffix}"
            weight = data["weights"][name]
            H = 2 * data["calibration"][name]["second_moment"]
            held = data["held_out"][name]["second_moment"]
            for bits in (3, 4):
                scheme = Scheme("gptq", bits, 128 if weight.shape[1] % 128 == 0 else 64, False)
                row = {"layer": name, "bits": bits, "group_size": scheme.group_size}
                row["rtn"] = relative_output_error(weight, quantize_rtn(weight, scheme).dequantize(), held)
                row["bitplan_gptq"] = relative_output_error(weight, quantize_gptq(weight, H, scheme)[0].dequantize(), held)
                if gptq_oracle:
                    row["llmcompressor_gptq"] = relative_output_error(weight, gptq_oracle(weight, H, scheme), held)
                row["bitplan_hqq"] = relative_output_error(weight, quantize_hqq(weight, scheme).dequantize(), held)
                if hqq_lib:
                    row["hqq_lib"] = relative_output_error(weight, hqq_lib(weight, scheme, False), held)
                    row["hqq_lib_round_zero"] = relative_output_error(weight, hqq_lib(weight, scheme, True), held)
                    row["hqq_lib_integer_zero"] = relative_output_error(weight, hqq_lib(weight, scheme, False, True), held)
                rows.append(row)
                print("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    summary = {}
    for bits in (3, 4):
        subset = [r for r in rows if r["bits"] == bits]
        pairs = [("bitplan_gptq", "llmcompressor_gptq"), ("bitplan_hqq", "hqq_lib"), ("bitplan_hqq", "hqq_lib_round_zero"),
                 ("bitplan_hqq", "hqq_lib_integer_zero"), ("bitplan_hqq", "rtn"), ("bitplan_gptq", "rtn")]
        for ours, theirs in pairs:
            if theirs not in subset[0]:
                continue
            ratios = [r[ours] / r[theirs] for r in subset]
            summary[f"{bits}bit {ours}/{theirs}"] = {
                "median_ratio": stats_lib.median(ratios), "max_ratio": max(ratios),
                "within_5_percent_or_better": 100.0 * sum(x <= 1.05 for x in ratios) / len(ratios)}
    print("\nerror ratio bitplan / oracle (below 1: bitplan better), over", len(rows) // 2, "Linears:")
    for key, s in summary.items():
        print(f"  {key:40} median {s['median_ratio']:.3f}  max {s['max_ratio']:.3f}  "
              f"within 5% or better on {s['within_5_percent_or_better']:.0f}% of layers")
    out = Path(__file__).parent / "results" / "method_oracle.json"
    out.write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
