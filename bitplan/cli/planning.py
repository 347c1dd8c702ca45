"""``bitplan plan`` and ``bitplan profile``."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bitplan.cli.common import group_list, int_list, positive_int, progress_bars
from bitplan.errors import BitplanError
from bitplan.methods.registry import COSTLY, COSTLY_DEFAULT_BITS, DEFAULT_METHODS
from bitplan.planner.deployment import KV_DTYPES, format_bytes
from bitplan.planner.objective import OBJECTIVES


def add_commands(commands) -> None:
    """Register ``plan`` and ``profile``."""
    plan = commands.add_parser("plan", help="profile the model and choose a scheme per layer")
    plan.add_argument("model", help="Hugging Face folder (config.json + safetensors) or built-in name: smollm2-135m")
    plan.add_argument("--budget", help="memory budget, e.g. 150MB, 40GB, 40GiB (default: the target's usable memory)")
    plan.add_argument("--context", type=positive_int, default=2048, help="tokens per sequence the KV cache must hold")
    plan.add_argument("--batch", type=positive_int, default=1, help="concurrent sequences")
    plan.add_argument("--kv-dtype", default="float16", choices=("auto", *KV_DTYPES),
                      help="KV cache format (default float16); auto lets the search trade KV bytes against weight bytes")
    plan.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel devices")
    plan.add_argument("--overhead", help="runtime overhead to reserve, e.g. 1GiB (default: 1 GiB with --target, else 0)")
    plan.add_argument("--tie-fused", action="store_true", help="q/k/v and gate/up share one scheme (engines fuse them)")
    plan.add_argument("--objective", default="quality", choices=OBJECTIVES,
                      help="quality: least predicted KL; speed: least predicted decode time (needs --target); "
                           "balanced: KL/KL_ref + time/time_ref (see bitplan/planner/objective.py)")
    plan.add_argument("--trials", type=int, default=16,
                      help="trials of the measured search on held-in text: the exact plan's, then one per generation (0: exact allocation only); with several methods, each method's uniform probe at the budget's bits is measured first and joins as a trial")
    plan.add_argument("--search-minutes", type=float, metavar="M",
                      help="stop the measured search after M minutes, or at --trials, whichever comes first")
    plan.add_argument("--study-storage", help="share the refinement's Optuna study with other workers running the same plan: "
                                              "an RDB URL (sqlite:///refine.db, postgresql://...) or a journal file path on a "
                                              "shared file system; --trials is then the study's total")
    plan.add_argument("--out", type=Path, default=Path("plan.json"), help="where to write plan.json")
    plan.add_argument("--max-slice-kl", metavar="SLICE=KL,...",
                      help="bound each named calibration slice's predicted KL (nats/token), e.g. code=0.05,prose=0.1")
    plan.add_argument("--max-slice-regression", metavar="SLICE=FACTOR,...",
                      help="bound a slice's predicted KL at FACTOR times the best uniform plan's on that slice "
                           "(the one scheme for all layers that fits the budget with least predicted KL), e.g. code=1.2")
    add_calibration_args(plan)
    plan.set_defaults(func=run_plan)

    profile = commands.add_parser("profile", help="measure and cache the sensitivity table only")
    profile.add_argument("model")
    profile.add_argument("--out", type=Path, help="also save the table here (.safetensors)")
    add_calibration_args(profile)
    profile.set_defaults(func=run_profile)


def add_calibration_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text", action="append", default=[], metavar="PATH[:WEIGHT]",
                        help="calibration text: .txt (one slice) or .jsonl (a slice per \"slice\" field), repeatable; WEIGHT "
                             "(default 1) is the file's relative share of calibration windows and of the score, e.g. "
                             "--text code.jsonl:3 --text chat.jsonl:1; default: Python's documentation")
    parser.add_argument("--samples", type=positive_int, default=16, help="calibration windows")
    parser.add_argument("--seq-len", type=positive_int, default=512, help="tokens per calibration window")
    parser.add_argument("--methods", default=None,
                        help=f"candidate methods, comma-separated, each on the whole grid (default: {','.join(DEFAULT_METHODS)} "
                             f"with {' and '.join(m for m in DEFAULT_METHODS if m in COSTLY)} at "
                             f"{COSTLY_DEFAULT_BITS[0]}-{COSTLY_DEFAULT_BITS[-1]} bits symmetric, imatrix symmetric; also gptq, awq, awqgptq; "
                             "with --engine llama.cpp: ggml; see the README)")
    parser.add_argument("--bits", type=int_list, default=(2, 3, 4, 5, 6, 8), help="candidate bit widths, e.g. 3,4,6")
    parser.add_argument("--groups", type=group_list, default=(32, 64, 128, 0), help="group sizes; c = per channel")
    parser.add_argument("--ggml-types", type=lambda text: tuple(t.strip() for t in text.split(",")),
                        help="with --engine llama.cpp: the GGUF types a plan may use, e.g. Q8_0,Q6_K,Q5_K,Q4_K,Q5_0 (default: all)")
    parser.add_argument("--symmetric-only", action="store_true", help="drop asymmetric (zero-point) candidates")
    parser.add_argument("--engine", default="vllm",
                        help="the engine that will serve the checkpoint: vllm (default), transformers, bitplan or llama.cpp (GGUF types); its rules on "
                             "the --target hardware constrain the plan (see `bitplan engines`)")
    parser.add_argument("--target", help="device from `bitplan devices`, a profile .toml, or a platform: cuda-sm80, cuda-sm90, "
                                         "cpu-avx2, cpu-avx512 (default for vllm: cuda-sm80)")
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling and search (same seed, same plan)")
    parser.add_argument("--workers", type=positive_int, default=1,
                        help="profile in this many local processes (torch.distributed, gloo); the table is the same as with 1. "
                             "Across machines: torchrun --nnodes ... -m bitplan.cli (see bitplan/profiles/distributed.py)")


def candidates_from(args):
    from bitplan.api import Candidates

    symmetric = (True,) if args.symmetric_only else (True, False)
    if args.methods is None:
        return Candidates(bits=args.bits, group_sizes=args.groups, symmetric=symmetric, ggml_types=args.ggml_types)
    return Candidates(tuple(m.strip() for m in args.methods.split(",")), args.bits, args.groups, symmetric, costly_bits=None,
                      ggml_types=args.ggml_types)


def calibration_from(args):
    from bitplan.api import CalibrationSettings
    from bitplan.profiles.text import parse_text_arg, read_text_file

    texts = [parse_text_arg(str(value)) for value in args.text]
    for path, _ in texts:
        read_text_file(path)
    weights = tuple(weight for _, weight in texts) if any(weight != 1.0 for _, weight in texts) else ()
    return CalibrationSettings(tuple(path for path, _ in texts), args.samples, args.seq_len, weights)


def run_plan(args) -> int:
    from bitplan.api import plan
    from bitplan.planner.limits import parse_slice_limits

    if args.trials < 0:
        raise BitplanError(f"--trials must be 0 or more, got {args.trials}")
    if args.search_minutes is not None and args.search_minutes < 0:
        raise BitplanError(f"--search-minutes must be 0 or more, got {args.search_minutes}")
    limits = parse_slice_limits(args.max_slice_kl, args.max_slice_regression)
    console = Console(stderr=True)
    with progress_bars(console) as report:
        result = plan(args.model, args.budget, args.target, args.context, args.batch, args.kv_dtype, args.tp, args.overhead,
                      candidates_from(args), calibration_from(args), args.tie_fused, args.trials, args.seed, report,
                      objective=args.objective, engine=args.engine, study_storage=args.study_storage,
                      workers=args.workers, slice_limits=limits, search_minutes=args.search_minutes)
    result.save(args.out)
    print_plan(result, Console())
    Console().print(f"plan written to {args.out}")
    return 0


def print_plan(result, console: Console) -> None:
    memory = Table(title="deployment memory (per device)")
    memory.add_column("term")
    memory.add_column("bytes", justify="right")
    for key in ("quantized_weights_bytes", "unquantized_bytes", "kv_cache_bytes", "workspace_bytes", "overhead_bytes", "total_bytes"):
        memory.add_row(key.removesuffix("_bytes").replace("_", " "), format_bytes(getattr(result.memory, key)))
    memory.add_row("budget", format_bytes(result.deployment.budget_bytes))
    console.print(memory)
    counts: dict[str, int] = {}
    for scheme in result.assignments.values():
        counts[scheme] = counts.get(scheme, 0) + 1
    schemes = Table(title="schemes chosen")
    schemes.add_column("scheme")
    schemes.add_column("layers", justify="right")
    schemes.add_column("checkpoint format")
    for name, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        schemes.add_row(name, str(count), result.formats[name].format if name in result.formats else "")
    console.print(schemes)
    rules = result.engine.rules
    console.print(f"[bold]{rules[0]}[/bold]; the search enforced:")
    for line in rules[1:]:
        console.print(f"  - {line}")
    predicted = result.predicted
    line = f"predicted KL (sum of scores): {predicted.score_kl:.4f} nats/token"
    if predicted.calibrated_kl is not None:
        line += f"; on unseen text about {predicted.calibrated_kl:.4f} (calibrated, within {predicted.calibrated_within:.1f}x)"
    if predicted.calibration_kl is not None:
        line += f"; measured on held-in text: {predicted.calibration_kl:.4f} (exact allocation: {predicted.exact_calibration_kl:.4f})"
    if predicted.validation_kl is not None:
        line += (f"; on held-back text: {predicted.validation_kl:.4f} (exact allocation: {predicted.exact_validation_kl:.4f}; "
                 f"kept: {result.search.refine_kept}")
        if result.search.refine_search_gain:
            line += "; the best searched plan's gain there: {:+.3g} ± {:.3g}".format(*result.search.refine_search_gain)
        line += ")"
    console.print(line)
    search = result.search
    if search.refine_trials is not None and search.refine_candidates is not None:
        seconds = result.search_seconds if result.search_seconds is not None else search.refine_seconds
        console.print(f"measured search: {search.refine_trials} trials, {search.refine_candidates} candidates measured on "
                      f"{search.refine_measured_tokens} tokens in all" + (f", {seconds:.0f} s" if seconds is not None else "")
                      + f"; stopped by {search.refine_stopped_by}")
    if search.method_factors:
        console.print("methods' scores scaled by their probes' measured KL / score: " + ", ".join(
            f"{m} x{f['factor']:.2f} ({f['scheme']}: {f['measured_kl']:.3f} measured, {f['score']:.3f} scored)" for m, f in search.method_factors.items()))
    print_slices(result, console)
    if result.kv_cache is not None:
        print_kv(result, console)
    if predicted.decode_tokens_per_s is not None:
        batch, context = result.deployment.batch, result.deployment.context
        console.print(f"predicted decode on {result.target} ({result.search.objective} objective, roofline): "
                      f"{predicted.decode_tokens_per_s / batch:.1f} tokens/s per sequence at batch {batch}, context {context} "
                      f"({predicted.decode_tokens_per_s:.1f} tokens/s in all); {predicted.decode_ms_per_token_batch1:.3f} ms/token at batch 1")


def print_slices(result, console: Console) -> None:
    """Each calibration slice's predicted KL, against its bound where one is set."""
    if not result.predicted_slice_kl:
        return
    bounds = result.search.slice_bounds or {}
    limits = result.slice_limits
    table = Table(title="predicted KL per calibration slice (nats/token)")
    for column in ("slice", "predicted KL", "limit", "met"):
        table.add_column(column, justify="left" if column == "slice" else "right")
    for name, kl in result.predicted_slice_kl.items():
        if name not in bounds:
            table.add_row(name, f"{kl:.4f}", "", "")
            continue
        given = [f"{limits.max_kl[name]:g}"] if name in limits.max_kl else []
        if name in limits.max_regression:
            given.append(f"{limits.max_regression[name]:g} x {result.search.uniform_scheme}")
        table.add_row(name, f"{kl:.4f}", f"{bounds[name]:.4f} ({', '.join(given)})", "yes" if kl <= bounds[name] * (1 + 1e-9) else "NO")
    console.print(table)


