"""Evaluate a checkpoint: perplexity and KL against the original model, per text slice.

The original is the model named in the checkpoint's plan.json. Built-in text: the held-out
part of Python's documentation (never used for calibration), sliced into prose and code.

Two steps, so that a caller can refuse bad input before any model loads: :func:`prepare_evaluation`
reads the plan and tokenizes the text (and hashes both); :func:`measure` runs the original and the
checkpoint side by side, one decoder block at a time, and scores every slice. :func:`evaluate` is
the two in a row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bitplan.checkpoints.load import CheckpointRunner, open_checkpoint
from bitplan.checkpoints.scorecard import Scorecard, check_limits, check_same_text, merge_limits, scorecard_of
from bitplan.errors import BitplanError
from bitplan.models.source import WeightReader, resolve_model
from bitplan.models.spec import read_config
from bitplan.planner.limits import SliceLimits
from bitplan.planner.plan import load_plan
from bitplan.planner.quality import Quality
from bitplan.planner.streaming import compare, final_hidden_states, log_probs
from bitplan.profiles.blocks import BlockRunner
from bitplan.profiles.text import builtin_slices, tokenize_windows, user_slices


@dataclass(frozen=True)
class SliceText:
    """What is scored on one slice: its windows [n, seq_len] and the hashes that identify them."""

    name: str
    windows: torch.Tensor
    text_sha256: str  # of the slice's text (UTF-8)
    tokens_sha256: str  # of the token ids actually scored, shape included


@dataclass(frozen=True)
class PreparedEvaluation:
    """Everything :func:`measure` needs, known before any model loads."""

    checkpoint: Path
    reference: str  # how the plan names the original model
    reference_folder: Path
    plan_sha256: str
    samples: int
    seq_len: int
    texts: dict[str, SliceText]
    plan_data: dict = field(repr=False)  # plan.json as read (for keys this bitplan's Plan type may not carry)


@dataclass(frozen=True)
class Evaluation:
    checkpoint: str
    reference: str
    slices: dict[str, Quality]
    texts: dict[str, SliceText] = field(default_factory=dict, repr=False)
    plan_sha256: str = ""
    samples: int = 0
    seq_len: int = 0

    def to_dict(self) -> dict:
        return {"checkpoint": self.checkpoint, "reference": self.reference,
                "slices": {name: quality.to_dict() for name, quality in self.slices.items()}}


log = logging.getLogger(__name__)


def heldout_slices(texts: list[Path] | None):
    return user_slices(list(texts)) if texts else builtin_slices("heldout")


def windows_sha256(windows: torch.Tensor) -> str:
    """sha256 of int64 token ids [n, seq_len], the shape included (2x128 and 4x64 windows differ)."""
    digest = hashlib.sha256(f"int64 {list(windows.shape)}\n".encode())
    digest.update(windows.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def prepare_evaluation(checkpoint: str | os.PathLike, texts: list[Path] | None = None, samples: int = 16,
                       seq_len: int = 512) -> PreparedEvaluation:
    """Read ``checkpoint``'s plan, tokenize the evaluation text into at most ``samples`` windows per slice."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / "plan.json").is_file():
        raise BitplanError(f"{checkpoint} has no plan.json: pass a folder written by `bitplan emit`")
    plan = load_plan(checkpoint / "plan.json")
    plan_bytes = (checkpoint / "plan.json").read_bytes()
    reference_folder = resolve_model(plan.model.source)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint if (checkpoint / "tokenizer.json").is_file() else reference_folder)
    scored = {}
    for piece in heldout_slices(texts):
        if piece.text.strip():
            windows = tokenize_windows(tokenizer, piece.text, seq_len, samples)
            scored[piece.name] = SliceText(piece.name, windows, hashlib.sha256(piece.text.encode()).hexdigest(), windows_sha256(windows))
    return PreparedEvaluation(checkpoint, plan.model.source, reference_folder, hashlib.sha256(plan_bytes).hexdigest(),
                              samples, seq_len, scored, json.loads(plan_bytes))


