"""A scorecard: what ``bitplan eval`` measured, on which text, against which limits, and the verdict.

A scorecard is JSON (plus a small PNG, :func:`write_png`). It names the
checkpoint, the original model, the plan (sha256 of plan.json), bitplan's version and the
evaluation settings, and per slice: KL to the original (mean nats per token), both perplexities,
the tokens scored, and two hashes: of the slice's text and of the token ids actually scored. The
overall hashes let a later run re-score a new variant on the same evaluation set and compare
(:func:`check_same_text`, :func:`comparison_rows`).

Limits (:class:`bitplan.planner.limits.SliceLimits`) become one :class:`Verdict` per limited slice:
``max_kl`` compares the slice's KL with the number; ``max_regression`` with that factor times the
KL of the same slice in the baseline scorecard (``--compare``). The bytes are deterministic: keys
sorted, no timestamps, and an ``integrity`` hash over the rest, so a baseline edited by hand is
refused rather than trusted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from bitplan.atomic import json_digest, sealed_json, write_atomic, write_text_atomic
from bitplan.errors import BitplanError
from bitplan.planner.limits import SliceLimits

SCHEMA_VERSION = 1
ABSOLUTE, RELATIVE = "max_kl", "max_regression"


@dataclass(frozen=True)
class SliceScore:
    kl: float  # mean KL(original || checkpoint) per token, nats
    perplexity: float
    reference_perplexity: float  # the original model's, on the same tokens
    tokens: int
    windows: int
    text_sha256: str  # of the slice's text (UTF-8)
    tokens_sha256: str  # of the token ids scored (int64, shape included)

    def to_dict(self) -> dict:
        return {"kl": self.kl, "perplexity": self.perplexity, "reference_perplexity": self.reference_perplexity, "tokens": self.tokens,
                "windows": self.windows, "text_sha256": self.text_sha256, "tokens_sha256": self.tokens_sha256}

    @classmethod
    def from_dict(cls, data: dict) -> "SliceScore":
        return cls(float(data["kl"]), float(data["perplexity"]), float(data["reference_perplexity"]), int(data["tokens"]),
                   int(data["windows"]), str(data["text_sha256"]), str(data["tokens_sha256"]))


@dataclass(frozen=True)
class Verdict:
    """One limit on one slice: ``limit`` as given (nats/token for max_kl, a factor for max_regression),
    ``limit_kl`` the KL it allows, ``baseline_kl`` the compared scorecard's KL (max_regression only)."""

    slice: str
    kind: str
    limit: float
    limit_kl: float
    kl: float
    baseline_kl: float | None = None

    @property
    def passed(self) -> bool:
        return self.kl <= self.limit_kl  # a NaN KL fails

    @property
    def margin_kl(self) -> float:
        """Headroom in nats/token: positive passes, negative is by how much the limit is broken."""
        return self.limit_kl - self.kl

    def describe(self) -> str:
        bound = f"{self.limit:g}" if self.kind == ABSOLUTE else f"{self.limit:g} x {kl_text(self.baseline_kl)} = {kl_text(self.limit_kl)}"
        return f"{self.slice}: KL {kl_text(self.kl)} vs {self.kind} {bound} (margin {kl_text(self.margin_kl, '+')})"

    def to_dict(self) -> dict:
        return {"slice": self.slice, "kind": self.kind, "limit": self.limit, "limit_kl": self.limit_kl, "kl": self.kl,
                "baseline_kl": self.baseline_kl, "passed": self.passed, "margin_kl": self.margin_kl}

    @classmethod
    def from_dict(cls, data: dict) -> "Verdict":
        if data["kind"] not in (ABSOLUTE, RELATIVE):
            raise ValueError(f"unknown limit kind {data['kind']!r}")
        baseline = data.get("baseline_kl")
        return cls(str(data["slice"]), data["kind"], float(data["limit"]), float(data["limit_kl"]), float(data["kl"]),
                   None if baseline is None else float(baseline))


