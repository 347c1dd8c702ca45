"""End to end, per method: held-out KL and perplexity of uniform models on the real SmolLM2 weights.

Every Linear takes the same scheme (group 128, falling back to 64 where 128 does not divide the
inputs; symmetric, so the model's published Q4_1 grid, g32 with a float minimum, is not used),
applied through the same block quantizer emit writes from (AWQ and SmoothQuant scales folded,
W8A8 activations quantized per token). Calibrated methods see the planner's calibration
windows (16 x 512 tokens of the built-in text); measurement is on held-out text (prose and code).

    .venv/bin/python bench/method_perplexity.py [--heldout 6] [--bits 3,4]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from common import heldout_windows, save

from bitplan.methods.scheme import Scheme
from bitplan.models.source import resolve_model
from bitplan.models.spec import spec_from_folder
from bitplan.planner.baselines import assignment_bytes, uniform_assignment
from bitplan.planner.quality import QualityMeter, load_dense_model
from bitplan.profiles.calibration import CalibrationSettings, calibration_windows, load_tokenizer

INTEGER_METHODS = ("rtn", "gptq", "awq", "hqq")
EIGHT_BIT = ("rtn-w8gcs", "smoothquant-w8gcsa8", "fp8-w8gcs", "fp8-w8gcsa8")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--heldout", type=int, default=6, help="windows of 512 tokens per slice")
    parser.add_argument("--bits", default="3,4")
    args = parser.parse_args()

    folder = resolve_model("smollm2-135m")
    spec = spec_from_folder(folder)
    windows = heldout_windows(load_tokenizer(folder), args.heldout)
    meter = QualityMeter(load_dense_model(folder), spec)
    settings = CalibrationSettings()
    started = time.time()
    meter.calibrate(calibration_windows(folder, settings)[: settings.samples])
    calibrate_seconds = time.time() - started

    schemes = [Scheme(method, bits, 128, True) for bits in map(int, args.bits.split(",")) for method in INTEGER_METHODS]
    schemes += [Scheme.parse("nf4-w4g64s")] + [Scheme.parse(name) for name in EIGHT_BIT]
    rows = []
    for scheme in [None, *schemes]:
        assignment = uniform_assignment(spec, scheme) if scheme else {}
        started = time.time()
        meter.apply(assignment)
        quantize_seconds = time.time() - started
        by_slice = {name: meter.measure(w) for name, w in windows.items()}
        tokens = sum(q.tokens for q in by_slice.values())
        row = {
            "scheme": scheme.name if scheme else "unquantized (bf16)",
            "method": str(scheme.method) if scheme else "none",
            "bits": scheme.bits if scheme else 16,
            "linear_bytes": assignment_bytes(spec, assignment) if scheme else assignment_bytes(spec, uniform_assignment(spec, Scheme.parse("none"))),
            "kl": sum(q.kl * q.tokens for q in by_slice.values()) / tokens,
            "ppl": math.exp(sum(math.log(q.perplexity) * q.tokens for q in by_slice.values()) / tokens),
            "ppl_by_slice": {name: q.perplexity for name, q in by_slice.items()},
            "quantize_seconds": quantize_seconds,
        }
        rows.append(row)
        print(f"{row['scheme']:24s} {row['linear_bytes'] / 1e6:7.2f} MB  KL {row['kl']:.4f}  ppl {row['ppl']:8.2f}  "
              f"({', '.join(f'{k} {v:.2f}' for k, v in row['ppl_by_slice'].items())})  quantize {quantize_seconds:.1f}s", flush=True)
        meter.cache.clear()
    path = save("method_perplexity", {"rows": rows, "heldout_tokens": tokens, "calibration": [settings.samples, settings.seq_len],
                                      "calibrate_seconds": calibrate_seconds})
    print(f"saved {path}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