def recorded_limits(prepared: PreparedEvaluation) -> SliceLimits:
    """The per-slice limits the plan recorded (plan.json's ``slice_limits``), none when it has none."""
    recorded = prepared.plan_data.get("slice_limits")
    try:
        if recorded is not None and not isinstance(recorded, dict):
            raise TypeError
        limits = SliceLimits.from_dict(recorded)
        for values in (limits.max_kl, limits.max_regression):
            if not all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                       and math.isfinite(v) and v > 0 for k, v in values.items()):
                raise TypeError
    except (TypeError, ValueError, AttributeError) as exc:
        raise BitplanError(f"{prepared.checkpoint / 'plan.json'} has malformed slice_limits: "
                           "re-create the plan with `bitplan plan ... --max-slice-kl`") from exc
    return SliceLimits({k: float(v) for k, v in limits.max_kl.items()}, {k: float(v) for k, v in limits.max_regression.items()})


@torch.no_grad()
def measure(prepared: PreparedEvaluation, batch_size: int = 4) -> Evaluation:
    """KL and perplexity of the checkpoint against the original on every prepared slice, block by block.

    Block ``i`` of the original (from its safetensors) and block ``i`` of the checkpoint (decoded
    as :func:`bitplan.checkpoints.load.load` decodes it) are loaded in turn, run the hidden states
    of every slice's windows, and are dropped; then the final norm and head give the log-probs one
    window at a time. Memory: one block, the hidden states of all windows (twice), one window's
    logits, whatever the depth."""
    reference = BlockRunner(read_config(prepared.reference_folder), WeightReader(prepared.reference_folder))
    candidate = CheckpointRunner(open_checkpoint(prepared.checkpoint))
    if candidate.num_blocks != reference.num_blocks:
        raise BitplanError(f"{prepared.checkpoint} has {candidate.num_blocks} blocks but its original {prepared.reference_folder} has "
                           f"{reference.num_blocks}: evaluate the checkpoint against the model it was emitted from")
    windows = {name: text.windows for name, text in prepared.texts.items()}
    final = final_hidden_states([reference, candidate], windows, batch_size)
    (reference_norm, reference_head), (candidate_norm, candidate_head) = reference.head_weights(), candidate.head_weights()
    qualities = {}
    for name, ids in windows.items():
        reference_final, candidate_final = final[0][name], final[1][name]
        qualities[name] = compare(ids, lambda i: log_probs(reference, reference_final[i : i + 1], reference_norm, reference_head),
                                  lambda i: log_probs(candidate, candidate_final[i : i + 1], candidate_norm, candidate_head))
    return Evaluation(str(prepared.checkpoint), prepared.reference, qualities, dict(prepared.texts), prepared.plan_sha256,
                      prepared.samples, prepared.seq_len)


def evaluate(checkpoint: str | os.PathLike, texts: list[Path] | None = None, samples: int = 16, seq_len: int = 512) -> Evaluation:
    """KL and perplexity of ``checkpoint`` against its original, on up to ``samples`` windows per slice."""
    return measure(prepare_evaluation(checkpoint, texts, samples, seq_len))


def score(checkpoint: str | os.PathLike, texts: list[Path] | None = None, samples: int = 16, seq_len: int = 512,
          limits: SliceLimits | None = None, baseline: Scorecard | None = None, baseline_name: str = "the baseline scorecard",
          allow_different_text: bool = False, note: Callable[[str], None] = log.warning) -> Scorecard:
    """Evaluate ``checkpoint`` and judge it: its scorecard, with a verdict per limit.

    The limits are those the plan recorded (plan.json's ``slice_limits``), each overridden by
    ``limits``' limit of the same kind and slice. Relative limits (``max_regression``) compare with
    ``baseline``'s KL on the same slice; the plan's own are skipped (with a note) when there is no
    baseline. Everything that can be refused is refused before a model loads: a limit on a slice
    the text lacks, a relative limit without a baseline, a baseline scored on other token ids
    (unless ``allow_different_text``, which only notes it).
    """
    prepared = prepare_evaluation(checkpoint, texts, samples, seq_len)
    recorded = recorded_limits(prepared)
    if recorded.max_regression and baseline is None:
        note(f"note: the plan's --max-slice-regression limits ({', '.join(sorted(recorded.max_regression))}) are not checked "
             "without --compare OLD.json")
        recorded = SliceLimits(recorded.max_kl, {})
    merged = merge_limits(recorded, limits or SliceLimits())
    check_limits(merged, list(prepared.texts), baseline, baseline_name)
    if baseline is not None:
        hashes = {name: (text.text_sha256, text.tokens_sha256) for name, text in prepared.texts.items()}
        warning = check_same_text(hashes, samples, seq_len, baseline, baseline_name, allow_different_text)
        if warning:
            note(warning)
    return scorecard_of(measure(prepared), merged, baseline)
