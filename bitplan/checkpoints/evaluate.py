"""Evaluate a checkpoint: perplexity and KL against the original model, per text slice.

The original is the model named in the checkpoint's plan.json. Built-in text: the held-out
part of Python's documentation (never used for calibration), sliced into prose and code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from bitplan.checkpoints.load import load
from bitplan.errors import BitplanError
from bitplan.models.source import resolve_model
from bitplan.planner.plan import load_plan
from bitplan.planner.quality import Quality, load_dense_model, measure_pair
from bitplan.profiles.text import builtin_slices, tokenize_windows, user_slices


@dataclass(frozen=True)
class Evaluation:
    checkpoint: str
    reference: str
    slices: dict[str, Quality]

    def to_dict(self) -> dict:
        return {"checkpoint": self.checkpoint, "reference": self.reference,
                "slices": {name: quality.to_dict() for name, quality in self.slices.items()}}


def heldout_slices(texts: list[Path] | None):
    return user_slices(list(texts)) if texts else builtin_slices("heldout")


def evaluate(checkpoint: str | os.PathLike, texts: list[Path] | None = None, samples: int = 16, seq_len: int = 512) -> Evaluation:
    """KL and perplexity of ``checkpoint`` against its original, on up to ``samples`` windows per slice."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / "plan.json").is_file():
        raise BitplanError(f"{checkpoint} has no plan.json: pass a folder written by `bitplan emit`")
    plan = load_plan(checkpoint / "plan.json")
    reference_folder = resolve_model(plan.model.source)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint if (checkpoint / "tokenizer.json").is_file() else reference_folder)
    windows = {s.name: tokenize_windows(tokenizer, s.text, seq_len, samples) for s in heldout_slices(texts) if s.text.strip()}
    reference = load_dense_model(reference_folder)
    candidate = load(checkpoint)
    return Evaluation(str(checkpoint), plan.model.source, {name: measure_pair(reference, candidate, w) for name, w in windows.items()})
