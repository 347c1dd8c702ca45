"""Slice limits (issue 12's acceptance): a limit the plain plan breaks on held-out text, met by the
limited plan at the same budget, and what that costs the other slices.

SmolLM2-135M calibrated on pydoc's prose and code and the fortunes (a third of the windows each:
slices ``prose``, ``code``, ``fortunes``), the budget and candidates of ``domain_calibration.py``.
The gate is a held-out KL limit on one slice (``--slice``, default ``code``), set ``--margin``
(default 10%) below what the plain plan measures there, so the plain plan breaks it. The limited
plan passes ``--max-slice-kl SLICE=x`` with x the plain plan's predicted KL on that slice times a
factor, tightened (0.97, 0.94, 0.9, ...) until the measured held-out KL meets the gate: predicted
KL is a proxy, and this shows how much margin the proxy needs. Also measured: the relative limit
``--max-slice-regression SLICE=1.0`` (no worse than the best uniform plan on that slice, predicted).

    .venv/bin/python bench/slice_limits.py [--slice code --margin 0.1]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import save
from domain_common import CANDIDATES, CONTEXT, ENGINE, budget_at, calibrate, heldout, measure, texts

import bitplan
from bitplan.api import CalibrationSettings
from bitplan.errors import BitplanError
from bitplan.models.source import resolve_model
from bitplan.models.spec import spec_from_folder
from bitplan.planner.limits import parse_slice_limits
from bitplan.planner.quality import QualityMeter, load_dense_model
from bitplan.profiles.calibration import load_tokenizer

FACTORS = (0.97, 0.94, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slice", default="code")
    parser.add_argument("--margin", type=float, default=0.1, help="the gate: this share below the plain plan's held-out KL")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--heldout", type=int, default=8)
    parser.add_argument("--factors", default=",".join(map(str, FACTORS)), help="limit = factor x the plain plan's predicted KL, tried in turn")
    args = parser.parse_args()

    folder = resolve_model("smollm2-135m")
    spec = spec_from_folder(folder)
    files = texts(Path(tempfile.mkdtemp(prefix="bitplan-slices-")))
    windows = heldout(load_tokenizer(folder), args.heldout, args.seq_len)
    budget, weight_budget = budget_at(spec)
    calibration = CalibrationSettings((files["pydoc"], files["fortunes"]), args.samples, args.seq_len)
    meter = QualityMeter(load_dense_model(folder), spec)
    calibrate(meter, folder, calibration)
    measured: dict[tuple, dict] = {}  # a plan measured once

    def run(label: str, max_kl: str | None = None, max_regression: str | None = None) -> dict:
        try:
            plan = bitplan.plan("smollm2-135m", budget, context=CONTEXT, candidates=CANDIDATES, calibration=calibration, trials=0,
                                engine=ENGINE, slice_limits=parse_slice_limits(max_kl, max_regression))
        except BitplanError as error:
            print(f"{label}: {error}", flush=True)
            return {"label": label, "error": str(error)}
        row = {"label": label, "max_slice_kl": max_kl, "max_slice_regression": max_regression,
               "predicted_slice_kl": plan.predicted_slice_kl, "slice_bounds": plan.search.slice_bounds,
               "uniform_scheme": plan.search.uniform_scheme, "predicted_kl": plan.predicted.score_kl,
               "weight_bytes": plan.memory.quantized_weights_bytes}
        key = tuple(plan.assignments.values())
        if key not in measured:
            measured[key] = measure(meter, plan.schemes(), windows)
        row["heldout_kl"] = measured[key]
        print(f"{label}: held-out {row['heldout_kl']}, predicted {row['predicted_slice_kl']}", flush=True)
        return row

    plain = run("plain")
    gate = (1 - args.margin) * plain["heldout_kl"][args.slice]
    rows, met = [plain], None
    for factor in map(float, args.factors.split(",")):
        bound = factor * plain["predicted_slice_kl"][args.slice]
        row = run(f"--max-slice-kl {args.slice}={bound:.4g}", max_kl=f"{args.slice}={bound:.6g}")
        rows.append({**row, "factor": factor})
        if "heldout_kl" in row and row["heldout_kl"][args.slice] <= gate:
            met = row
            break
    rows.append(run(f"--max-slice-regression {args.slice}=1.0", max_regression=f"{args.slice}=1.0"))
    slices = list(windows)
    print(f"\nSmolLM2-135M, budget {budget / 1e6:.2f} MB ({weight_budget / 1e6:.2f} MB of Linear weights), engine {ENGINE}; "
          f"gate: held-out KL on {args.slice} <= {gate:.4f} (the plain plan's {plain['heldout_kl'][args.slice]:.4f} less {args.margin:.0%})\n")
    print("| plan | predicted KL " + args.slice + " | " + " | ".join(f"held-out KL {s}" for s in slices) + " | gate met |")
    print("|---|---:|" + "---:|" * len(slices) + "---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['label']} | | " + " | " * len(slices) + f"{row['error']} |")
            continue
        kl = row["heldout_kl"]
        print(f"| {row['label']} | {row['predicted_slice_kl'][args.slice]:.4f} | " + " | ".join(f"{kl[s]:.4f}" for s in slices)
              + f" | {'yes' if kl[args.slice] <= gate else 'no'} |")
    if met is not None:
        cost = {s: met["heldout_kl"][s] - plain["heldout_kl"][s] for s in slices if s != args.slice}
        print(f"limited plan meets the gate; cost on the other slices (held-out KL change): "
              + ", ".join(f"{s} {c:+.4f}" for s, c in cost.items()))
    print("saved", save(f"slice_limits_{args.slice}", {"budget_bytes": budget, "weight_budget_bytes": weight_budget, "engine": ENGINE, "slice": args.slice,
                                         "gate_kl": gate, "margin": args.margin, "samples": args.samples, "seq_len": args.seq_len,
                                         "heldout_windows": args.heldout, "rows": rows, "met": met is not None}))


if __name__ == "__main__":
    main()