@dataclass(frozen=True)
class Scorecard:
    checkpoint: str
    reference: str  # the original model, as the plan names it
    plan_sha256: str
    bitplan_version: str
    samples: int  # at most this many windows per slice
    seq_len: int
    slices: dict[str, SliceScore]
    limits: SliceLimits = field(default_factory=SliceLimits)
    verdicts: tuple[Verdict, ...] = ()
    baseline: dict | None = None  # {"checkpoint", "scorecard_sha256"} of the scorecard compared against
    schema_version: int = SCHEMA_VERSION

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.verdicts)

    @property
    def text_sha256(self) -> str:
        """One hash of every slice's text, by slice name."""
        return mapping_sha256({name: score.text_sha256 for name, score in self.slices.items()})

    @property
    def tokens_sha256(self) -> str:
        """One hash of every slice's scored token ids: equal means the same evaluation set."""
        return mapping_sha256({name: score.tokens_sha256 for name, score in self.slices.items()})

    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "checkpoint": self.checkpoint,
            "reference": self.reference,
            "plan_sha256": self.plan_sha256,
            "bitplan_version": self.bitplan_version,
            "settings": {"samples": self.samples, "seq_len": self.seq_len},
            "slices": {name: score.to_dict() for name, score in self.slices.items()},
            "text_sha256": self.text_sha256,
            "tokens_sha256": self.tokens_sha256,
            "limits": self.limits.to_dict(),
            "verdicts": [v.to_dict() for v in sorted(self.verdicts, key=lambda v: (v.slice, v.kind))],
            "passed": self.passed,
            "baseline": self.baseline,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Scorecard":
        settings = data["settings"]
        slices = {str(name): SliceScore.from_dict(score) for name, score in data["slices"].items()}
        limits = SliceLimits.from_dict(data["limits"])
        baseline = data.get("baseline")
        if baseline is not None and not isinstance(baseline, dict):
            raise TypeError("baseline is not an object")
        return cls(str(data["checkpoint"]), str(data["reference"]), str(data["plan_sha256"]), str(data["bitplan_version"]),
                   int(settings["samples"]), int(settings["seq_len"]), slices, limits,
                   tuple(Verdict.from_dict(v) for v in data["verdicts"]), baseline, int(data["schema_version"]))

    def content_sha256(self) -> str:
        """sha256 of the canonical JSON (what ``integrity`` records)."""
        return json_digest(self.to_dict())

    def to_json(self) -> str:
        """Deterministic bytes: sorted keys, no timestamps, the integrity hash last."""
        return sealed_json(self.to_dict())


def scorecard_of(evaluation, limits: SliceLimits | None = None, baseline: Scorecard | None = None) -> Scorecard:
    """The scorecard of an :class:`bitplan.checkpoints.evaluate.Evaluation`, its verdicts against ``limits`` (relative ones against ``baseline``)."""
    from bitplan import __version__

    slices = {name: SliceScore(q.kl, q.perplexity, q.reference_perplexity, q.tokens, int(evaluation.texts[name].windows.shape[0]),
                               evaluation.texts[name].text_sha256, evaluation.texts[name].tokens_sha256)
              for name, q in evaluation.slices.items()}
    limits = limits or SliceLimits()
    verdicts = verdicts_for({name: q.kl for name, q in evaluation.slices.items()}, limits, baseline)
    reference = None if baseline is None else {"checkpoint": baseline.checkpoint, "scorecard_sha256": baseline.content_sha256()}
    return Scorecard(evaluation.checkpoint, evaluation.reference, evaluation.plan_sha256, __version__, evaluation.samples,
                     evaluation.seq_len, slices, limits, verdicts, reference)


def mapping_sha256(values: dict[str, str]) -> str:
    return json_digest(values)


def merge_limits(recorded: SliceLimits, command_line: SliceLimits) -> SliceLimits:
    """The plan's recorded limits, each overridden by the command line's limit of the same kind and slice."""
    return SliceLimits({**recorded.max_kl, **command_line.max_kl}, {**recorded.max_regression, **command_line.max_regression})


def verdicts_for(kls: dict[str, float], limits: SliceLimits, baseline: Scorecard | None) -> tuple[Verdict, ...]:
    """One verdict per limit; relative limits need ``baseline`` (checked earlier by :func:`check_limits`)."""
    verdicts = [Verdict(name, ABSOLUTE, limit, limit, kls[name]) for name, limit in sorted(limits.max_kl.items())]
    for name, factor in sorted(limits.max_regression.items()):
        old_kl = baseline.slices[name].kl
        verdicts.append(Verdict(name, RELATIVE, factor, factor * old_kl, kls[name], old_kl))
    return tuple(verdicts)


def check_limits(limits: SliceLimits, slices: list[str], baseline: Scorecard | None, baseline_name: Path | str | None) -> None:
    """Refuse, before anything is measured, limits that name a slice the text lacks, or a relative
    limit with no baseline slice to be relative to."""
    limits.check_slices(slices)
    check_baseline(limits, baseline, baseline_name)


def check_baseline(limits: SliceLimits, baseline: Scorecard | None, baseline_name: Path | str | None) -> None:
    """Relative limits need a baseline scorecard that scored their slices."""
    if limits.max_regression and baseline is None:
        raise BitplanError("--max-slice-regression compares with an earlier scorecard: pass --compare OLD.json "
                           "(or use --max-slice-kl for an absolute limit)")
    missing = sorted(set(limits.max_regression) - set(baseline.slices)) if baseline else []
    if missing:
        raise BitplanError(f"--max-slice-regression limits slice {missing[0]!r}, which {baseline_name} did not score: "
                           f"compare with a scorecard of the same text")


