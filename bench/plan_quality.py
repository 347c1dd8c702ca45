"""Plan quality: bitplan's mixed plan against the best uniform configuration at equal bytes.

For each budget equal to the deployment size of uniform RTN at 3, 4, 5 and 6 bits (group 128,
symmetric; group 64 where 128 does not divide the inputs), measure held-out KL and perplexity
of (a) the best uniform configuration from the same candidate set that fits, and (b) bitplan's
plan. Uniform candidates are tried from the largest that fits downwards (up to --uniform-tries).

    .venv/bin/python bench/plan_quality.py [--exclude-group 32]
"""

from __future__ import annotations

import argparse
import math
import time

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bits", default="3,4,5,6")
    parser.add_argument("--heldout", type=int, default=6, help="windows of 512 tokens per slice")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--uniform-tries", type=int, default=3)
    parser.add_argument("--exclude-group", type=int, action="append", default=[], help="drop a group size from the candidates (e.g. 32: the model's native Q4_1 grid)")
    args = parser.parse_args()

    folder = resolve_model("smollm2-135m")
    spec = spec_from_folder(folder)
    groups = tuple(g for g in (32, 64, 128, 0) if g not in args.exclude_group)
    candidates = Candidates(("rtn",), (2, 3, 4, 5, 6, 8), groups)
    schemes = [s for s in candidates.schemes() if not s.is_dense]
    windows = heldout_windows(load_tokenizer(folder), args.heldout)
    all_windows = torch.cat(list(windows.values()))
    meter = QualityMeter(load_dense_model(folder), spec)

    def measure(assignment):
        """Per-slice KL and perplexity, and their token-weighted combination (one pass per slice)."""
        meter.apply(assignment)
        by_slice = {name: meter.measure(w) for name, w in windows.items()}
        tokens = sum(q.tokens for q in by_slice.values())
        kl = sum(q.kl * q.tokens for q in by_slice.values()) / tokens
        log_ppl = sum(math.log(q.perplexity) * q.tokens for q in by_slice.values()) / tokens
        ref = sum(math.log(q.reference_perplexity) * q.tokens for q in by_slice.values()) / tokens
        return kl, math.exp(log_ppl), math.exp(ref), {name: q.kl for name, q in by_slice.items()}

    rows = []
    for bits in (int(b) for b in args.bits.split(",")):
        reference = uniform_assignment(spec, Scheme("rtn", bits, 128, True))
        deployment = Deployment(budget_bytes=0, context=2048)
        budget = memory_breakdown(spec, assignment_bytes(spec, reference), deployment).total_bytes
        weight_budget = assignment_bytes(spec, reference)
        fitting = sorted(((assignment_bytes(spec, uniform_assignment(spec, s)), s) for s in schemes), key=lambda t: (-t[0], t[1].name))
        fitting = [(size, s) for size, s in fitting if size <= weight_budget][: args.uniform_tries]
        uniform = [(measure(uniform_assignment(spec, scheme)), scheme, size) for size, scheme in fitting]
        best_uniform = min(uniform, key=lambda u: u[0][0])
        started = time.time()
        plan = bitplan.plan("smollm2-135m", budget=budget, context=2048, candidates=candidates,
                            calibration=CalibrationSettings(), trials=args.trials, seed=0)
        plan_seconds = time.time() - started
        plan_kl, plan_ppl, reference_ppl, plan_slices = measure(plan.schemes())
        (uniform_kl, uniform_ppl, _, uniform_slices), uniform_scheme, uniform_bytes = best_uniform
        rows.append({
            "bits": bits, "budget_bytes": budget, "weight_budget_bytes": weight_budget,
            "uniform_scheme": uniform_scheme.name, "uniform_bytes": uniform_bytes, "uniform_kl": uniform_kl,
            "uniform_ppl": uniform_ppl, "uniform_kl_by_slice": uniform_slices,
            "uniform_tried": {s.name: q[0] for q, s, _ in uniform},
            "plan_bytes": plan.memory.quantized_weights_bytes, "plan_kl": plan_kl, "plan_ppl": plan_ppl,
            "plan_kl_by_slice": plan_slices, "reference_ppl": reference_ppl,
            "kl_reduction": 1 - plan_kl / uniform_kl, "plan_seconds": plan_seconds,
            "plan_schemes": sorted(set(plan.assignments.values())),
        })
        r = rows[-1]
        print(f"{bits}-bit budget {budget/1e6:.2f} MB | uniform {r['uniform_scheme']:<12} KL {r['uniform_kl']:.4f} ppl {r['uniform_ppl']:.2f} | "
              f"bitplan KL {r['plan_kl']:.4f} ppl {r['plan_ppl']:.2f} | KL -{100*r['kl_reduction']:.1f}% | plan {plan_seconds:.0f}s", flush=True)
    print()
    print("| budget (uniform RTN g128 sym) | total MB | best uniform that fits | uniform KL | uniform ppl | bitplan KL | bitplan ppl | KL reduction |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['bits']}-bit | {r['budget_bytes']/1e6:.2f} | {r['uniform_scheme']} | {r['uniform_kl']:.4f} | {r['uniform_ppl']:.2f} | "
              f"{r['plan_kl']:.4f} | {r['plan_ppl']:.2f} | {100*r['kl_reduction']:.1f}% |")
    print(f"original perplexity on the same tokens: {rows[0]['reference_ppl']:.2f}; held-out tokens: {all_windows.numel()}")
    suffix = "" if not args.exclude_group else "-no-g" + "-".join(map(str, args.exclude_group))
    print("saved", save(f"plan_quality{suffix}", {"groups": groups, "rows": rows, "heldout_tokens": all_windows.numel()}))


if __name__ == "__main__":
    main()
