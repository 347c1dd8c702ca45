"""The measured search against the exact allocation, on held-out text of two domains.

SmolLM2-135M, engine ``bitplan`` (3-bit allowed), candidates RTN and GPTQ at 3, 4 and 8 bits,
group 64, symmetric (``domain_common.CANDIDATES``), the default calibration (16 windows of 512
tokens of the built-in Python documentation). At each budget of Linear bytes (bits per weight
times the Linears' weights / 8), the exact allocation (the knapsack on summed scores) and the
measured search (``planner.refine``: trial 0 the exact plan, then generations drawing their windows
from the pool of 16 held-in calibration windows the CLI uses, or ``--held-in``, stopped by ``--minutes``; the kept plan
confirmed on ``--validation`` windows spread through the rest of the calibration text, 8 as in the CLI) are both measured on
held-out text neither saw: pydoc's held-out prose and code (``--heldout`` windows, half each)
and English prose from Debian's fortunes (``fortunes-heldout.txt``; ``make text-fortunes``), and the
Jargon File's prose (``make text-jargon``), a third domain. ``--calibration mixed`` calibrates (profile,
GPTQ/AWQ statistics, the held-in windows the search measures) on pydoc and the fortunes' calibration
part at equal weight, so that the Jargon File is the one domain no part of the plan saw.
One meter (and its cache of quantized tensors) serves every budget, so later budgets re-use
the GPTQ results of earlier ones; each search's seconds include the GPTQ it still had to run.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/search_quality.py [--budgets 3.3,3.6,4.0,4.5 --minutes 5]

With ``--methods rtn,gptq,awq`` the candidates are those methods on the same grid: the search
then measures each method's probe first (``planner.method_factors``) and allocates on the
probe-scaled scores; ``--uniform awq,rtn`` also measures those methods' uniform plans at each
budget's bits (the out-of-domain rule of issue 11: a plan no worse than the best uniform one).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from dataclasses import replace

import torch
from common import save
from domain_common import CANDIDATES, ENGINE, heldout, jargon_heldout, texts

import bitplan
from bitplan.engines import resolve_target
from bitplan.engines.rules import restrict_table
from bitplan.methods.scheme import Scheme
from bitplan.models.source import open_model
from bitplan.planner.quality import QualityMeter, load_dense_model
from bitplan.planner.refine import HELD_IN_POOL, VALIDATION_WINDOWS, held_back_gain, held_windows, refine
from bitplan.planner.baselines import assignment_bytes, uniform_assignment
from bitplan.planner.search import allocate
from bitplan.profiles.calibration import CalibrationSettings, calibration_windows, load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budgets", default="3.3,3.6,4.0,4.5", help="bits per weight of the Linears; uB: the bytes of uniform B-bit group 64 (u3,u4)")
    parser.add_argument("--minutes", type=float, default=5.0, help="time budget of each search")
    parser.add_argument("--trials", type=int, default=10_000, help="trial limit of each search (the clock usually ends it first)")
    parser.add_argument("--heldout", type=int, default=6, help="held-out windows per domain")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--held-in", type=int, default=HELD_IN_POOL, help="held-in calibration windows the search draws its windows from")
    parser.add_argument("--validation", type=int, default=VALIDATION_WINDOWS,
                        help="calibration windows spread through the text after the held-in ones that confirm the kept plan (0: keep the best held-in plan)")
    parser.add_argument("--out", default="search_quality", help="name of the results file in bench/results")
    parser.add_argument("--methods", default=",".join(CANDIDATES.methods), help="candidate methods (group 64, symmetric)")
    parser.add_argument("--bits", default=",".join(map(str, CANDIDATES.bits)), help="candidate bit widths")
    parser.add_argument("--uniform", default="", help="methods whose uniform plan at each budget's bits is measured too, e.g. awq,rtn")
    parser.add_argument("--calibration", choices=("pydoc", "mixed"), default="pydoc",
                        help="pydoc: the built-in Python documentation; mixed: pydoc's slices and the fortunes, equal weight")
    parser.add_argument("--cache-gib", type=float, default=1.5, help="memory cap of the quantized-tensor cache")
    args = parser.parse_args()

    source = open_model("smollm2-135m")
    spec = source.spec
    rules = resolve_target(ENGINE, None).rules
    if args.calibration == "mixed":
        files = texts(Path(tempfile.mkdtemp(prefix="bitplan-search-quality-")))
        calibration = CalibrationSettings((files["pydoc"], files["fortunes"]), args.samples, args.seq_len)
    else:
        calibration = CalibrationSettings((), args.samples, args.seq_len)
    started = time.time()
    candidates = replace(CANDIDATES, methods=tuple(args.methods.split(",")), bits=tuple(int(b) for b in args.bits.split(",")))
    table = restrict_table(bitplan.profile("smollm2-135m", candidates, calibration, rules=rules), spec, rules)
    profile_seconds = time.time() - started
    profile, held_in, validation = held_windows(source.folder, calibration, args.held_in, args.validation)
    meter = QualityMeter(load_dense_model(source.folder), spec, batch_size=1, cache_bytes=int(args.cache_gib * 2**30))
    meter.calibrate(profile)
    tokenizer = load_tokenizer(source.folder)
    held = heldout(tokenizer, args.heldout, args.seq_len)
    half = args.heldout // 2
    domains = {"pydoc": torch.cat([held["prose"][:half], held["code"][: args.heldout - half]]), "fortunes": held["fortunes"],
               "jargon": jargon_heldout(tokenizer, args.heldout, args.seq_len)}
    print(f"profile {profile_seconds:.0f} s; held-in {tuple(held_in.shape)}; held-out " +
          ", ".join(f"{name} {tuple(w.shape)}" for name, w in domains.items()), flush=True)

    def heldout_kl(choice: dict[str, str]) -> dict[str, float]:
        meter.apply({name: Scheme.parse(s) for name, s in choice.items()})
        qualities = measured[json.dumps(choice, sort_keys=True)] = {name: meter.measure(w) for name, w in domains.items()}
        return {name: quality.kl for name, quality in qualities.items()}

    def paired(plan: dict[str, str], base: dict[str, str]) -> dict[str, list[float]]:
        """Per domain: the mean per-window gain of ``plan`` over ``base`` on the held-out windows and its standard error."""
        a, b = measured[json.dumps(plan, sort_keys=True)], measured[json.dumps(base, sort_keys=True)]
        return {name: [round(v, 6) for v in held_back_gain(b[name].window_kl, a[name].window_kl)] for name in domains}

    measured: dict[str, dict] = {}  # plan -> domain -> Quality
    rows = []
    for budget in args.budgets.split(","):
        if budget.startswith("u"):  # the bytes of uniform B-bit group-64 symmetric (scales included)
            weight_budget = assignment_bytes(spec, uniform_assignment(spec, Scheme.parse(f"rtn-w{budget[1:]}g64s")))
            bits = 8 * weight_budget / spec.linear_weights
        else:
            bits = float(budget)
            weight_budget = int(bits * spec.linear_weights / 8)
        found = refine(table, spec, weight_budget, rules.fused_share_scheme, meter, held_in, args.trials, args.seed,
                       search_minutes=args.minutes, validation=validation)
        exact = found.exact or allocate(table, spec, weight_budget, rules.fused_share_scheme)
        exact_kl, kept_kl = heldout_kl(exact.choice), heldout_kl(found.allocation.choice)
        uniform = {}
        for method in filter(None, args.uniform.split(",")):
            name = f"{method}-w{int(bits + 1e-9)}g64s"
            plan = {layer.name: name for layer in spec.layers}
            uniform[name] = {"weight_bytes": assignment_bytes(spec, uniform_assignment(spec, Scheme.parse(name))),
                             "heldout_kl": heldout_kl(plan), "kept_gain": paired(found.allocation.choice, plan)}
        row = {"bits_per_weight": bits, "weight_budget_bytes": weight_budget,
               "exact": {"weight_bytes": exact.weight_bytes, "held_in_kl": found.exact_kl, "heldout_kl": exact_kl,
                         "schemes": counts(exact.choice)},
               "searched": {"weight_bytes": found.allocation.weight_bytes, "held_in_kl": found.measured_kl,
                            "heldout_kl": kept_kl, "schemes": counts(found.allocation.choice),
                            "changed_layers": sum(exact.choice[n] != s for n, s in found.allocation.choice.items()),
                            "kept": found.kept, "validation_kl": found.validation_kl, "exact_validation_kl": found.exact_validation_kl,
                            "heldout_gain_over_exact": paired(found.allocation.choice, exact.choice),
                            "best_searched": None if found.best_searched is None else {
                                "heldout_kl": heldout_kl(found.best_searched.choice), "changed_layers": sum(
                                    exact.choice[n] != s for n, s in found.best_searched.choice.items()),
                                "gain_over_exact": paired(found.best_searched.choice, exact.choice),
                                "gain_over_kept": paired(found.best_searched.choice, found.allocation.choice)},
                            "contenders": [{"origin": o, "held_in_kl": h, "validation_kl": v, "validation_gain": g, "validation_se": e}
                                           for o, h, v, g, e in found.contenders]},
               "search": {"seconds": round(found.seconds, 1), "trials": found.trials, "candidates": found.candidates,
                          "measured_tokens": found.measured_tokens, "stopped_by": found.stopped_by, "distinct_plans": found.distinct_plans,
                          "method_factors": {m: f.to_dict() for m, f in (found.factors or {}).items()}},
               "uniform": uniform}
        rows.append(row)
        print(f"{bits:.3f} bpw: exact {row['exact']['heldout_kl']} searched {row['searched']['heldout_kl']}; held-in "
              f"{found.exact_kl:.4f} -> {found.measured_kl:.4f}; {row['search']}", flush=True)

    print(f"\nSmolLM2-135M, engine {ENGINE}, candidates {', '.join(s.name for s in candidates.schemes() if not s.is_dense)}; "
          f"search {args.minutes:g} min per budget on {held_in.numel()} held-in tokens; held-out KL on "
          + ", ".join(f"{w.numel()} {name}" for name, w in domains.items()) + f" tokens; calibration {args.calibration}\n")
    print("| bits/weight | Linear MB | domain | exact KL | kept KL | kept/exact | gain ± s.e. (per window) | held-in exact -> searched | kept | seconds | trials | candidates |")
    print("|---:|---:|---|---:|---:|---:|---|---|---|---:|---:|---:|")
    for row in rows:
        for domain in domains:
            e, s = row["exact"]["heldout_kl"][domain], row["searched"]["heldout_kl"][domain]
            gain, se = row["searched"]["heldout_gain_over_exact"][domain]
            print(f"| {row['bits_per_weight']:.2f} | {row['weight_budget_bytes'] / 1e6:.2f} | {domain} | {e:.4f} | {s:.4f} | {s / e:.3f} | "
                  f"{gain:+.4f} ± {se:.4f} | {row['exact']['held_in_kl']:.4f} -> {row['searched']['held_in_kl']:.4f} | "
                  f"{row['searched']['kept']} | {row['search']['seconds']:.0f} | "
                  f"{row['search']['trials']} | {row['search']['candidates']} |")
    for row in rows:
        for name, uniform in row["uniform"].items():
            print(f"uniform {name} at {uniform['weight_bytes'] / 1e6:.2f} MB: {uniform['heldout_kl']}; the kept plan's gain over it "
                  f"(per-window mean ± s.e.): {uniform['kept_gain']}")
    print("saved", save(args.out, {"engine": ENGINE, "candidates": [s.name for s in candidates.schemes()], "samples": args.samples,
                                           "seq_len": args.seq_len, "held_in_tokens": int(held_in.numel()),
                                           "validation_tokens": 0 if validation is None else int(validation.numel()),
                                           "heldout_tokens": {n: int(w.numel()) for n, w in domains.items()}, "minutes": args.minutes,
                                           "seed": args.seed, "calibration": calibration.to_dict(), "profile_seconds": round(profile_seconds, 1), "rows": rows}))


def counts(choice: dict[str, str]) -> dict[str, int]:
    values = list(choice.values())
    return {s: values.count(s) for s in sorted(set(values))}


if __name__ == "__main__":
    main()
