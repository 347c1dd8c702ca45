"""Predicted against measured KL over many plans: does the summed score predict a plan's KL on
text it never saw, and by what calibration?

SmolLM2-135M, profiled once (RTN, GPTQ, AWQ, HQQ, AWQ + GPTQ, imatrix, AWQ + imatrix at 3, 4 and 8 bits,
group 64, symmetric; the fitted methods cross-fitted, ``profiles.sensitivity``). Plans: the exact
allocation at seven budgets between 3.25 and 6 bits per weight for four candidate sets ({RTN},
{RTN, GPTQ}, {RTN, GPTQ, AWQ, HQQ, AWQ + GPTQ}, and that with imatrix and AWQ + imatrix), and the
seven methods uniform at 3 and 4 bits: 42 plans. Each is measured (KL to the
original, per token) on held-out Python documentation (prose and code, never calibrated on) and
on English prose from Debian's fortunes (``make text-fortunes``). GPTQ and AWQ are fitted to the
whole calibration text, as emit fits them.

The calibration is ``measured = c * predicted ** gamma``, fitted in logs on the held-out Python
documentation; the stated factor is the largest ratio, either way, between a plan's calibrated
prediction and its measured KL. The fitted constants go to ``bitplan/planner/score_calibration.json``
(``--write``), which ``bitplan plan`` reads to print a calibrated prediction. The plot of predicted
against measured KL, both domains, with the fit and its stated factor, goes to
``bench/results/score_calibration.png`` (``--plot-only`` redraws it from the saved JSON).

    .venv/bin/python bench/score_calibration.py [--samples 8 --heldout 4] [--write]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from common import save
from domain_common import heldout

import bitplan
from bitplan.api import CalibrationSettings, Candidates
from bitplan.methods.scheme import Scheme
from bitplan.models.source import resolve_model
from bitplan.models.spec import spec_from_folder
from bitplan.planner.baselines import assignment_bytes, uniform_assignment
from bitplan.planner.quality import QualityMeter, load_dense_model
from bitplan.planner.search import allocate
from bitplan.profiles.calibration import calibration_windows, load_tokenizer
from bitplan.profiles.tables import METRIC_VERSION

ALL = ("rtn", "gptq", "awq", "hqq", "awqgptq")
METHOD_SETS = {"rtn": ("rtn",), "rtn+gptq": ("rtn", "gptq"), "all": ALL, "all+imatrix": (*ALL, "imatrix", "awqimatrix")}
BITS_PER_WEIGHT = (3.25, 3.5, 3.75, 4.0, 4.5, 5.0, 6.0)
UNIFORM = tuple(f"{method}-w{bits}g64s" for bits in (3, 4) for method in METHOD_SETS["all+imatrix"])
OUT = Path(__file__).resolve().parents[1] / "bitplan" / "planner" / "score_calibration.json"


def fit(predicted: list[float], measured: list[float]) -> tuple[float, float, float]:
    """``(c, gamma, factor)``: least squares of log measured on log predicted, and the largest
    ratio either way between ``c * predicted ** gamma`` and measured."""
    x, y = np.log(predicted), np.log(measured)
    gamma, log_c = np.polyfit(x, y, 1)
    factor = float(np.exp(np.max(np.abs(y - (log_c + gamma * x)))))
    return float(np.exp(log_c)), float(gamma), factor


def plot(rows: list[dict], c: float, gamma: float, factor: float, path: Path) -> None:
    """Predicted (summed score) against measured KL, log-log, one panel per domain: the plans by candidate set,
    the fitted calibration and the band of its stated factor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {label: [r for r in rows if r["plan"].startswith(f"{label} @")] for label in METHOD_SETS}
    groups["uniform"] = [r for r in rows if r["plan"].startswith("uniform")]
    predicted = [r["predicted_kl"] for r in rows]
    xs = np.geomspace(min(predicted) / 1.3, max(predicted) * 1.3, 50)
    figure, axes = plt.subplots(1, 2, figsize=(12, 5.2), sharex=True, sharey=True)
    for axis, (domain, key) in zip(axes, (("held-out pydoc (fitted here)", "measured_kl_pydoc"),
                                          ("fortunes (another domain, same fit)", "measured_kl_fortunes"))):
        for (label, group), marker in zip(groups.items(), "osDv^"):
            axis.scatter([r["predicted_kl"] for r in group], [r[key] for r in group], marker=marker, s=36, label=label)
        for r in groups["uniform"]:
            axis.annotate(r["plan"].removeprefix("uniform ").replace("g64s", ""), (r["predicted_kl"], r[key]), fontsize=6,
                          xytext=(3, 3), textcoords="offset points")
        fitted = c * xs ** gamma
        axis.plot(xs, fitted, color="black", lw=1, label=f"fit: {c:.3f} * predicted^{gamma:.3f}")
        axis.fill_between(xs, fitted / factor, fitted * factor, color="grey", alpha=0.2, label=f"within {factor:.2f}x")
        axis.plot(xs, xs, color="grey", lw=0.8, ls="--", label="measured = predicted")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_title(domain)
        axis.set_xlabel("predicted KL (sum of the plan's scores)")
        axis.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("measured KL per token (nats)")
    axes[0].legend(fontsize=7)
    figure.suptitle(f"SmolLM2-135M: predicted against measured KL, {len(rows)} plans (bench/score_calibration.py)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=8, help="calibration windows of --seq-len tokens")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--heldout", type=int, default=4, help="held-out windows per slice")
    parser.add_argument("--write", action="store_true", help="write the fitted constants to bitplan/planner/score_calibration.json")
    parser.add_argument("--plot-only", action="store_true", help="redraw bench/results/score_calibration.png from the saved JSON")
    args = parser.parse_args()
    png = Path(__file__).resolve().parent / "results" / "score_calibration.png"
    if args.plot_only:
        saved = json.loads((png.with_suffix(".json")).read_text())
        record = saved["calibration"]
        plot(saved["rows"], record["c"], record["gamma"], record["factor"], png)
        print("wrote", png)
        return
    started = time.time()
    folder = resolve_model("smollm2-135m")
    spec = spec_from_folder(folder)
    calibration = CalibrationSettings(samples=args.samples, seq_len=args.seq_len)
    candidates = Candidates(tuple(dict.fromkeys(m for methods in METHOD_SETS.values() for m in methods)), (3, 4, 8), (64,), (True,),
                            costly_bits=None)
    table = bitplan.profile("smollm2-135m", candidates, calibration)
    print(f"profile: {len(table.layers)} Linears x {len(table.schemes)} schemes in {time.time() - started:.0f} s", flush=True)
    tokenizer = load_tokenizer(folder)
    windows = heldout(tokenizer, args.heldout, args.seq_len)
    meter = QualityMeter(load_dense_model(folder), spec)
    meter.calibrate(calibration_windows(folder, calibration)[: calibration.samples])
    low = assignment_bytes(spec, uniform_assignment(spec, Scheme.parse("rtn-w3g64s")))
    step = assignment_bytes(spec, uniform_assignment(spec, Scheme.parse("rtn-w4g64s"))) - low  # bytes of one bit per weight

    plans: list[tuple[str, dict[str, Scheme], float]] = []
    for label, methods in METHOD_SETS.items():
        sub = table.subset([s for s in table.schemes if s == "none" or Scheme.parse(s).method.value in methods])
        for bpw in BITS_PER_WEIGHT:
            allocation = allocate(sub, spec, int(low + (bpw - 3) * step))
            plans.append((f"{label} @ {bpw} bpw", {n: Scheme.parse(s) for n, s in allocation.choice.items()}, allocation.score))
    for name in UNIFORM:
        assignment = uniform_assignment(spec, Scheme.parse(name))
        score = float(sum(table.scores[table.layers.index(layer), table.scheme_index(scheme.name)] for layer, scheme in assignment.items()))
        plans.append((f"uniform {name}", assignment, score))

    rows = []
    print(f"{'plan':28} {'bytes MB':>9} {'predicted':>10} {'pydoc KL':>9} {'fortunes KL':>11}", flush=True)
    for label, assignment, score in plans:
        meter.apply(assignment)
        kl = {name: meter.measure(w).kl for name, w in windows.items()}
        pydoc = (kl["prose"] + kl["code"]) / 2
        rows.append({"plan": label, "weight_bytes": assignment_bytes(spec, assignment), "predicted_kl": score,
                     "measured_kl_pydoc": pydoc, "measured_kl_fortunes": kl["fortunes"], "measured_kl": kl})
        print(f"{label:28} {rows[-1]['weight_bytes'] / 1e6:9.2f} {score:10.4f} {pydoc:9.4f} {kl['fortunes']:11.4f}", flush=True)

    predicted = [r["predicted_kl"] for r in rows]
    raw = [r["measured_kl_pydoc"] / r["predicted_kl"] for r in rows]
    c, gamma, factor = fit(predicted, [r["measured_kl_pydoc"] for r in rows])
    c_out, gamma_out, factor_out = fit(predicted, [r["measured_kl_fortunes"] for r in rows])
    in_domain_on_fortunes = float(np.exp(np.max(np.abs(np.log([r["measured_kl_fortunes"] for r in rows]) - np.log(c) - gamma * np.log(predicted)))))
    for row in rows:
        row["calibrated_kl"] = c * row["predicted_kl"] ** gamma
    print(f"\nraw measured/predicted on held-out pydoc: {min(raw):.2f} .. {max(raw):.2f}")
    print(f"calibration (held-out pydoc): measured = {c:.4f} * predicted^{gamma:.4f}; every plan within {factor:.2f}x")
    print(f"the same calibration on fortunes: within {in_domain_on_fortunes:.2f}x (a fit of its own: {c_out:.4f} * p^{gamma_out:.4f}, {factor_out:.2f}x)")
    calibration_record = {"c": round(c, 6), "gamma": round(gamma, 6), "factor": round(factor, 4), "plans": len(rows),
                          "model": "smollm2-135m", "metric_version": METRIC_VERSION, "heldout": "pydoc prose+code",
                          "command": "bench/score_calibration.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                                                   {"samples": args.samples, "seq_len": args.seq_len,
                                                                                    "heldout": args.heldout}.items())}
    path = save("score_calibration", {"rows": rows, "calibration": calibration_record,
                                       "raw_ratio_range": [min(raw), max(raw)],
                                       "fortunes": {"factor_with_pydoc_calibration": in_domain_on_fortunes, "c": c_out,
                                                    "gamma": gamma_out, "factor": factor_out},
                                       "seconds": time.time() - started})
    plot(rows, c, gamma, factor, png)
    print("saved", path, "and", png)
    if args.write:
        OUT.write_text(json.dumps(calibration_record, indent=2, sort_keys=True) + "\n")
        print("wrote", OUT)
    assert all(math.isfinite(v) for v in predicted)


if __name__ == "__main__":
    main()
