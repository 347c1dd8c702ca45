"""``bitplan emit``, ``eval``, ``check`` and ``engines``: writing checkpoints and asking engines about them."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bitplan.atomic import write_text_atomic
from bitplan.cli.common import positive_int, progress_bars
from bitplan.errors import BitplanError


def add_commands(commands) -> None:
    """Register ``emit``, ``eval``, ``check`` and ``engines``."""
    emit = commands.add_parser("emit", help="write the checkpoint a plan describes")
    emit.add_argument("plan", type=Path, help="plan.json from `bitplan plan`")
    emit.add_argument("--out", type=Path, required=True, help="new folder for the checkpoint or recipe, or the *.gguf file")
    emit.add_argument("--format", dest="fmt", default="checkpoint", choices=("checkpoint", "gguf", "recipe"),
                      help="checkpoint: safetensors folder (vllm, transformers, bitplan plans); for llama.cpp plans: gguf (a GGUF file) "
                           "or recipe (llama-quantize --tensor-type-file and the commands)")
    emit.set_defaults(func=run_emit)

    evaluate = commands.add_parser("eval", help="perplexity and KL against the original, per text slice")
    evaluate.add_argument("checkpoint", type=Path, help="folder written by `bitplan emit`")
    evaluate.add_argument("--text", action="append", type=Path, default=[], help="evaluation text (.txt / .jsonl with a slice field)")
    evaluate.add_argument("--samples", type=positive_int, default=16, help="windows per slice")
    evaluate.add_argument("--seq-len", type=positive_int, default=512)
    evaluate.add_argument("--json", dest="json_out", type=Path, help="also write the results as JSON")
    evaluate.set_defaults(func=run_eval)

    check = commands.add_parser("check", help="open a checkpoint with an engine itself and compare its numbers with bitplan.load's")
    check.add_argument("checkpoint", type=Path, help="folder written by `bitplan emit`")
    check.add_argument("--engine", help="transformers or vllm (default: the engine the plan was made for)")
    check.add_argument("--vllm-python", help="Python of vLLM's own venv (`make engines` makes .venv-vllm); default $BITPLAN_VLLM_PYTHON")
    check.add_argument("--json", dest="json_out", type=Path, help="also write the results as JSON")
    check.set_defaults(func=run_check)

    engines = commands.add_parser("engines", help="what each engine loads and runs, per platform (the rules plans obey)")
    engines.add_argument("--engine", help="show one engine only")
    engines.set_defaults(func=run_engines)


def run_emit(args) -> int:
    from bitplan.checkpoints.emit import emit
    from bitplan.checkpoints.emit_gguf import emit_gguf, emit_recipe

    if args.fmt == "recipe":
        out = emit_recipe(args.plan, args.out)
        Console().print(f"llama-quantize recipe written to {out}: run {out / 'quantize.sh'}")
        return 0
    with progress_bars(Console(stderr=True)) as report:
        if args.fmt == "gguf":
            written = emit_gguf(args.plan, args.out, report)
            Console().print(f"GGUF written to {written.path} ({written.tensor_bytes} bytes of tensors)")
            return 0
        out = emit(args.plan, args.out, report)
    Console().print(f"checkpoint written to {out}")
    return 0


def run_eval(args) -> int:
    from bitplan.checkpoints.evaluate import evaluate

    result = evaluate(args.checkpoint, args.text or None, args.samples, args.seq_len)
    table = Table(title=f"{result.checkpoint} against {result.reference}")
    for column in ("slice", "tokens", "KL (nats/token)", "perplexity", "original perplexity"):
        table.add_column(column, justify="right")
    for name, quality in result.slices.items():
        table.add_row(name, str(quality.tokens), f"{quality.kl:.4f}", f"{quality.perplexity:.3f}", f"{quality.reference_perplexity:.3f}")
    Console().print(table)
    if args.json_out:
        write_text_atomic(args.json_out, json.dumps(result.to_dict(), indent=2, sort_keys=True))
    return 0


def run_check(args) -> int:
    from bitplan.checkpoints.verify import check_checkpoint

    results = check_checkpoint(args.checkpoint, args.engine, args.vllm_python)
    console = Console()
    for result in results:
        mark = "[green]ok[/green]" if result.ok else "[red]FAILED[/red]"
        console.print(f"{mark} {result.engine}: {result.detail} ({result.loaded_by})")
    if args.json_out:
        write_text_atomic(args.json_out, json.dumps([r.to_dict() for r in results], indent=2, sort_keys=True))
    return 0 if all(r.ok for r in results) else 1


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
