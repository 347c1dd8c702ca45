"""The planner with every method against the RTN-only planner, at equal bytes, on held-out text.

Budgets are the deployment sizes of uniform RTN at 3 and 4 bits (group 128, symmetric; group
64 where 128 does not divide the inputs; 2048-token fp16 KV cache), as in plan_quality.py. Both
planners run with the same calibration, seed and refinement trials; the RTN-only planner gets
RTN's whole grid (2-8 bits, groups 32/64/128/channel, both symmetries), the all-methods planner
gets the default candidate set (``bitplan.api.Candidates()``). Profiling time of each
candidate set is recorded (a cached table reads as ~0 s: pass --fresh-cache to re-measure).

    .venv/bin/python bench/methods_planner.py [--bits 3,4] [--trials 12]
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import tempfile
import time
from pathlib import Path

import torch
from common import heldout_windows, save

import bitplan
from bitplan.api import CalibrationSettings, Candidates
from bitplan.methods.scheme import Scheme
from bitplan.models.source import resolve_model
from bitplan.models.spec import spec_from_folder
from bitplan.planner.baselines import assignment_bytes, uniform_assignment
from bitplan.planner.deployment import Deployment, memory_breakdown
from bitplan.planner.quality import QualityMeter, load_dense_model
from bitplan.profiles.calibration import load_tokenizer

SETS = {
    "rtn-only": Candidates(("rtn",)),
    "all methods (default)": Candidates(),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bits", default="3,4")
    parser.add_argument("--heldout", type=int, default=6, help="windows of 512 tokens per slice")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--fresh-cache", action="store_true", help="profile into an empty cache to time profiling")
    args = parser.parse_args()
    if args.fresh_cache:
        root = Path(tempfile.mkdtemp(prefix="bitplan-bench-"))
        (root / "models").mkdir()
        (root / "models" / "smollm2-135m").symlink_to(resolve_model("smollm2-135m"))
        os.environ["BITPLAN_CACHE"] = str(root)

    folder = resolve_model("smollm2-135m")
    spec = spec_from_folder(folder)
    windows = heldout_windows(load_tokenizer(folder), args.heldout)
    meter = QualityMeter(load_dense_model(folder), spec)
    settings = CalibrationSettings()
    from bitplan.profiles.calibration import calibration_windows

    meter.calibrate(calibration_windows(folder, settings)[: settings.samples])

    def measure(assignment):
        meter.apply(assignment)
        by_slice = {name: meter.measure(w) for name, w in windows.items()}
        tokens = sum(q.tokens for q in by_slice.values())
        kl = sum(q.kl * q.tokens for q in by_slice.values()) / tokens
        ppl = math.exp(sum(math.log(q.perplexity) * q.tokens for q in by_slice.values()) / tokens)
        return kl, ppl

    profile_seconds = {}
    for label, candidates in SETS.items():
        started = time.time()
        bitplan.profile("smollm2-135m", candidates, settings, seed=0)
        profile_seconds[label] = time.time() - started
        print(f"profile {label}: {len(candidates.schemes())} schemes, {profile_seconds[label]:.1f} s", flush=True)

    rows = []
    for bits in map(int, args.bits.split(",")):
        reference = uniform_assignment(spec, Scheme("rtn", bits, 128, True))
        weight_budget = assignment_bytes(spec, reference)
        budget = memory_breakdown(spec, weight_budget, Deployment(budget_bytes=0, context=2048)).total_bytes
        row = {"bits": bits, "budget_bytes": budget, "weight_budget_bytes": weight_budget}
        for label, candidates in SETS.items():
            started = time.time()
            plan = bitplan.plan("smollm2-135m", budget=budget, context=2048, candidates=candidates, calibration=settings,
                                trials=args.trials, seed=0)
            seconds = time.time() - started
            kl, ppl = measure(plan.schemes())
            methods = collections.Counter(Scheme.parse(s).method.value for s in plan.assignments.values())
            row[label] = {"kl": kl, "ppl": ppl, "bytes": plan.memory.quantized_weights_bytes, "plan_seconds": seconds,
                          "methods": dict(methods), "calibration_kl": plan.predicted.calibration_kl}
            print(f"{bits}-bit budget {budget / 1e6:.2f} MB  {label:22s} KL {kl:.4f} ppl {ppl:.2f}  "
                  f"bytes {plan.memory.quantized_weights_bytes}  methods {dict(methods)}  ({seconds:.0f} s)", flush=True)
        all_kl, rtn_kl = row["all methods (default)"]["kl"], row["rtn-only"]["kl"]
        row["kl_reduction"] = 1 - all_kl / rtn_kl
        rows.append(row)
    path = save("methods_planner", {"rows": rows, "profile_seconds": profile_seconds, "trials": args.trials,
                                    "heldout_tokens": sum(w.numel() for w in windows.values())})
    print(f"saved {path}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
