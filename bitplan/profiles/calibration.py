"""Calibration tokens: the text a profile (and a calibrated method in emit) sees, and its shape."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from bitplan.errors import BitplanError
from bitplan.profiles.text import SliceWindows, builtin_slices, slice_windows, user_slices

BUILTIN_TEXT = "builtin:pydoc_data.topics"


@dataclass(frozen=True)
class CalibrationSettings:
    """Calibration text and its shape: ``samples`` windows of ``seq_len`` tokens."""

    texts: tuple[Path, ...] = ()  # empty: the built-in Python documentation
    samples: int = 16
    seq_len: int = 512
    weights: tuple[float, ...] = ()  # per text (``--text file:weight``); empty: every text weighs 1

    def to_dict(self) -> dict:
        """As plan.json's provenance records it (absolute paths, or the built-in text's name;
        ``text_weights`` only when some text does not weigh 1)."""
        recorded = {"texts": [str(Path(p).resolve()) for p in self.texts] or BUILTIN_TEXT, "samples": self.samples, "seq_len": self.seq_len}
        if any(w != 1.0 for w in self.weights):
            recorded["text_weights"] = list(self.weights)
        return recorded

    @classmethod
    def from_dict(cls, recorded: dict) -> "CalibrationSettings":
        texts = () if isinstance(recorded["texts"], str) else tuple(Path(p) for p in recorded["texts"])
        return cls(texts, int(recorded["samples"]), int(recorded["seq_len"]), tuple(float(w) for w in recorded.get("text_weights", ())))


TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "vocab.json")  # a folder holding none has no tokenizer


def load_tokenizer(folder: Path):
    """The model folder's own tokenizer; a missing or unreadable one is a user error, found before any profiling."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_MARKERS):
        raise BitplanError(f"{folder} has no tokenizer ({', '.join(TOKENIZER_MARKERS)}): copy the model's tokenizer files into the folder")
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as exc:  # transformers and tokenizers raise many types for an unreadable file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BitplanError(f"the tokenizer in {folder} cannot be read ({reason}): copy the model's tokenizer files again") from exc


def calibration_windows(folder: Path, settings: CalibrationSettings, extra: int = 0) -> torch.Tensor:
    """``settings.samples + extra`` windows: the first ``samples`` profile, the rest are held in for refinement."""
    return calibration_slices(folder, settings, extra).tokens


def calibration_slices(folder: Path, settings: CalibrationSettings, extra: int = 0) -> SliceWindows:
    """:func:`calibration_windows` with each window's slice and the slices' weights in the aggregate score."""
    slices = user_slices(list(settings.texts), settings.weights) if settings.texts else builtin_slices("calibration")
    return slice_windows(load_tokenizer(folder), slices, settings.seq_len, settings.samples + extra)
