"""What the command modules share: argument types, progress bars."""

from __future__ import annotations

import argparse
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

STAGES = {"forward": "profile: forward pass", "score": "profile: score schemes", "refine": "refine: measured KL", "emit": "emit: tensors", "imatrix": "emit: importance matrix"}


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def group_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(0 if v.strip() in ("c", "channel", "0") else int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated group sizes (c = per channel), got {text!r}") from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


@contextmanager
def progress_bars(console: Console):
    """``report(stage, done, total)`` drawing one bar per stage; the bars start with the first
    report, so a command that fails its checks before any work prints its one error line only."""
    bars: list[Progress] = []
    tasks: dict[str, int] = {}

    def report(stage: str, done: int, total: int) -> None:
        if not bars:
            bars.append(Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 console=console, transient=False))
            bars[0].start()
        if stage not in tasks:
            tasks[stage] = bars[0].add_task(STAGES.get(stage, stage), total=total)
        bars[0].update(tasks[stage], completed=done, total=total)

    try:
        yield report
    finally:
        if bars:
            bars[0].stop()
