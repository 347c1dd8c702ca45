"""Calibration tokens: the text a profile (and a calibrated method in emit) sees, and its shape."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from bitplan.profiles.text import builtin_slices, interleaved_windows, user_slices

BUILTIN_TEXT = "builtin:pydoc_data.topics"


@dataclass(frozen=True)
class CalibrationSettings:
    """Calibration text and its shape: ``samples`` windows of ``seq_len`` tokens."""

    texts: tuple[Path, ...] = ()  # empty: the built-in Python documentation
    samples: int = 16
    seq_len: int = 512

    def to_dict(self) -> dict:
        """As plan.json's provenance records it (absolute paths, or the built-in text's name)."""
        return {"texts": [str(Path(p).resolve()) for p in self.texts] or BUILTIN_TEXT, "samples": self.samples, "seq_len": self.seq_len}

    @classmethod
    def from_dict(cls, recorded: dict) -> "CalibrationSettings":
        texts = () if isinstance(recorded["texts"], str) else tuple(Path(p) for p in recorded["texts"])
        return cls(texts, int(recorded["samples"]), int(recorded["seq_len"]))


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


def calibration_windows(folder: Path, settings: CalibrationSettings, extra: int = 0) -> torch.Tensor:
    """``settings.samples + extra`` windows: the first ``samples`` profile, the rest are held in for refinement."""
    slices = user_slices(list(settings.texts)) if settings.texts else builtin_slices("calibration")
    return interleaved_windows(load_tokenizer(folder), slices, settings.seq_len, settings.samples + extra)