def check_same_text(texts: dict[str, tuple[str, str]], samples: int, seq_len: int, old: Scorecard, old_path: Path | str,
                    allow_different: bool) -> str | None:
    """``texts``: slice -> (text sha256, tokens sha256) of this evaluation. Refuses (or, when
    ``allow_different``, returns a warning) unless ``old`` scored exactly the same token ids."""
    old_texts = {name: (s.text_sha256, s.tokens_sha256) for name, s in old.slices.items()}
    if texts == old_texts:
        return None
    for name in sorted(set(texts) | set(old_texts)):
        if name not in old_texts:
            reason = f"slice {name!r} is not in it"
        elif name not in texts:
            reason = f"its slice {name!r} is not in this text"
        elif texts[name][0] != old_texts[name][0]:
            reason = f"slice {name!r} has other text"
        elif texts[name] != old_texts[name]:
            reason = (f"slice {name!r} has the same text but other windows (it used --samples {old.samples} --seq-len {old.seq_len}, "
                      f"this run --samples {samples} --seq-len {seq_len})")
        else:
            continue
        break
    message = f"{old_path} was scored on another evaluation set: {reason}"
    if allow_different:
        return f"warning: {message}; comparing anyway (--allow-different-text)"
    raise BitplanError(f"{message}: evaluate on the same text with the same --samples and --seq-len, "
                       "or pass --allow-different-text to compare anyway")


def load_scorecard(path: Path) -> Scorecard:
    """Read and check a scorecard written by ``bitplan eval``: valid JSON, known schema, untampered."""
    path = Path(path)
    redo = "re-create it with `bitplan eval CHECKPOINT --scorecard PATH`"
    if not path.is_file():
        raise BitplanError(f"scorecard {path} does not exist: {redo}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BitplanError(f"scorecard {path} is not valid JSON ({exc}): {redo}") from exc
    if not isinstance(data, dict) or "schema_version" not in data:
        raise BitplanError(f"{path} is not a bitplan scorecard (no schema_version): {redo}")
    if data["schema_version"] != SCHEMA_VERSION:
        raise BitplanError(f"scorecard {path} has schema version {data['schema_version']!r}, this bitplan reads version "
                           f"{SCHEMA_VERSION}: {redo}")
    stored = data.pop("integrity", None)
    canonical = json.dumps(data, sort_keys=True)
    if stored != json_digest(data):
        raise BitplanError(f"scorecard {path} was modified after bitplan wrote it (integrity hash mismatch): {redo}")
    try:
        card = Scorecard.from_dict(data)
    except (TypeError, KeyError, ValueError, AttributeError) as exc:
        raise BitplanError(f"scorecard {path} is malformed ({type(exc).__name__}: {exc}): {redo}") from exc
    if json.dumps(card.to_dict(), sort_keys=True) != canonical:  # derived fields (passed, hashes) disagree with the rest
        raise BitplanError(f"scorecard {path} is inconsistent (its verdicts or hashes do not follow from its numbers): {redo}")
    return card


def write_scorecard(card: Scorecard, json_path: Path | None, png_path: Path | None = None, old: Scorecard | None = None) -> None:
    """Write the PNG (when asked), then the JSON, each atomically."""
    if png_path is not None:
        write_png(card, png_path, old)
    if json_path is not None:
        write_text_atomic(json_path, card.to_json())


def kl_text(kl: float, sign: str = "") -> str:
    """4 decimals, or 3 significant digits below 0.001 (a tiny model's KL is not 0.0000)."""
    return f"{kl:{sign}.4f}" if abs(kl) >= 1e-3 or kl == 0 else f"{kl:{sign}.2e}"


def ratio(new: float, old: float) -> float:
    return new / old if old else float("inf") if new else 1.0


def comparison_rows(new: Scorecard, old: Scorecard) -> list[tuple[str, ...]]:
    """Per slice of either: slice, old KL, new KL, delta, ratio, old perplexity, new perplexity, delta ("-" where absent)."""
    rows = []
    for name in list(new.slices) + sorted(set(old.slices) - set(new.slices)):
        a, b = old.slices.get(name), new.slices.get(name)
        if a is None or b is None:
            one = a or b
            kl, ppl = kl_text(one.kl), f"{one.perplexity:.2f}"
            rows.append((name, kl if a else "-", kl if b else "-", "-", "-", ppl if a else "-", ppl if b else "-", "-"))
            continue
        rows.append((name, kl_text(a.kl), kl_text(b.kl), kl_text(b.kl - a.kl, "+"), f"{ratio(b.kl, a.kl):.2f}x",
                     f"{a.perplexity:.2f}", f"{b.perplexity:.2f}", f"{b.perplexity - a.perplexity:+.2f}"))
    return rows


# --- the picture: per-slice KL bars with the limits drawn in, perplexity bars against the original;
# with a baseline scorecard, its bars beside. 6 x 3 inches, 100 dpi.

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
