"""GPTQ's Hessian shrunk toward its diagonal: uniform GPTQ's held-out KL in and out of domain per shrink.

SmolLM2-135M, uniform GPTQ g64 symmetric at each bit width, GPTQ fitted on the default
calibration (``--samples`` windows of 512 tokens of the built-in Python documentation), with
``gptq.SHRINK`` set to each value; uniform AWQ and RTN of the same bytes beside it (``--uniform``;
``awqgptq`` is AWQ's scales then GPTQ at the kept shrink). Held-out KL
(nats/token, against the original model) on ``--heldout`` windows each of pydoc's held-out prose
and code, of Debian's fortunes (``make text-fortunes``) and of the Jargon File (``make text-jargon``),
neither ever calibrated on.

    .venv/bin/python bench/gptq_shrink.py [--shrink 0,0.2,0.35,0.5,0.9 --bits 3,4]
"""

from __future__ import annotations

import argparse
import time

from common import save
from domain_common import heldout, jargon_heldout

from bitplan.methods import gptq
from bitplan.methods.scheme import Scheme
from bitplan.models.source import open_model
from bitplan.planner.baselines import uniform_assignment
from bitplan.planner.quality import QualityMeter, load_dense_model
from bitplan.profiles.calibration import CalibrationSettings, calibration_windows, load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shrink", default="0,0.2,0.35,0.5,0.9")
    parser.add_argument("--bits", default="3,4")
    parser.add_argument("--uniform", default="awq,rtn", help="methods measured beside GPTQ at each bit width (awqgptq: AWQ + GPTQ)")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--heldout", type=int, default=4, help="held-out windows of 512 tokens per slice")
    parser.add_argument("--out", default="gptq_shrink")
    args = parser.parse_args()
    source = open_model("smollm2-135m")
    calibration = CalibrationSettings((), args.samples, 512)
    tokenizer = load_tokenizer(source.folder)
    texts = {**heldout(tokenizer, args.heldout, 512), "jargon": jargon_heldout(tokenizer, args.heldout, 512)}
    meter = QualityMeter(load_dense_model(source.folder), source.spec)
    meter.calibrate(calibration_windows(source.folder, calibration)[: args.samples])
    kept = gptq.SHRINK
    rows = []

    def measure(name: str, shrink: float | None) -> None:
        meter.cache.clear()  # the cache keys on the scheme, not on SHRINK
        started = time.time()
        meter.apply(uniform_assignment(source.spec, Scheme.parse(name)))
        kl = {slice_name: meter.measure(windows).kl for slice_name, windows in texts.items()}
        rows.append({"scheme": name, "shrink": shrink, "heldout_kl": kl, "seconds": round(time.time() - started, 1)})
        print(f"{name:12s} shrink {shrink if shrink is not None else '-':>5}  " + "  ".join(f"{k} {v:.4f}" for k, v in kl.items()), flush=True)

    try:
        for bits in args.bits.split(","):
            for shrink in (float(v) for v in args.shrink.split(",") if v):
                gptq.SHRINK = shrink
                measure(f"gptq-w{bits}g64s", shrink)
            gptq.SHRINK = kept
            for method in filter(None, args.uniform.split(",")):
                measure(f"{method}-w{bits}g64s", gptq.SHRINK if method in ("gptq", "awqgptq") else None)
    finally:
        gptq.SHRINK = kept
    print("saved", save(args.out, {"samples": args.samples, "heldout_tokens_per_slice": args.heldout * 512, "kept_shrink": kept, "rows": rows}))


if __name__ == "__main__":
    main()
