"""The ``bitplan`` command: plan, profile, emit, eval, and the hardware commands.

User errors (``BitplanError``) print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bitplan.errors import BitplanError
from bitplan.planner.deployment import KV_DTYPE_BYTES, format_bytes
from bitplan.planner.objective import OBJECTIVES

STAGES = {"forward": "profile: forward pass", "score": "profile: score schemes", "refine": "refine: measured KL", "emit": "emit: tensors"}


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def group_list(text: str) -> tuple[int, ...]:
    return tuple(0 if v.strip() in ("c", "channel", "0") else int(v) for v in text.split(","))


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_calibration_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text", action="append", type=Path, default=[], help="calibration text: .txt or .jsonl (repeatable); default: Python's documentation")
    parser.add_argument("--samples", type=positive_int, default=16, help="calibration windows")
    parser.add_argument("--seq-len", type=positive_int, default=512, help="tokens per calibration window")
    parser.add_argument("--methods", default=None,
                        help="candidate methods, comma-separated, each on the whole grid (default: rtn,gptq,awq,hqq,nf4,fp8,smoothquant "
                             "with GPTQ/AWQ/HQQ at 2-4 bits symmetric; see the README)")
    parser.add_argument("--bits", type=int_list, default=(2, 3, 4, 5, 6, 8), help="candidate bit widths, e.g. 3,4,6")
    parser.add_argument("--groups", type=group_list, default=(32, 64, 128, 0), help="group sizes; c = per channel")
    parser.add_argument("--symmetric-only", action="store_true", help="drop asymmetric (zero-point) candidates")
    parser.add_argument("--engine", default="vllm",
                        help="the engine that will serve the checkpoint: vllm (default), transformers or bitplan; its rules on "
                             "the --target hardware constrain the plan (see `bitplan engines`)")
    parser.add_argument("--target", help="device from `bitplan devices`, a profile .toml, or a platform: cuda-sm80, cuda-sm90, "
                                         "cpu-avx2, cpu-avx512 (default for vllm: cuda-sm80)")
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling and search (same seed, same plan)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitplan", description="Fit an LLM into a memory budget with the least quality loss.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True)

    plan = commands.add_parser("plan", help="profile the model and choose a scheme per layer")
    plan.add_argument("model", help="Hugging Face folder (config.json + safetensors) or built-in name: smollm2-135m")
    plan.add_argument("--budget", help="memory budget, e.g. 150MB, 40GB, 40GiB (default: the target's usable memory)")
    plan.add_argument("--context", type=positive_int, default=2048, help="tokens per sequence the KV cache must hold")
    plan.add_argument("--batch", type=positive_int, default=1, help="concurrent sequences")
    plan.add_argument("--kv-dtype", default="float16", choices=sorted(KV_DTYPE_BYTES), help="KV cache dtype")
    plan.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel devices")
    plan.add_argument("--overhead", help="runtime overhead to reserve, e.g. 1GiB (default: 1 GiB with --target, else 0)")
    plan.add_argument("--tie-fused", action="store_true", help="q/k/v and gate/up share one scheme (engines fuse them)")
    plan.add_argument("--objective", default="quality", choices=OBJECTIVES,
                      help="quality: least predicted KL; speed: least predicted decode time (needs --target); "
                           "balanced: KL/KL_ref + time/time_ref (see bitplan/planner/objective.py)")
    plan.add_argument("--trials", type=int, default=16, help="Optuna refinement trials measured on held-in text (0: exact allocation only)")
    plan.add_argument("--out", type=Path, default=Path("plan.json"), help="where to write plan.json")
    add_calibration_args(plan)
    plan.set_defaults(func=run_plan)

    profile = commands.add_parser("profile", help="measure and cache the sensitivity table only")
    profile.add_argument("model")
    profile.add_argument("--out", type=Path, help="also save the table here (.safetensors)")
    add_calibration_args(profile)
    profile.set_defaults(func=run_profile)

    emit = commands.add_parser("emit", help="write the checkpoint a plan describes")
    emit.add_argument("plan", type=Path, help="plan.json from `bitplan plan`")
    emit.add_argument("--out", type=Path, required=True, help="new folder for the checkpoint")
    emit.set_defaults(func=run_emit)

    evaluate = commands.add_parser("eval", help="perplexity and KL against the original, per text slice")
    evaluate.add_argument("checkpoint", type=Path, help="folder written by `bitplan emit`")
    evaluate.add_argument("--text", action="append", type=Path, default=[], help="evaluation text (.txt / .jsonl with a slice field)")
    evaluate.add_argument("--samples", type=positive_int, default=16, help="windows per slice")
    evaluate.add_argument("--seq-len", type=positive_int, default=512)
    evaluate.add_argument("--json", dest="json_out", type=Path, help="also write the results as JSON")
    evaluate.set_defaults(func=run_eval)

    engines = commands.add_parser("engines", help="what each engine loads and runs, per platform (the rules plans obey)")
    engines.add_argument("--engine", help="show one engine only")
    engines.set_defaults(func=run_engines)

    check = commands.add_parser("check", help="open a checkpoint with an engine itself and compare its numbers with bitplan.load's")
    check.add_argument("checkpoint", type=Path, help="folder written by `bitplan emit`")
    check.add_argument("--engine", help="transformers or vllm (default: the engine the plan was made for)")
    check.add_argument("--vllm-python", help="Python of vLLM's own venv (`make engines` makes .venv-vllm); default $BITPLAN_VLLM_PYTHON")
    check.add_argument("--json", dest="json_out", type=Path, help="also write the results as JSON")
    check.set_defaults(func=run_check)

    from bitplan.planner.cli_hardware import add_commands

    add_commands(commands)
    return parser


@contextmanager
def progress_bars(console: Console):
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=False) as bars:
        tasks: dict[str, int] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(STAGES.get(stage, stage), total=total)
            bars.update(tasks[stage], completed=done, total=total)

        yield report


def candidates_from(args):
    from bitplan.planner.api import Candidates

    symmetric = (True,) if args.symmetric_only else (True, False)
    if args.methods is None:
        return Candidates(bits=args.bits, group_sizes=args.groups, symmetric=symmetric)
    return Candidates(tuple(m.strip() for m in args.methods.split(",")), args.bits, args.groups, symmetric, costly_bits=None)


def calibration_from(args):
    from bitplan.planner.api import CalibrationSettings

    for path in args.text:
        from bitplan.profiles.text import read_text_file

        read_text_file(path)
    return CalibrationSettings(tuple(args.text), args.samples, args.seq_len)


def run_plan(args) -> int:
    from bitplan.planner.api import plan

    if args.trials < 0:
        raise BitplanError(f"--trials must be 0 or more, got {args.trials}")
    console = Console(stderr=True)
    with progress_bars(console) as report:
        result = plan(args.model, args.budget, args.target, args.context, args.batch, args.kv_dtype, args.tp, args.overhead,
                      candidates_from(args), calibration_from(args), args.tie_fused, args.trials, args.seed, report,
                      objective=args.objective, engine=args.engine)
    result.save(args.out)
    print_plan(result, Console())
    Console().print(f"plan written to {args.out}")
    return 0


def print_plan(result, console: Console) -> None:
    memory = Table(title="deployment memory (per device)")
    memory.add_column("term")
    memory.add_column("bytes", justify="right")
    for key in ("quantized_weights_bytes", "unquantized_bytes", "kv_cache_bytes", "workspace_bytes", "overhead_bytes", "total_bytes"):
        memory.add_row(key.removesuffix("_bytes").replace("_", " "), format_bytes(result.memory[key]))
    memory.add_row("budget", format_bytes(result.deployment["budget_bytes"]))
    console.print(memory)
    counts: dict[str, int] = {}
    for scheme in result.assignments.values():
        counts[scheme] = counts.get(scheme, 0) + 1
    schemes = Table(title="schemes chosen")
    schemes.add_column("scheme")
    schemes.add_column("layers", justify="right")
    schemes.add_column("checkpoint format")
    for name, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        schemes.add_row(name, str(count), result.formats.get(name, {}).get("format", ""))
    console.print(schemes)
    rules = result.engine["rules"]
    console.print(f"[bold]{rules[0]}[/bold]; the search enforced:")
    for line in rules[1:]:
        console.print(f"  - {line}")
    predicted = result.predicted
    line = f"predicted KL (sum of scores): {predicted['score_kl']:.4f} nats/token"
    if "calibration_kl" in predicted:
        line += f"; measured on held-in text: {predicted['calibration_kl']:.4f} (exact allocation: {predicted['exact_calibration_kl']:.4f})"
    console.print(line)
    if "decode_tokens_per_s" in predicted:
        batch, context = result.deployment["batch"], result.deployment["context"]
        console.print(f"predicted decode on {result.target} ({result.search.get('objective', 'quality')} objective, roofline): "
                      f"{predicted['decode_tokens_per_s'] / batch:.1f} tokens/s per sequence at batch {batch}, context {context} "
                      f"({predicted['decode_tokens_per_s']:.1f} tokens/s in all); {predicted['decode_ms_per_token_batch1']:.3f} ms/token at batch 1")


def run_profile(args) -> int:
    from bitplan.planner.api import engine_rules, profile

    rules = engine_rules(args.engine, args.target)
    with progress_bars(Console(stderr=True)) as report:
        table = profile(args.model, candidates_from(args), calibration_from(args), args.seed, report, rules=rules)
    if args.out:
        table.save(args.out)
    Console().print(f"{len(table.layers)} layers x {len(table.schemes)} schemes profiled ({table.provenance.get('metric')})")
    return 0


def run_emit(args) -> int:
    from bitplan.planner.emit import emit

    with progress_bars(Console(stderr=True)) as report:
        out = emit(args.plan, args.out, report)
    Console().print(f"checkpoint written to {out}")
    return 0


def run_engines(args) -> int:
    from bitplan.engines import ENGINES, RULES

    if args.engine is not None and args.engine not in ENGINES:
        raise BitplanError(f"unknown engine {args.engine!r}: choose from {', '.join(ENGINES)}")
    console = Console()
    for (engine, platform), rules in RULES.items():
        if args.engine in (None, engine):
            console.print(f"[bold]{rules.summary()[0]}[/bold]")
            for line in rules.summary()[1:]:
                console.print(f"  - {line}")
    return 0


def run_check(args) -> int:
    from bitplan.checkpoints.verify import check_checkpoint

    results = check_checkpoint(args.checkpoint, args.engine, args.vllm_python)
    console = Console()
    for result in results:
        mark = "[green]ok[/green]" if result.ok else "[red]FAILED[/red]"
        console.print(f"{mark} {result.engine}: {result.detail} ({result.loaded_by})")
    if args.json_out:
        args.json_out.write_text(json.dumps([r.to_dict() for r in results], indent=2, sort_keys=True))
    return 0 if all(r.ok for r in results) else 1


def run_eval(args) -> int:
    from bitplan.planner.evaluate import evaluate

    result = evaluate(args.checkpoint, args.text or None, args.samples, args.seq_len)
    table = Table(title=f"{result.checkpoint} against {result.reference}")
    for column in ("slice", "tokens", "KL (nats/token)", "perplexity", "original perplexity"):
        table.add_column(column, justify="right")
    for name, quality in result.slices.items():
        table.add_row(name, str(quality.tokens), f"{quality.kl:.4f}", f"{quality.perplexity:.3f}", f"{quality.reference_perplexity:.3f}")
    Console().print(table)
    if args.json_out:
        args.json_out.write_text(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except BitplanError as error:
        print(f"bitplan: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
