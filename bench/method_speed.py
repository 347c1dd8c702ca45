"""Seconds to GPTQ-quantize every Linear of smollm2-135m at 4 bits, beside llm-compressor's GPTQ.

bitplan: ``quantize_gptq`` per Linear, and ``gptq_rows`` once per shared input (q/k/v and
gate/up concatenated; rows are independent given H, so the result is identical). Oracle:
llm-compressor's ``quantize_weight`` (eager CPU path) with min/max group parameters, where it
imports (with the default threads and with one). bitplan's column loop runs on one thread
by itself (see ``gptq._one_thread``). Hessians come from the cached calibration statistics of ``method_common`` (their
collection is not timed). Asymmetric, group 128 where it divides the inputs, else 64.

    .venv/bin/python bench/method_speed.py
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from method_common import statistics
from method_errors import GROUPS

from bitplan.methods.gptq import gptq_rows, quantize_gptq
from bitplan.methods.scheme import Scheme

BITS = 4


def scheme_for(in_features: int) -> Scheme:
    return Scheme("gptq", BITS, 128 if in_features % 128 == 0 else 64, False)


def time_per_linear(data: dict) -> float:
    start = time.perf_counter()
    for name, weight in data["weights"].items():
        quantize_gptq(weight, 2 * data["calibration"][name]["second_moment"], scheme_for(weight.shape[1]))
    return time.perf_counter() - start


def time_shared_inputs(data: dict) -> float:
    blocks = len({n.split(".")[2] for n in data["weights"]})
    start = time.perf_counter()
    for block in range(blocks):
        for group in GROUPS:
            names = [f"model.layers.{block}.{s}" for s in group]
            weights = torch.cat([data["weights"][n] for n in names])
            gptq_rows(weights, 2 * data["calibration"][names[0]]["second_moment"], scheme_for(weights.shape[1]))
    return time.perf_counter() - start


def oracle_quantizer():
    """llm-compressor's GPTQ as a function (weight, H, scheme) -> dequantized weight, or None."""
    try:
        from compressed_tensors.quantization import QuantizationArgs
        from compressed_tensors.quantization.utils import calculate_qparams
        from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
    except ImportError as error:
        print(f"llm-compressor unavailable: {error}")
        return None

    def run(weight: torch.Tensor, H: torch.Tensor, scheme: Scheme) -> torch.Tensor:
        args = QuantizationArgs(num_bits=scheme.bits, type="int", symmetric=scheme.symmetric,
                                strategy="group", group_size=scheme.group_size)
        groups = weight.reshape(weight.shape[0], -1, scheme.group_size)
        scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
        quantized, _, _ = quantize_weight(weight.unsqueeze(0).clone(), H.unsqueeze(0).clone(),
                                          scale.unsqueeze(0), zero.unsqueeze(0), None, args)
        return quantized[0]

    return run


def time_oracle(data: dict, run) -> float:
    start = time.perf_counter()
    for name, weight in data["weights"].items():
        run(weight, 2 * data["calibration"][name]["second_moment"], scheme_for(weight.shape[1]))
    return time.perf_counter() - start


def main() -> None:
    data = statistics()
    report = {"bits": BITS, "linears": len(data["weights"]), "threads": torch.get_num_threads(),
              "load_average_before": os.getloadavg()[0]}
    report["bitplan_per_linear_s"] = time_per_linear(data)
    report["bitplan_shared_inputs_s"] = time_shared_inputs(data)
    run = oracle_quantizer()
    report["llmcompressor_s"] = None if run is None else time_oracle(data, run)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the oracle on one thread too, for a like-for-like comparison
    report["llmcompressor_one_thread_s"] = None if run is None else time_oracle(data, run)
    torch.set_num_threads(threads)
    report["load_average_after"] = os.getloadavg()[0]
    print(f"GPTQ {BITS}-bit over {report['linears']} Linears ({report['threads']} threads, load average "
          f"{report['load_average_before']:.1f} before, {report['load_average_after']:.1f} after: other work shares the cores):")
    print(f"  bitplan, one call per Linear:        {report['bitplan_per_linear_s']:6.1f} s")
    print(f"  bitplan, one call per shared input:  {report['bitplan_shared_inputs_s']:6.1f} s")
    if report["llmcompressor_s"] is not None:
        print(f"  llm-compressor quantize_weight:      {report['llmcompressor_s']:6.1f} s "
              f"({report['llmcompressor_one_thread_s']:.1f} s on one thread)")
    out = Path(__file__).parent / "results" / "method_speed.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