def print_kv(result, console: Console) -> None:
    """Each KV cache format the search weighed: cache bytes, the weights' score beside it, its own cost."""
    kv = result.kv_cache
    if len(kv.options) > 1:
        table = Table(title=f"KV cache formats at context {result.deployment.context} x batch {result.deployment.batch}")
        for column in ("format", "KV cache", "weights' budget", "weights' score", "KV cost (measured)", "total"):
            table.add_column(column, justify="left" if column == "format" else "right")
        for option in kv.options:
            chosen = " (chosen)" if option["dtype"] == kv.dtype else ""
            score = f"{option['weight_score_kl']:.4f}" if "weight_score_kl" in option else "does not fit"
            total = f"{option['total_kl']:.4f}" if "total_kl" in option else "-"
            table.add_row(option["dtype"] + chosen, format_bytes(option["kv_cache_bytes"]), format_bytes(max(option["weight_budget_bytes"], 0)),
                          score, f"{option['kv_kl']:.4f}", total)
        console.print(table)
    line = (f"KV cache: {kv.dtype}, measured cost {kv.kl:.4f} nats/token on {kv.tokens} calibration tokens" if kv.tokens
            else f"KV cache: {kv.dtype} (16-bit, not rounded: no quality cost measured)")
    if kv.engine_flags:
        line += f"; serve with {kv.engine_flags}"
    console.print(line)


def run_profile(args) -> int:
    from bitplan.api import profile
    from bitplan.engines import resolve_target

    rules = resolve_target(args.engine, args.target).rules
    with progress_bars(Console(stderr=True)) as report:
        table = profile(args.model, candidates_from(args), calibration_from(args), args.seed, report, rules=rules, workers=args.workers)
    if args.out:
        table.save(args.out)
    Console().print(f"{len(table.layers)} layers x {len(table.schemes)} schemes profiled ({table.provenance.get('metric')})")
    return 0
