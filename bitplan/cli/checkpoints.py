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
    evaluate.add_argument("--scorecard", type=Path, help="write the scorecard: this JSON and a PNG of the same stem beside it")
    evaluate.add_argument("--json", dest="json_out", type=Path, help="write the scorecard JSON only (no PNG)")
    evaluate.add_argument("--max-slice-kl", metavar="SLICE=KL,...",
                          help="fail (exit 1) when a slice's KL (nats/token) is above its limit, e.g. code=0.05,prose=0.1 "
                               "(overrides the limits the plan recorded)")
    evaluate.add_argument("--max-slice-regression", metavar="SLICE=FACTOR,...",
                          help="fail (exit 1) when a slice's KL is above FACTOR x its KL in the --compare scorecard, e.g. code=1.2")
    evaluate.add_argument("--compare", type=Path, metavar="OLD.json", help="an earlier scorecard: print the per-slice difference")
    evaluate.add_argument("--allow-different-text", action="store_true",
                          help="compare even when the earlier scorecard scored other text (refused otherwise)")
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
    """Exit 0: measured (and every limit held); 1: a limit is broken (the scorecard is still written); 2: bad input."""
    from bitplan.checkpoints import scorecard as cards
    from bitplan.checkpoints.evaluate import score
    from bitplan.planner.limits import parse_slice_limits

    command_line = parse_slice_limits(args.max_slice_kl, args.max_slice_regression)
    if args.compare is None:
        cards.check_baseline(command_line, None, None)
    png = scorecard_png_path(args.scorecard)
    old = cards.load_scorecard(args.compare) if args.compare is not None else None
    console, errors = Console(), Console(stderr=True, soft_wrap=True)
    card = score(args.checkpoint, args.text or None, args.samples, args.seq_len, command_line, old, args.compare or "",
                 args.allow_different_text, lambda line: errors.print(line, markup=False, highlight=False))
    print_scorecard(console, card, old)
    cards.write_scorecard(card, args.scorecard, png, old)
    if args.json_out:
        cards.write_scorecard(card, args.json_out)
    if not card.passed:
        broken = [v.slice for v in card.verdicts if not v.passed]
        errors.print(f"bitplan: gate failed: {', '.join(broken)} above the limit (exit 1)", markup=False)
        return EXIT_GATE_FAILED
    return 0


EXIT_GATE_FAILED = 1


def scorecard_png_path(path: Path | None) -> Path | None:
    if path is None:
        return None
    if path.suffix.lower() != ".json":
        raise BitplanError(f"--scorecard {path}: name the JSON file (e.g. out/score.json); the PNG goes beside it with the same stem")
    return path.with_suffix(".png")


def print_scorecard(console: Console, card, old) -> None:
    from bitplan.checkpoints.scorecard import comparison_rows, kl_text

    table = Table(title=f"{card.checkpoint} against {card.reference}")
    for column in ("slice", "tokens", "KL (nats/token)", "perplexity", "original perplexity"):
        table.add_column(column, justify="right")
    for name, score in card.slices.items():
        table.add_row(name, str(score.tokens), kl_text(score.kl), f"{score.perplexity:.3f}", f"{score.reference_perplexity:.3f}")
    console.print(table)
    console.print(f"evaluation set: tokens sha256 {card.tokens_sha256[:16]}, text sha256 {card.text_sha256[:16]}", highlight=False)
    if old is not None:
        diff = Table(title=f"against {old.checkpoint}")
        for column in ("slice", "old KL", "new KL", "ΔKL", "ratio", "old ppl", "new ppl", "Δppl"):
            diff.add_column(column, justify="right")
        for row in comparison_rows(card, old):
            diff.add_row(*row)
        console.print(diff)
    for verdict in card.verdicts:
        mark = "[green]pass[/green]" if verdict.passed else "[red]FAIL[/red]"
        console.print(f"{mark} {verdict.describe()}", highlight=False, soft_wrap=True)


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
