"""Domain calibration: does calibrating on the deployment's own kind of text give a better plan there?

SmolLM2-135M, one budget (uniform RTN 4-bit g64 everywhere, context 512: about 4.25 bits per
weight), candidates RTN and GPTQ at 3, 4 and 8 bits (g64, symmetric) for bitplan's own loader.
Plans are calibrated on (a) the built-in Python documentation, (b) pydoc's prose and code and
English prose from Debian's fortunes (``make text-fortunes``) mixed, a third of the windows each,
(c) the same mixed profile with the aggregate replaced by the ``fortunes`` slice's own scores (a
plan for fortunes alone, re-weighted from the per-slice table without profiling again; its
fortunes scores come from a third of the windows), and with ``--fortunes-only``, (d) a profile
of the fortunes text alone (another full profile). GPTQ is calibrated on the plan's calibration
text, as emit does. Each plan is measured (held-out KL to the original model) on pydoc's
held-out prose and code and on fortunes-heldout.txt, with uniform 4-bit GPTQ (pydoc-calibrated)
for reference.

    .venv/bin/python bench/domain_calibration.py [--samples 16 --seq-len 256 --heldout 8 --trials 0]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import save
from domain_common import CANDIDATES, CONTEXT, ENGINE, budget_at, calibrate, heldout, measure, texts

import bitplan
from bitplan.api import CalibrationSettings
from bitplan.methods.scheme import Scheme
from bitplan.models.source import resolve_model
from bitplan.models.spec import spec_from_folder
from bitplan.planner.baselines import uniform_assignment
from bitplan.planner.quality import QualityMeter, load_dense_model
from bitplan.profiles.calibration import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--heldout", type=int, default=8, help="held-out windows per slice")
    parser.add_argument("--trials", type=int, default=0)
    parser.add_argument("--fortunes-only", action="store_true", help="also profile and plan on the fortunes text alone")
    args = parser.parse_args()

    folder = resolve_model("smollm2-135m")
    spec = spec_from_folder(folder)
    files = texts(Path(tempfile.mkdtemp(prefix="bitplan-domain-")))
    windows = heldout(load_tokenizer(folder), args.heldout, args.seq_len)
    budget, weight_budget = budget_at(spec)
    calibrations = {
        "pydoc (built-in)": CalibrationSettings((), args.samples, args.seq_len),
        "pydoc + fortunes": CalibrationSettings((files["pydoc"], files["fortunes"]), args.samples, args.seq_len),
    }
    if args.fortunes_only:
        calibrations["fortunes"] = CalibrationSettings((files["fortunes"],), args.samples, args.seq_len)
    meter = QualityMeter(load_dense_model(folder), spec)
    rows = []
    calibrate(meter, folder, calibrations["pydoc (built-in)"])
    uniform = measure(meter, uniform_assignment(spec, Scheme.parse("gptq-w4g64s")), windows)
    rows.append({"calibration": "uniform gptq-w4g64s (pydoc)", "heldout_kl": uniform, "predicted_slice_kl": None, "plan_seconds": 0.0})
    for name, calibration in calibrations.items():
        started = time.time()
        plan = bitplan.plan("smollm2-135m", budget, context=CONTEXT, candidates=CANDIDATES, calibration=calibration,
                            trials=args.trials, engine=ENGINE)
        seconds = time.time() - started
        calibrate(meter, folder, calibration)
        rows.append({"calibration": name, "heldout_kl": measure(meter, plan.schemes(), windows), "plan_seconds": seconds,
                     "predicted_slice_kl": plan.predicted_slice_kl, "weight_bytes": plan.memory.quantized_weights_bytes,
                     "schemes": {s: list(plan.assignments.values()).count(s) for s in sorted(set(plan.assignments.values()))}})
        print(f"{name}: {rows[-1]['heldout_kl']} ({seconds:.0f} s)", flush=True)
        if name == "pydoc + fortunes":
            rows.append(fortunes_slice_plan(spec, budget, calibration, meter, windows))
            print(f"{rows[-1]['calibration']}: {rows[-1]['heldout_kl']}", flush=True)
    slices = list(windows)
    print(f"\nSmolLM2-135M, budget {budget / 1e6:.2f} MB ({weight_budget / 1e6:.2f} MB of Linear weights), engine {ENGINE}, "
          f"{args.samples} x {args.seq_len} calibration tokens, {args.heldout} x {args.seq_len} held-out tokens per slice\n")
    print("| calibrated on | " + " | ".join(f"held-out KL {s}" for s in slices) + " | mean |")
    print("|---|" + "---:|" * (len(slices) + 1))
    for row in rows:
        kl = row["heldout_kl"]
        print(f"| {row['calibration']} | " + " | ".join(f"{kl[s]:.4f}" for s in slices) + f" | {sum(kl.values()) / len(kl):.4f} |")
    print("saved", save("domain_calibration", {"budget_bytes": budget, "weight_budget_bytes": weight_budget, "engine": ENGINE,
                                               "candidates": [s.name for s in CANDIDATES.schemes()], "samples": args.samples,
                                               "seq_len": args.seq_len, "heldout_windows": args.heldout, "trials": args.trials,
                                               "rows": rows}))


def fortunes_slice_plan(spec, budget: int, calibration: CalibrationSettings, meter: QualityMeter, windows) -> dict:
    """The exact allocation on the mixed profile's ``fortunes`` scores alone (the cached table; no new profile)."""
    from dataclasses import replace

    from bitplan.engines import resolve_target
    from bitplan.engines.rules import restrict_table
    from bitplan.planner.deployment import Deployment, weight_budget_bytes
    from bitplan.planner.search import allocate
    from bitplan.planner.slices import predicted_slice_kl

    rules = resolve_target(ENGINE, None).rules
    table = restrict_table(bitplan.profile("smollm2-135m", CANDIDATES, calibration, rules=rules), spec, rules)
    fortunes = replace(table, scores=table.slice_matrix("fortunes").clone())
    allocation = allocate(fortunes, spec, weight_budget_bytes(spec, Deployment(budget_bytes=budget, context=CONTEXT)))
    assignments = {name: Scheme.parse(s) for name, s in allocation.choice.items()}
    return {"calibration": "pydoc + fortunes profile, fortunes slice's scores only", "heldout_kl": measure(meter, assignments, windows),
            "predicted_slice_kl": predicted_slice_kl(table, allocation.choice), "weight_bytes": allocation.weight_bytes, "plan_seconds": 0.0,
            "schemes": {s: list(allocation.choice.values()).count(s) for s in sorted(set(allocation.choice.values()))}}


if __name__ == "__main__":
    main()
