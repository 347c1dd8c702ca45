"""The scorecard's picture: per-slice KL bars with the limits drawn in, and perplexity bars of the
checkpoint against the original; with a baseline scorecard, its bars beside. 6 x 3 inches, 100 dpi."""

from __future__ import annotations

from pathlib import Path

from bitplan.atomic import write_atomic
from bitplan.checkpoints.scorecard import ABSOLUTE, Scorecard

WIDTH_IN, HEIGHT_IN, DPI = 6.0, 3.0, 100
COLOURS = {"new": "#1f77b4", "old": "#aec7e8", "original": "#7f7f7f", "pass": "#2ca02c", "fail": "#d62728"}


def draw(card: Scorecard, old: Scorecard | None = None):
    """A matplotlib Figure (Agg canvas, no display needed)."""
    from matplotlib.figure import Figure

    names = list(card.slices)
    figure = Figure(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI, layout="constrained")
    kl_axes, ppl_axes = figure.subplots(1, 2)
    series = [("new", card)] + ([("old", old)] if old is not None else [])
    width = 0.8 / len(series)
    for index, (label, scores) in enumerate(series):
        xs = [i - 0.4 + width * (index + 0.5) for i in range(len(names))]
        values = [scores.slices[n].kl if n in scores.slices else 0.0 for n in names]
        kl_axes.bar(xs, values, width, color=COLOURS[label], label="this checkpoint" if label == "new" else "baseline")
    for verdict in card.verdicts:
        i = names.index(verdict.slice)
        style = "-" if verdict.kind == ABSOLUTE else "--"
        kl_axes.hlines(verdict.limit_kl, i - 0.45, i + 0.45, colors=COLOURS["pass" if verdict.passed else "fail"], linestyles=style,
                       linewidth=2, label=f"limit ({verdict.kind})")
    kl_axes.set_title("KL to the original (nats/token)", fontsize=8)
    ppl_series = [("original", lambda s: s.reference_perplexity, card), ("new", lambda s: s.perplexity, card)]
    if old is not None:
        ppl_series.append(("old", lambda s: s.perplexity, old))
    width = 0.8 / len(ppl_series)
    for index, (label, value, scores) in enumerate(ppl_series):
        xs = [i - 0.4 + width * (index + 0.5) for i in range(len(names))]
        values = [value(scores.slices[n]) if n in scores.slices else 0.0 for n in names]
        ppl_axes.bar(xs, values, width, color=COLOURS[label],
                     label={"original": "original", "new": "this checkpoint", "old": "baseline"}[label])
    ppl_axes.set_title("perplexity", fontsize=8)
    for axes in (kl_axes, ppl_axes):
        axes.set_xticks(range(len(names)), names, fontsize=7)
        axes.tick_params(axis="y", labelsize=7)
        handles, labels = axes.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        axes.legend(unique.values(), unique.keys(), fontsize=6, loc="best")
    return figure


def write_png(card: Scorecard, path: Path, old: Scorecard | None = None) -> None:
    """Draw and write atomically; the PNG carries no timestamp, so the same scorecard gives the same bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure = draw(card, old)
    FigureCanvasAgg(figure)
    write_atomic(Path(path), lambda temporary: figure.savefig(temporary, format="png", metadata={"Software": None}))
