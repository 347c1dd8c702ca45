"""Relative output error ‖WX − Q(W)X‖/‖WX‖ of every Linear of smollm2-135m, per method.

Methods: RTN, GPTQ (damp 0.01, block 128), GPTQ with act-order (static groups), AWQ
(α grid of 20 + clip search), HQQ (p = 0.7, 20 + 20 iterations). 3 and 4 bits, asymmetric,
group 128 where it divides the inputs (down_proj) and 64 elsewhere (576 inputs). Errors are
exact on the held-out text through its second moment X Xᵀ / n (see ``method_common``).
o_proj has no foldable predecessor under grouped-query attention (9 heads, 3 kv heads), so
its "AWQ" is RTN plus the clip search (as AutoAWQ, which skips the v → o scaling there).

    .venv/bin/python bench/method_errors.py [--symmetric] [--bits 3 4]
"""

from __future__ import annotations

import argparse
import json
import statistics as stats_lib
import time
from pathlib import Path

import torch
from method_common import statistics

from bitplan.methods.awq import clip_weight, effective_weight, quantize_awq
from bitplan.methods.calibration_stats import relative_output_error
from bitplan.methods.gptq import gptq_rows, split_rows
from bitplan.methods.hqq import quantize_hqq
from bitplan.methods.rtn import quantize_rtn
from bitplan.methods.scheme import Scheme

METHODS = ("rtn", "gptq", "gptq_act_order", "awq", "hqq")
GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
UNFOLDABLE = {"self_attn.o_proj"}
UNCLIPPED = {"self_attn.q_proj", "self_attn.k_proj"}


def scheme_for(in_features: int, bits: int, symmetric: bool, method: str = "rtn") -> Scheme:
    return Scheme(method, bits, 128 if in_features % 128 == 0 else 64, symmetric)


def quantize_group(names, weights, calib, scheme, timings) -> dict[str, dict[str, torch.Tensor]]:
    """Effective (dequantized, unfolded) weights of every method for one shared-input group."""
    out = {n: {} for n in names}
    moment = calib["second_moment"]
    for n, w in zip(names, weights):
        out[n]["rtn"] = quantize_rtn(w, scheme).dequantize()
        if "hqq" in METHODS:
            start = time.perf_counter()
            out[n]["hqq"] = quantize_hqq(w, scheme).dequantize()
            timings["hqq"] += time.perf_counter() - start
    sizes = [w.shape[0] for w in weights]
    for method, act_order in (("gptq", False), ("gptq_act_order", True)):
        if method not in METHODS:
            continue
        start = time.perf_counter()
        quantized, _ = gptq_rows(torch.cat(weights), 2 * moment, scheme, act_order=act_order)
        timings[method] += time.perf_counter() - start
        for n, q in zip(names, split_rows(quantized, sizes)):
            out[n][method] = q.dequantize()
    if "awq" not in METHODS:
        return out
    start = time.perf_counter()
    suffixes = [n.split(".", 3)[-1] for n in names]
    if suffixes[0] in UNFOLDABLE:
        out[names[0]]["awq"] = quantize_rtn(clip_weight(weights[0], moment, scheme), scheme).dequantize()
    else:
        result = quantize_awq(weights, calib["mean_abs"], moment, scheme, clip=[s not in UNCLIPPED for s in suffixes])
        for n, q in zip(names, result.quantized):
            out[n]["awq"] = effective_weight(q, result.scales)
    timings["awq"] += time.perf_counter() - start
    return out


def measure(data: dict, bits: int, symmetric: bool) -> tuple[list[dict], dict]:
    rows, timings = [], {m: 0.0 for m in METHODS}
    blocks = len({n.split(".")[2] for n in data["weights"]})
    for block in range(blocks):
        for group in GROUPS:
            names = [f"model.layers.{block}.{s}" for s in group]
            weights = [data["weights"][n] for n in names]
            scheme = scheme_for(weights[0].shape[1], bits, symmetric)
            approx = quantize_group(names, weights, data["calibration"][names[0]], scheme, timings)
            held = data["held_out"][names[0]]["second_moment"]
            for n, w in zip(names, weights):
                errors = {m: relative_output_error(w, approx[n][m], held) for m in METHODS}
                rows.append({"layer": n, "bits": bits, "group_size": scheme.group_size, "symmetric": symmetric,
                             "out": w.shape[0], "in": w.shape[1], **errors})
        print(f"  {bits}-bit block {block} done", flush=True)
    return rows, timings


def summarise(rows: list[dict]) -> dict:
    summary = {}
    for method in METHODS[1:]:
        improvements = [1 - r[method] / r["rtn"] for r in rows]
        summary[method] = {
            "beats_rtn_percent": 100.0 * sum(r[method] < r["rtn"] for r in rows) / len(rows),
            "median_improvement_percent": 100.0 * stats_lib.median(improvements),
            "median_error": stats_lib.median(r[method] for r in rows),
        }
    summary["rtn"] = {"median_error": stats_lib.median(r["rtn"] for r in rows)}
    return summary


def print_table(rows: list[dict], summary: dict, bits: int) -> None:
    print(f"\n{bits}-bit, per layer (relative held-out output error):")
    print(f"{'layer':34} {'g':>4} " + " ".join(f"{m:>14}" for m in METHODS))
    for r in rows:
        print(f"{r['layer'].removeprefix('model.layers.'):34} {r['group_size']:>4} " + " ".join(f"{r[m]:14.4f}" for m in METHODS))
    print(f"\n{bits}-bit summary over {len(rows)} Linears: median RTN error {summary['rtn']['median_error']:.4f}")
    for method in METHODS[1:]:
        s = summary[method]
        print(f"  {method:15} beats RTN on {s['beats_rtn_percent']:5.1f}% of layers, median improvement "
              f"{s['median_improvement_percent']:5.1f}%, median error {s['median_error']:.4f}")


def main() -> None:
    global METHODS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    parser.add_argument("--symmetric", action="store_true")
    parser.add_argument("--calibration-sequences", type=int, default=32)
    parser.add_argument("--held-out-sequences", type=int, default=16)
    parser.add_argument("--methods", nargs="+", choices=METHODS[1:], default=list(METHODS[1:]),
                        help="measure only these (beside RTN); results go to method_errors_<methods>.json")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    METHODS = ("rtn", *args.methods)
    if args.out is None:
        suffix = "" if len(METHODS) == 5 else "_" + "_".join(args.methods)
        args.out = Path(__file__).parent / "results" / f"method_errors{suffix}.json"
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = statistics(args.calibration_sequences, args.held_out_sequences)
    report = {"calibration_tokens": data["calibration"][next(iter(data["calibration"]))]["count"],
              "held_out_tokens": data["held_out"][next(iter(data["held_out"]))]["count"], "results": {}}
    for bits in args.bits:
        rows, timings = measure(data, bits, args.symmetric)
        summary = summarise(rows)
        print_table(rows, summary, bits)
        print("  seconds per method over all Linears: " + ", ".join(f"{m} {t:.1f}" for m, t in timings.items()))
        report["results"][str(bits)] = {"rows": rows, "summary": summary, "seconds": timings}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
